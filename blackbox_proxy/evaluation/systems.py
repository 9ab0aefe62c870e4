"""The systems an evaluation puts side by side, each answering an item of any task kind.

| system | generate (answers) | choice (letter at the first position) | loglik (teacher forcing) |
|---|---|---|---|
| ``hosted`` | one direct API call, greedy, text cut at the task's stop strings | per-step at alpha 0: the hosted top-k renormalised | per-step at alpha 0 |
| ``expert`` | the expert alone, greedy, locally | its full-vocabulary distribution | one forward, full vocabulary |
| ``auto`` | the tuner with the default strategy (what ``generate`` runs with no ``--strategy``) | - (per-step's) | - |
| ``per-step`` | the tuner, per-step | the tuned distribution over the candidates | the tuned distribution over the candidates |
| ``speculative`` | the tuner, speculative | - (same first-position distribution as per-step) | - |
| ``resample`` | the tuner, resample (temperature 1) | - | - |
| ``white-box`` | :class:`~blackbox_proxy.whitebox.WhiteBoxTuner` (``--base``) | exact p~, full vocabulary | exact p~ |

Every system sees an item as the tuner's small models do: the raw prompt in ``completions``
mode, the chat messages in the chat modes (white-box too: all three models then render them with
their chat templates, as the hosted model does). A system that does
not apply to a kind says why (:meth:`System.unsupported`) and is left out of that run.

Left out: the maths of letters and teacher forcing (``scoring.py``), resuming and reporting
(``runner.py``, ``report.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError
from .tasks import EvalItem, Task

SYSTEMS = ("hosted", "expert", "auto", "per-step", "speculative", "resample", "white-box")
API_SYSTEMS = frozenset({"hosted", "auto", "per-step", "speculative", "resample"})


@dataclass(frozen=True)
class Settings:
    """Generation settings every system of a run shares (None: the request's default)."""

    alpha: float = 1.0
    temperature: float = 0.0
    seed: int | None = None
    chunk: int | None = None
    samples: int | None = None
    mode: str = "completions"


def usage_record(usage: Any) -> dict[str, Any]:
    out = {k: getattr(usage, k) for k in ("api_calls", "prompt_tokens", "completion_tokens", "generated_tokens",
                                          "tail_calls", "cached_prompt_tokens")}
    out.update(api_seconds=round(usage.api_seconds, 3), scoring_seconds=round(usage.scoring_seconds, 3))
    if usage.acceptance_rate is not None:
        out["acceptance_rate"] = round(usage.acceptance_rate, 4)
    return out


def loglik_record(logprobs: Sequence[float | None], pieces: Sequence[bytes], misses: Sequence[str] = ()) -> dict[str, Any]:
    """One reference text's result: the summed log-probability of the covered tokens, how many
    tokens were covered, and bits per byte over the covered bytes (None when none was)."""
    covered = [(lp, len(b)) for lp, b in zip(logprobs, pieces) if lp is not None]
    loglik = sum(lp for lp, _ in covered)
    covered_bytes = sum(n for _, n in covered)
    out: dict[str, Any] = {
        "loglik": loglik, "tokens": len(pieces), "covered": len(covered), "bytes": sum(len(b) for b in pieces),
        "covered_bytes": covered_bytes,
        "bits_per_byte": -loglik / (math.log(2) * covered_bytes) if covered_bytes else None,
    }
    if misses:
        out["misses"] = sorted(set(misses))
    return out


class System:
    """One system under evaluation (see the module docstring)."""

    name = "system"
    api = False  # API-bound: items run concurrently

    def unsupported(self, kind: str) -> str | None:
        return None

    def check(self, item: EvalItem, task: Task, max_tokens: int) -> None:
        """Raise :class:`ConfigurationError` for an item that cannot run (before anything is paid)."""

    async def generate(self, item: EvalItem, task: Task, max_tokens: int) -> dict[str, Any]:
        raise NotImplementedError

    async def choice(self, item: EvalItem) -> dict[str, Any]:
        raise NotImplementedError

    async def loglik(self, item: EvalItem) -> dict[str, Any]:
        raise NotImplementedError


class TunedSystem(System):
    """The proxy-tuned hosted model through an :class:`~blackbox_proxy.tuner.AsyncProxyTuner`."""

    api = True

    def __init__(self, name: str, tuner: Any, settings: Settings, *, strategy: str, alpha: float) -> None:
        self.name, self.tuner, self.settings, self.strategy, self.alpha = name, tuner, settings, strategy, alpha

    def _input(self, item: EvalItem) -> dict[str, Any]:
        return {"prompt": item.prompt} if self.tuner.mode == "completions" else {"messages": item.message_dicts()}

    def unsupported(self, kind: str) -> str | None:
        if kind != "generate" and self.strategy != "per-step":
            return (f"{self.name} draws whole texts; on {kind} items it would read the same first-position "
                    "distribution as per-step: use per-step")
        if kind == "loglik" and self.tuner.mode == "chat":
            return "teacher forcing continues the reference text, which chat mode cannot: use completions or chat-prefix"
        return None

    def _options(self, task: Task, max_tokens: int) -> dict[str, Any]:
        s = self.settings
        options: dict[str, Any] = dict(max_tokens=max_tokens, alpha=self.alpha, stop=list(task.stop) or None,
                                       strategy=self.strategy, seed=s.seed, temperature=s.temperature)
        if self.strategy == "resample":
            options.update(temperature=1.0, samples=s.samples)
        elif self.strategy == "speculative":
            options["chunk"] = s.chunk
        return options

    def check(self, item: EvalItem, task: Task, max_tokens: int) -> None:
        if task.kind == "generate":
            self.tuner.check_request(**self._input(item), **self._options(task, max_tokens))
        elif task.kind == "choice":
            self.tuner.check_request(**self._input(item), max_tokens=1, alpha=self.alpha)

    async def generate(self, item: EvalItem, task: Task, max_tokens: int) -> dict[str, Any]:
        result = await self.tuner.generate(**self._input(item), **self._options(task, max_tokens))
        out = {"output": result.text, "finish_reason": result.finish_reason, "usage": usage_record(result.usage)}
        if result.ess is not None:
            out["usage"]["ess"] = round(result.ess, 3)
        return out

    async def choice(self, item: EvalItem) -> dict[str, Any]:
        import torch

        from .scoring import choice_record, letters_from_candidates, reads_as

        result = await self.tuner.generate(**self._input(item), max_tokens=1, alpha=self.alpha, temperature=0.0,
                                           strategy="per-step")
        step = result.trace[0] if result.trace else None
        texts = [c.text for c in step.candidates] if step else []
        logprobs = torch.log_softmax(torch.tensor([c.score for c in step.candidates], dtype=torch.float64), 0).tolist() \
            if step else []
        record = choice_record(letters_from_candidates(texts, logprobs, item.letters), item.answer)
        seen = sorted({letter for t in texts for letter in item.letters if reads_as(t, letter)})
        record.update(candidates=len(texts), letters_seen=seen, usage=usage_record(result.usage))
        return record

    async def loglik(self, item: EvalItem) -> dict[str, Any]:
        from ..decoding.forcing import teacher_force_async

        forced = await teacher_force_async(self.tuner, item.reference, alpha=self.alpha, **self._input(item))
        record = loglik_record(forced.logprobs, forced.pieces, forced.misses)
        u = forced.usage
        record["usage"] = {"api_calls": u.api_calls, "prompt_tokens": u.prompt_tokens,
                           "completion_tokens": u.completion_tokens, "cached_prompt_tokens": u.cached_prompt_tokens}
        return record


class HostedSystem(TunedSystem):
    """The hosted model alone: direct greedy completions; alpha 0 for choice and loglik items."""

    def __init__(self, tuner: Any, settings: Settings) -> None:
        super().__init__("hosted", tuner, settings, strategy="per-step", alpha=0.0)

    def unsupported(self, kind: str) -> str | None:
        return None if kind == "generate" else super().unsupported(kind)  # a direct call answers in any mode

    def check(self, item: EvalItem, task: Task, max_tokens: int) -> None:
        if task.kind == "choice":
            super().check(item, task, max_tokens)

    async def generate(self, item: EvalItem, task: Task, max_tokens: int) -> dict[str, Any]:
        import time

        from ..request import cut_at_stop
        from ..types import HostedRequest, Usage

        client = self.tuner.client
        await client.check()
        common = dict(mode=self.tuner.mode, max_tokens=max_tokens, top_k=0, temperature=self.settings.temperature,
                      seed=self.settings.seed)
        request = (HostedRequest(prompt=item.prompt, **common) if self.tuner.mode == "completions"
                   else HostedRequest(messages=item.messages, **common))
        started = time.perf_counter()
        [result] = await client.complete(request)
        cut = cut_at_stop(result.text, task.stop)
        usage = Usage.of_call(result, time.perf_counter() - started)
        record = usage_record(usage)
        del record["generated_tokens"], record["scoring_seconds"]  # the API's completion_tokens count what it wrote
        return {"output": result.text if cut is None else cut,
                "finish_reason": "stop" if cut is not None else (result.finish_reason or "length"), "usage": record}


class ExpertSystem(System):
    """The expert alone, greedy, on this machine."""

    name = "expert"

    def __init__(self, scorer: Any, settings: Settings) -> None:
        self.scorer, self.settings = scorer, settings

    def _prompt_ids(self, item: EvalItem) -> list[int]:
        if self.settings.mode == "completions":
            return self.scorer.prompt_ids(prompt=item.prompt)
        return self.scorer.prompt_ids(messages=item.message_dicts())

    def check(self, item: EvalItem, task: Task, max_tokens: int) -> None:
        ids = self._prompt_ids(item)
        context = self.scorer.max_length
        if task.kind == "generate" and context and len(ids) + max_tokens > context:
            raise ConfigurationError(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is more than the "
                                     f"expert's context ({context} tokens); lower --max-tokens")

    async def generate(self, item: EvalItem, task: Task, max_tokens: int) -> dict[str, Any]:
        chat = self.settings.mode != "completions"
        text = await asyncio.to_thread(self.scorer.generate, prompt=None if chat else item.prompt,
                                       messages=item.message_dicts() if chat else None, max_tokens=max_tokens,
                                       stop=task.stop)
        return {"output": text}

    async def choice(self, item: EvalItem) -> dict[str, Any]:
        from .scoring import choice_record, forward_logprobs, letters_from_vocab

        def run() -> dict[str, float]:
            row = forward_logprobs(self.scorer, self._prompt_ids(item), [])[0]
            return letters_from_vocab(row, self.scorer.vocab, item.letters)

        return choice_record(await asyncio.to_thread(run), item.answer)

    async def loglik(self, item: EvalItem) -> dict[str, Any]:
        from .scoring import forward_logprobs

        return await asyncio.to_thread(local_loglik, self.scorer.vocab, item, self.scorer.name,
                                       lambda ids: forward_logprobs(self.scorer, self._prompt_ids(item), ids))


class WhiteBoxSystem(System):
    """Exact proxy tuning with the base model local (:class:`~blackbox_proxy.whitebox.WhiteBoxTuner`)."""

    name = "white-box"

    def __init__(self, white: Any, settings: Settings) -> None:
        self.white, self.settings = white, settings

    def _chat(self, item: EvalItem) -> list[dict[str, str]] | None:
        return item.message_dicts() if self.settings.mode != "completions" else None

    async def generate(self, item: EvalItem, task: Task, max_tokens: int) -> dict[str, Any]:
        s = self.settings
        [result] = await asyncio.to_thread(self.white.generate, [self._chat(item) or item.prompt], max_tokens=max_tokens,
                                           alpha=s.alpha, temperature=s.temperature, seed=s.seed,
                                           stop=list(task.stop) or None)
        return {"output": result.text, "finish_reason": result.finish_reason}

    def _logprobs(self, item: EvalItem, ids: Sequence[int]) -> Any:
        import torch

        chat = self._chat(item)
        lps = self.white.teacher_forced(None if chat else item.prompt, ids, messages=chat)
        return torch.log_softmax(self.white.tuned_scores(*lps, self.settings.alpha), dim=-1)

    async def choice(self, item: EvalItem) -> dict[str, Any]:
        from .scoring import choice_record, letters_from_vocab

        def run() -> dict[str, float]:
            return letters_from_vocab(self._logprobs(item, [])[0], self.white.vocab, item.letters)

        return choice_record(await asyncio.to_thread(run), item.answer)

    async def loglik(self, item: EvalItem) -> dict[str, Any]:
        return await asyncio.to_thread(local_loglik, self.white.vocab, item, "the white-box tokenizer",
                                       lambda ids: self._logprobs(item, ids))


def local_loglik(vocab: Any, item: EvalItem, who: str, logprobs_of: Callable[[list[int]], Any]) -> dict[str, Any]:
    """A loglik item's record from a local model: the reference in ``vocab``'s tokens and
    ``logprobs_of(ids)``, the model's next-token log distributions along them."""
    from .scoring import sequence_loglik

    ids = vocab.encode_bytes(item.reference.encode("utf-8"))
    if ids is None:
        raise ConfigurationError(f"{who} cannot tokenize the reference of item {item.id!r}")
    return loglik_record(sequence_loglik(logprobs_of(ids), ids), [vocab.bytes_of([i]) for i in ids])


def parse_systems(text: str | Sequence[str]) -> list[str]:
    """``"hosted,expert,per-step"`` -> the names, checked, in order, without repeats.

    >>> parse_systems("hosted, per-step,hosted")
    ['hosted', 'per-step']
    """
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    wrong = [n for n in names if n not in SYSTEMS]
    if wrong or not names:
        raise ConfigurationError(f"unknown system(s) {', '.join(map(repr, wrong)) or '(none given)'}; "
                                 f"pass a comma-separated list of {', '.join(SYSTEMS)}")
    return list(dict.fromkeys(names))


def _render(render: str, mode: str) -> str:
    """``auto`` follows the hosted prompt, as in the tuner: raw text in completions mode."""
    return "raw" if render == "auto" and mode == "completions" else render


@contextlib.asynccontextmanager
async def open_systems(names: Sequence[str], *, tuner: dict[str, Any], settings: Settings,
                       base: str | None = None) -> AsyncIterator[list[System]]:
    """Load what ``names`` need (one tuner for every API system; the small models once) and
    close it afterwards. ``tuner``: :class:`~blackbox_proxy.tuner.AsyncProxyTuner` keywords."""
    if "white-box" in names and not base:
        raise ConfigurationError("the white-box system needs the large model locally: pass --base MODEL")
    if any(n in API_SYSTEMS for n in names) and not tuner.get("model"):
        raise ConfigurationError(f"the {', '.join(n for n in names if n in API_SYSTEMS)} system(s) need the hosted "
                                 "model: pass --model NAME (and --base-url)")
    proxy = None
    try:
        if any(n in API_SYSTEMS for n in names):
            from ..hosts.client import HostedClient
            from ..tuner import AsyncProxyTuner

            # Reach the hosted API before loading models: a bad URL, key or model name fails at once.
            probe = HostedClient(**{k: tuner[k] for k in ("model", "base_url", "api_key", "mode", "dialect", "timeout",
                                                          "max_retries") if tuner.get(k) is not None})
            try:
                probe.check()
            finally:
                probe.close()
            proxy = AsyncProxyTuner(**tuner)
            await proxy.client.check()
            expert, anti = proxy.expert, proxy.anti_expert
        else:
            from ..local.scorer import load_small_models

            renders = [_render(tuner.get(k) or "auto", settings.mode) for k in ("expert_render", "anti_expert_render")]
            if tuner.get("expert_adapter"):
                renders = [next((r for r in renders if r != "auto"), "auto")] * 2
            expert, anti = load_small_models(expert=tuner.get("expert"), anti_expert=tuner.get("anti_expert"),
                                             expert_adapter=tuner.get("expert_adapter"), device=tuner.get("device"),
                                             expert_render=renders[0], anti_expert_render=renders[1])
        systems: list[System] = []
        for name in names:
            if name == "hosted":
                systems.append(HostedSystem(proxy, settings))
            elif name == "expert":
                systems.append(ExpertSystem(expert, settings))
            elif name == "white-box":
                from ..whitebox import WhiteBoxTuner

                white = WhiteBoxTuner(base=base, expert=expert, anti_expert=anti, device=tuner.get("device"))
                systems.append(WhiteBoxSystem(white, settings))
            else:
                systems.append(TunedSystem(name, proxy, settings, strategy=name, alpha=settings.alpha))
        yield systems
    finally:
        if proxy is not None:
            await proxy.close()
