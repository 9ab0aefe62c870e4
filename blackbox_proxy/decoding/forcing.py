"""Teacher forcing: the tuned log-probability of each token of a given text (the per-step maths).

At each position the hosted API is asked for its top-k candidates C after the text so far (one
call per token, as the per-step strategy makes them), the small models score C, and the tuned
distribution at temperature 1 (DESIGN.md §2.1, the :mod:`~blackbox_proxy.maths.combiner` maths),

    log p^(v) = log_softmax over C of ( logprob_L(v) + alpha · (log P_E(v) − log P_A(v)) ),

is read at the reference token, which is then appended whatever was offered. A reference token
outside C is a *miss*: it has no tuned probability (``logprob`` None, never a made-up number)
and the text goes on with it appended; so is one whose tuned probability is 0 (no evidence from
either small model). Every position also keeps the tuned distribution over C (``top``).

The reference is hosted token ids when the hosted vocabulary is known (the text's canonical
encoding, or the ids given), else bytes: the longest candidate that begins the remaining bytes,
and on a miss the next whole character.

:class:`TeacherForcing` does no I/O (``request`` / ``observe``, as the decoders);
:func:`teacher_force` (sync tuner) and :func:`teacher_force_async` drive it. ``blackbox-proxy
eval``'s loglik items use it, and ``blackbox-proxy serve``'s ``echo``, which then lets the same
per-step decoder generate after the forced text (:func:`generate_after_async`).

:func:`forced_step` works on a per-step decoder through its public parts: the candidates its
prompt can carry (``decoder.prompt.consistent``), its :class:`~.scoring.Scoring` and
``decoder.append``, as the fidelity harness does.

Left out: scoring every position from one hosted ``echo`` call (most hosted APIs refuse ``echo``
with logprobs).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError, ContextLimitError, HostedBadRequestError
from ..types import Candidate, GenerationResult, HostedRequest, HostedResult, Usage
from .driver import stop_at_context

__all__ = ["ForcedStep", "ForcedText", "TeacherForcing", "drive_async", "forced_step", "generate_after_async",
           "open_forcing", "teacher_force", "teacher_force_async"]


@dataclass(frozen=True)
class ForcedStep:
    """One teacher-forced position: ``logprob`` of the reference token under the tuned
    distribution (None: a miss), the candidate appended, why it missed, and ``top``, the tuned
    distribution over the candidates as (candidate, log-probability) pairs, best first."""

    logprob: float | None
    appended: Candidate
    miss: str = ""
    top: tuple[tuple[Candidate, float], ...] = ()


def forced_step(decoder: Any, candidates: Sequence[Candidate], remaining: bytes, target: tuple[int, bytes] | None,
                alpha: float, *, top_on_miss: bool = False) -> ForcedStep:
    """Score ``candidates`` at the decoder's position, read the tuned log-probability of the
    reference token and append it. The reference token is ``target`` (its hosted id and bytes,
    when the hosted vocabulary is known) or else the longest candidate whose bytes begin
    ``remaining``; a miss without a hosted vocabulary appends the next whole character.
    ``top_on_miss``: score the candidates on a miss too (for ``top``; one more forward each)."""
    import torch

    from ..maths import combiner
    from .prefix import is_utf8

    cands, _ = decoder.prompt.consistent(decoder.prefix, list(candidates))
    hit: int | None = None
    if target is not None:
        target_id, target_bytes = target
        hit = next((i for i, c in enumerate(cands) if not c.is_end and (
            c.token_id == target_id if c.token_id is not None else c.data == target_bytes)), None)
        fallback = Candidate(text=target_bytes.decode("utf-8", errors="replace"), data=target_bytes,
                             logprob=-math.inf, token_id=target_id)
    else:
        best = [(len(c.data), i) for i, c in enumerate(cands) if not c.is_end and c.data and remaining.startswith(c.data)]
        hit = max(best)[1] if best else None
        width = next((n for n in range(1, 5) if is_utf8(remaining[:n])), 1)
        fallback = Candidate(text=remaining[:width].decode("utf-8", errors="replace"), data=remaining[:width],
                             logprob=-math.inf)
    if hit is None and not (cands and top_on_miss):
        decoder.append(fallback)
        return ForcedStep(None, fallback, "not among the candidates" if cands else "no candidates")
    hosted = torch.tensor([c.logprob for c in cands], dtype=torch.float64)
    if alpha == 0:
        scores = hosted
    else:
        [offsets] = decoder.scoring.score([(decoder.prefix, cands)])
        delta = torch.tensor(offsets.delta, dtype=torch.float64)
        scores = combiner.proxy_scores(hosted, delta, alpha)
    logprobs = torch.log_softmax(scores, dim=0).tolist()
    top = tuple(sorted(zip(cands, logprobs), key=lambda pair: -pair[1]))
    if hit is None:
        decoder.append(fallback)
        return ForcedStep(None, fallback, "not among the candidates", top)
    decoder.append(cands[hit])
    if not math.isfinite(logprobs[hit]):
        return ForcedStep(None, cands[hit], "tuned probability 0 (no evidence from the small models)", top)
    return ForcedStep(logprobs[hit], cands[hit], "", top)


@dataclass(frozen=True)
class ForcedText:
    """A forced reference: its steps (one per reference token) and the hosted API's usage."""

    steps: tuple[ForcedStep, ...]
    usage: Usage

    @property
    def logprobs(self) -> list[float | None]:
        return [s.logprob for s in self.steps]

    @property
    def pieces(self) -> list[bytes]:
        """Each reference token's bytes."""
        return [s.appended.data for s in self.steps]

    @property
    def misses(self) -> list[str]:
        return [s.miss for s in self.steps if s.miss]


