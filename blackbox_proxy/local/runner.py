"""Local generation with logprobs: the engine behind ``blackbox-proxy serve-model``.

:class:`ModelRunner` holds one Hugging Face causal LM and generates from token ids: it draws
each token from the model's distribution under temperature, top-p and an optional logit bias
(:mod:`blackbox_proxy.maths.combiner` does the transforms and the draw), stops at an end token
or a stop string (:func:`blackbox_proxy.request.cut_at_stop`), and records for every step the
drawn token's logprob and the ``top_k`` most likely tokens. Requests are serialised by the
model's lock; the KV caches of recent contexts are kept so per-step clients (each request = the
previous one + one token) cost one token of compute.

Conventions (those of vLLM and OpenAI): reported logprobs are the model's raw distribution,
before temperature, top-p and bias; ``-inf`` is reported as OpenAI's ``-9999``; an end token is
recorded as the last step but is not part of the text.

Left out: HTTP and OpenAI's JSON shapes (:mod:`blackbox_proxy.apps.model_server`), batching
concurrent requests into one forward (the ``n`` samples of one request do share one), beam search
and repetition penalties.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigurationError
from ..maths.combiner import choose, top_p_filter, tuned_distribution
from ..request import cut_at_stop
from ..tokens.loaders import vocabulary_from_hf
from ..tokens.vocab import Vocabulary, common_prefix
from .engine import CachedContext, cache_length, model_lock, select_device


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass(frozen=True)
class Generation:
    tokens: tuple[Sampled, ...]
    text_ids: tuple[int, ...]  # generated ids that are part of the text (no end token)
    text: str
    finish_reason: str
    cached_prompt_tokens: int = 0  # prompt tokens read from a kept context's KV cache, not computed


class ModelRunner:
    """One local causal LM that generates with logprobs; requests are serialised by a lock.

    The KV caches of the last ``cache_slots`` contexts are kept; a request continues the one
    sharing its longest prefix, so per-step clients (each request = previous one + one token) cost
    one token of compute even when several clients interleave.

    ``logit_bias`` biases the draw; the reported logprobs are the model's own (as OpenAI and
    vLLM's default report them), or, with ``logprobs_after_bias``, those of the biased
    distribution (as hosts that report processed logprobs do: a stand-in for testing clients
    against both).
    """

    def __init__(self, model: Any, tokenizer: Any, *, name: str, cache_slots: int = 32,
                 logprobs_after_bias: bool = False) -> None:
        self.logprobs_after_bias = logprobs_after_bias
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        extra = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.vocab: Vocabulary = vocabulary_from_hf(tokenizer, end_ids=extra, name=name)
        self.lock = model_lock(model)  # shared with any Scorer on the same model object
        self.cache_slots = max(1, cache_slots)
        self.contexts: list[CachedContext] = []  # most recently used last
        self.max_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None

    @classmethod
    def from_pretrained(cls, path: str, *, name: str | None = None, device: str | None = None,
                        cache_slots: int = 32, logprobs_after_bias: bool = False) -> "ModelRunner":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        target = select_device(device)
        dtype = torch.float32 if target.type == "cpu" else "auto"
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(target)
        return cls(model, tokenizer, name=name or str(path).rstrip("/").split("/")[-1], cache_slots=cache_slots,
                   logprobs_after_bias=logprobs_after_bias)

    # ----- text helpers --------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        """The token as OpenAI prints it: its text, ``bytes:\\xNN...`` when not valid UTF-8,
        the literal text of a special token."""
        data = self.vocab.token_bytes[token_id] if token_id < self.vocab.size else None
        if data is None:
            return self.vocab.special_text.get(token_id, "")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def token_bytes(self, token_id: int) -> list[int] | None:
        data = self.vocab.token_bytes[token_id] if token_id < self.vocab.size else None
        return list(data) if data is not None else None

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt, add_special_tokens=True))

    def render_chat(self, messages: list[dict[str, str]], *, continue_final: bool,
                    add_generation_prompt: bool) -> list[int]:
        """The token ids of ``messages`` under the model's chat template; ConfigurationError
        when the model has none or the template refuses them."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigurationError(f"model {self.name} has no chat template; use /v1/completions")
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(
                clean,
                tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final,
                continue_final_message=continue_final,
            )
        except Exception as exc:  # noqa: BLE001 - jinja and template errors
            raise ConfigurationError(f"cannot apply the chat template: {exc}") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # ----- generation ----------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: list[str],
        top_k: int,
        n: int = 1,
        logit_bias: dict[int, float] | None = None,
    ) -> list[Generation]:
        """``n`` generations continuing ``prompt_ids``, drawn from one generator (seeded by
        ``seed``, else at random). ``n`` > 1 samples run as one batch (:meth:`_batch`); greedy
        ones are one generation repeated, since every copy would be the same."""
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        args = (max_tokens, temperature, top_p, stop, top_k, generator, logit_bias or {})
        with self.lock:
            if n == 1 or temperature == 0:
                return [self._one(prompt_ids, *args)] * n
            return self._batch(prompt_ids, n, *args)

    def prompt_logprobs(self, prompt_ids: list[int], top_k: int) -> tuple[Sampled, ...]:
        """For every prompt token after the first: its logprob given the tokens before it and the
        ``top_k`` most likely tokens there (what ``echo`` reports; the first token has none).
        One forward over the prompt."""
        if len(prompt_ids) < 2:
            return ()
        device = next(self.model.parameters()).device
        with self.lock, torch.no_grad():
            logits = self.model(torch.tensor([list(prompt_ids)], device=device)).logits[0, :-1]
        out = []
        for row, token in zip(logits, prompt_ids[1:]):  # row i predicts token i + 1
            logprobs = torch.log_softmax(row.float(), -1).cpu()
            top: tuple[tuple[int, float], ...] = ()
            if top_k > 0:
                values, indices = torch.topk(logprobs, min(top_k, logprobs.shape[0]))
                top = tuple((int(i), _finite(float(v))) for v, i in zip(values, indices))
            out.append(Sampled(int(token), _finite(float(logprobs[token])), top))
        return tuple(out)

    def _one(self, prompt_ids, max_tokens, temperature, top_p, stop, top_k, generator, logit_bias) -> Generation:
        ids = list(prompt_ids)
        out: list[Sampled] = []
        text_ids: list[int] = []
        finish = "length"
        context = self._context_for(ids)
        cached = min(common_prefix(context.ids, ids), len(ids))
        logprobs = self._extend(context, ids)
        for _ in range(max_tokens):
            token = self._step(logprobs, temperature, top_p, top_k, generator, logit_bias, out)
            if self._ends(token, text_ids, stop):
                finish = "stop"
                break
            ids.append(token)
            if len(out) < max_tokens:
                logprobs = self._extend(context, ids)
        return dataclasses.replace(self._generation(out, text_ids, stop, finish), cached_prompt_tokens=cached)

    def _batch(self, prompt_ids, n, max_tokens, temperature, top_p, stop, top_k, generator,
               logit_bias) -> list[Generation]:
        """``n`` samples as the rows of one batch: the prompt's cache (kept context) copied ``n``
        times, then one forward per step over the rows still going. Every row has the same length,
        so no padding or attention mask is needed; a row that ends leaves the batch. Each row's
        draws are those of :meth:`_one` (same transforms, same stop rules), in another order."""
        context = self._context_for(list(prompt_ids))
        cached = min(common_prefix(context.ids, prompt_ids), len(prompt_ids))
        first = self._extend(context, list(prompt_ids))
        cache = copy.deepcopy(context.cache)
        extra = cache_length(cache) - len(prompt_ids)
        if extra:  # exactly the prompt (a context may hold scored paths past it)
            cache.crop(-extra)
        cache.batch_repeat_interleave(n)
        device = next(self.model.parameters()).device
        steps: list[list[Sampled]] = [[] for _ in range(n)]
        text_ids: list[list[int]] = [[] for _ in range(n)]
        finish = ["length"] * n
        live = list(range(n))  # the rows of the batch, by sample index
        logprobs = first.unsqueeze(0).expand(n, -1)
        for _ in range(max_tokens):
            keep, feed = [], []
            for row, i in enumerate(live):
                token = self._step(logprobs[row], temperature, top_p, top_k, generator, logit_bias, steps[i])
                if self._ends(token, text_ids[i], stop):
                    finish[i] = "stop"
                    continue
                keep.append(row)
                feed.append(token)
            if not keep or len(steps[live[keep[0]]]) >= max_tokens:
                break
            if len(keep) < len(live):
                cache.batch_select_indices(torch.tensor(keep, device=device))
                live = [live[row] for row in keep]
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor(feed, device=device)[:, None], cache=cache, use_cache=True)
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            logprobs = torch.log_softmax(out.logits[:, -1].float(), -1)
        return [dataclasses.replace(self._generation(steps[i], text_ids[i], stop, finish[i]), cached_prompt_tokens=cached)
                for i in range(n)]

    def _ends(self, token: int, text_ids: list[int], stop: list[str]) -> bool:
        """Take ``token`` into ``text_ids`` unless it is an end token; whether the text ends here
        (an end token, or a stop string completed)."""
        if token in self.vocab.end_ids:
            return True
        text_ids.append(token)
        return bool(stop) and cut_at_stop(self.vocab.bytes_of(text_ids).decode("utf-8", errors="replace"),
                                          stop) is not None

    def _generation(self, steps: list[Sampled], text_ids: list[int], stop: list[str], finish: str) -> Generation:
        text = self.vocab.bytes_of(text_ids).decode("utf-8", errors="replace")
        cut = cut_at_stop(text, stop)
        return Generation(tuple(steps), tuple(text_ids), text if cut is None else cut, finish)

    def _step(self, logprobs, temperature, top_p, top_k, generator, logit_bias, out: list[Sampled]) -> int:
        """Draw one token from ``logprobs`` (``[V]``, the model's raw distribution) and record it
        in ``out`` with the ``top_k`` most likely tokens. On the CPU, where the seeded generator
        lives (a CUDA tensor cannot be drawn from with a CPU generator)."""
        logprobs = logprobs.cpu()
        biased = logprobs
        if logit_bias:  # like OpenAI: biases the draw, not the reported logprobs
            biased = logprobs.clone()
            for token_id, bias in logit_bias.items():
                biased[token_id] += bias
            if self.logprobs_after_bias:
                logprobs = torch.log_softmax(biased, dim=-1)
        token = self._draw(biased, temperature, top_p, generator)
        top: tuple[tuple[int, float], ...] = ()
        if top_k > 0:
            values, indices = torch.topk(logprobs, min(top_k, logprobs.shape[0]))
            top = tuple((int(i), _finite(float(v))) for v, i in zip(values, indices))
        out.append(Sampled(token, _finite(float(logprobs[token])), top))
        return token

    def _context_for(self, ids: list[int]) -> CachedContext:
        """A kept context that ``ids`` extends (the longest such), else a new slot while there is
        room, else the one sharing the longest prefix (cropped). Clients that interleave thus keep
        their own contexts instead of overwriting each other's."""
        def shared(context: CachedContext) -> int:
            return common_prefix(context.ids, ids)

        extended = [c for c in self.contexts if c.ids and shared(c) == len(c.ids)]
        if extended:
            best = max(extended, key=lambda c: len(c.ids))
        elif len(self.contexts) < self.cache_slots:
            best = CachedContext(self.model)
        else:
            best = max(self.contexts, key=shared)
        if best in self.contexts:
            self.contexts.remove(best)
        self.contexts.append(best)
        return best

    @staticmethod
    def _extend(context: CachedContext, ids: list[int]) -> torch.Tensor:
        return context.extend_to(ids)

    @staticmethod
    def _draw(logprobs: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
        probs = tuned_distribution(logprobs, temperature)  # one-hot on the argmax at temperature 0
        if temperature == 0:
            return choose(probs, generator)
        if top_p < 1:  # here top_p may be 0 (OpenAI allows it: the top token only)
            probs = top_p_filter(probs, top_p)
        # Always a generator draw, even a certain one (choose() skips those): a seeded request
        # draws the same tokens as it did from earlier versions of this server.
        return int(torch.multinomial(probs.float(), 1, generator=generator))

def _finite(logprob: float) -> float:
    """JSON has no -inf: impossible tokens get OpenAI's -9999 sentinel."""
    return logprob if math.isfinite(logprob) else -9999.0