class TeacherForcing:
    """Teacher forcing of ``reference`` after a per-step decoder's prompt; no I/O (see the
    module docstring). Drive it with ``while not f.done: f.observe(client.complete(f.request())[0])``
    and :meth:`close` it (its decoder's small-model sessions) afterwards.

    Args:
        decoder: a fresh per-step decoder whose prompt is the context (:func:`open_forcing`).
        reference: the bytes to force.
        ids: the reference as hosted token ids (their bytes are ``reference``), or None.
        vocab: the hosted vocabulary (needed with ``ids``).
        alpha: the tuning strength of the distribution read.
        top_on_miss: keep the tuned distribution at a miss too (see :func:`forced_step`).
    """

    def __init__(self, decoder: Any, reference: bytes, *, ids: Sequence[int] | None, vocab: Any,
                 alpha: float, top_on_miss: bool = False) -> None:
        if ids is not None and (vocab is None or vocab.bytes_of(ids) != reference):
            raise ConfigurationError("the reference ids do not spell the reference bytes; pass ids=None")
        self.decoder = decoder
        self.remaining = reference
        self.ids = list(ids) if ids is not None else None
        self.vocab = vocab
        self.alpha = alpha
        self.top_on_miss = top_on_miss
        self.steps: list[ForcedStep] = []
        self.usage = Usage()

    @property
    def done(self) -> bool:
        return not self.remaining

    def request(self) -> HostedRequest:
        """The hosted request for the next position (the per-step decoder's: one token, top-k)."""
        return self.decoder.request()

    def observe(self, result: HostedResult, api_seconds: float = 0.0) -> ForcedStep:
        """Read the API's answer to :meth:`request` (which took ``api_seconds``): score, read the
        reference token, append it."""
        started = time.perf_counter()
        candidates = result.positions[0].candidates if result.positions else ()
        i = len(self.steps)
        target = (self.ids[i], self.vocab.bytes_of([self.ids[i]])) if self.ids is not None else None
        step = forced_step(self.decoder, candidates, self.remaining, target, self.alpha, top_on_miss=self.top_on_miss)
        if not step.appended.data:  # cannot happen with whole candidates; never loop forever
            raise ConfigurationError(f"teacher forcing made no progress at reference token {i}")
        self.remaining = self.remaining[len(step.appended.data):]
        self.steps.append(step)
        self.usage = self.usage + Usage.of_call(result, api_seconds, scoring_seconds=time.perf_counter() - started)
        return step

    def result(self) -> ForcedText:
        return ForcedText(tuple(self.steps), self.usage)

    def close(self) -> None:
        self.decoder.scoring.close()


def open_forcing(tuner: Any, reference: str | bytes | Sequence[int], *, alpha: float = 1.0,
                 prompt: str | None = None, messages: Any = None, then: int = 0, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, top_on_miss: bool = False,
                 hosted_prompt: Sequence[int] | None = None) -> TeacherForcing:
    """A :class:`TeacherForcing` of ``reference`` (text, bytes, or hosted token ids) after
    ``prompt`` or ``messages``, on a fresh per-step decoder of ``tuner`` (either twin; its
    sessions open: close it). ``then``: tokens the decoder may generate after the reference, at
    ``temperature`` / ``top_p`` / ``seed`` (:func:`generate_after_async`). The tuner's checks apply
    (mode, context lengths for the reference plus ``then``). Without the hosted vocabulary a text
    reference is forced by bytes (see the module docstring); ids need it. ``top_on_miss``: see
    :func:`forced_step`. ``hosted_prompt``: the prompt's hosted ids as a client sent them (sent
    as they are, after the tokenizer's prefix ids, when the tuner sends token-id prompts).
    """
    vocab = tuner.hosted_vocab
    if isinstance(reference, (list, tuple)):
        if vocab is None:
            raise ConfigurationError("a reference given as token ids needs the hosted tokenizer: pass "
                                     "hosted_tokenizer=... (--hosted-tokenizer), or the reference as text")
        ids: list[int] | None = list(reference)
        data = vocab.bytes_of(ids)
    else:
        data = reference.encode("utf-8") if isinstance(reference, str) else bytes(reference)
        ids = vocab.encode_bytes(data) if vocab is not None else None
    steps = len(ids) if ids is not None else len(data.decode("utf-8", errors="replace"))
    decoder = tuner.decoder(prompt=prompt, messages=messages, max_tokens=steps + max(1, then), alpha=alpha,
                            temperature=temperature, top_p=top_p, seed=seed, strategy="per-step",
                            hosted_ids=hosted_prompt)
    return TeacherForcing(decoder, data, ids=ids, vocab=vocab, alpha=alpha, top_on_miss=top_on_miss)


def teacher_force(tuner: Any, reference: str | bytes | Sequence[int], *, alpha: float = 1.0,
                  prompt: str | None = None, messages: Any = None) -> ForcedText:
    """The tuned log-probability of each token of ``reference`` after ``prompt`` (or
    ``messages``), with a :class:`~blackbox_proxy.tuner.ProxyTuner`: one hosted call per token.

    Example::

        forced = teacher_force(tuner, " jumps over the lazy dog.", prompt="The quick brown fox")
        print(sum(lp for lp in forced.logprobs if lp is not None), forced.misses)
    """
    tuner.client.check()
    forcing = open_forcing(tuner, reference, alpha=alpha, prompt=prompt, messages=messages)
    try:
        while not forcing.done:
            started = time.perf_counter()
            [result] = tuner.client.complete(forcing.request())
            forcing.observe(result, time.perf_counter() - started)
    finally:
        forcing.close()
    return forcing.result()


async def drive_async(tuner: Any, forcing: TeacherForcing) -> None:
    """Run ``forcing`` to its end with an :class:`~blackbox_proxy.tuner.AsyncProxyTuner` (local
    scoring in a worker thread)."""
    while not forcing.done:
        started = time.perf_counter()
        [result] = await tuner.client.complete(forcing.request())
        await asyncio.to_thread(forcing.observe, result, time.perf_counter() - started)


async def teacher_force_async(tuner: Any, reference: str | bytes | Sequence[int], *, alpha: float = 1.0,
                              prompt: str | None = None, messages: Any = None) -> ForcedText:
    """:func:`teacher_force` with an :class:`~blackbox_proxy.tuner.AsyncProxyTuner`."""
    await tuner.client.check()
    forcing = await asyncio.to_thread(open_forcing, tuner, reference, alpha=alpha, prompt=prompt, messages=messages)
    try:
        await drive_async(tuner, forcing)
    finally:
        forcing.close()
    return forcing.result()


async def generate_after_async(tuner: Any, forcing: TeacherForcing) -> GenerationResult:
    """After a finished forcing, let its per-step decoder generate the ``then`` tokens it was
    opened with (the tuner's generation loop: a context limit ends it with ``finish_reason``
    "length"). The result's ``text``, ``trace`` and ``usage`` are the generated part's only."""
    decoder = forcing.decoder
    forced = len(decoder.prefix.data)
    while not decoder.done:
        try:
            hosted_request = decoder.request()
            started = time.perf_counter()
            results = await tuner.client.complete(hosted_request)
            await asyncio.to_thread(decoder.observe, results, time.perf_counter() - started)
        except (ContextLimitError, HostedBadRequestError) as exc:
            stop_at_context(decoder, exc, paid=True)  # the forcing's calls were paid
    result = decoder.result()
    return dataclasses.replace(result, text=decoder.prefix.data[forced:].decode("utf-8", errors="replace"))
