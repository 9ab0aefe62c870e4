"""White-box proxy tuning: all three models local and sharing one vocabulary (Liu et al. 2024 §2).

At every position, over the whole vocabulary,

    scores = log p_L + alpha * (log p_E - log p_A),    p~ = softmax(scores / T)

(the paper adds raw logits; log-softmax differs from them by a per-position constant, so the
distribution is the same). This is the exact reference the black-box strategies approximate,
and a mode users run when they do have the large model locally (``--strategy white-box --base``).

Prompts are batched with left padding; each model keeps one KV cache for the batch and takes one
token per row per step. Sampling draws every row from its own generator seeded with ``seed``, so
a prompt's text does not depend on the other prompts of its batch. Vocabularies that differ only
by padding rows of the output layer (a model padded to a multiple of 64, say) are cut to the
shared tokenizer's size, as the paper's code did; different tokenizers are refused.

The arithmetic (proxy scores, temperature, top-p, the draw) is :mod:`blackbox_proxy.maths.combiner`'s,
the same functions the black-box strategies use, so the two can only differ in their inputs.

What it leaves out: a small model whose template differs from the base's sees its own rendering
(``render``), the base sees the raw prompt; no speculative or per-step machinery is involved; the
distances used to compare it with the black-box strategies (:mod:`blackbox_proxy.maths.metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import ConfigurationError, TokenizerMismatchError
from .local.scorer import Scorer
from .maths import combiner
from .request import GenerationRequest, cut_at_stop
from .types import GenerationResult, Usage


class _Batch:
    """One model's KV cache over a left-padded batch of rows."""

    def __init__(self, scorer: Scorer, rows: list[list[int]], size: int) -> None:
        self.scorer = scorer
        self.size = size
        self.model = scorer.model
        width = max(len(r) for r in rows)
        self.pad = [width - len(r) for r in rows]
        device = scorer.device
        self.ids = torch.tensor([[0] * p + r for p, r in zip(self.pad, rows)], dtype=torch.long, device=device)
        self.mask = torch.tensor([[0] * p + [1] * len(r) for p, r in zip(self.pad, rows)], dtype=torch.long,
                                 device=device)
        self.cache: Any = None

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        with torch.inference_mode(), self.scorer.forward_context():
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                             cache=self.cache if self.cache is not None else DynamicCache(), use_cache=True)
        self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        return torch.log_softmax(out.logits[:, -1, : self.size].float(), dim=-1)

    def start(self) -> torch.Tensor:
        """log P(next | prompt) per row, ``[rows, V]`` (the shared ids only)."""
        return self._run(self.ids)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (``[rows]``); log P(next | ...)."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return self._run(tokens[:, None])


class WhiteBoxTuner:
    """Exact proxy tuning with the base model local (same tokenizer as the small models).

    Args:
        base: the large model (name/path or :class:`Scorer`), rendered raw by default.
        anti_expert: the small model before tuning (name/path or :class:`Scorer`).
        expert: the small model after tuning; or ``expert_adapter``, a LoRA over ``anti_expert``.

    Example::

        tuner = WhiteBoxTuner(base="./base-7b", expert="./tuned-small", anti_expert="./small")
        [result] = tuner.generate(["Question: 2+3?\\nAnswer:"], max_tokens=16)
    """

    def __init__(self, *, base: Any, anti_expert: Any, expert: Any = None, expert_adapter: str | None = None,
                 device: str | None = None, base_render: str = "raw", expert_render: str = "auto",
                 anti_expert_render: str = "auto") -> None:
        from .local.scorer import load_scorer, load_small_models

        self.base = load_scorer(base, device=device, render=base_render, role="base")
        self.expert, self.anti_expert = load_small_models(
            expert=expert, anti_expert=anti_expert, expert_adapter=expert_adapter, device=device,
            expert_render=expert_render, anti_expert_render=anti_expert_render,
        )
        for other in (self.expert, self.anti_expert):
            if not self.base.vocab.same_as(other.vocab):
                raise TokenizerMismatchError(
                    f"the white-box strategy needs one tokenizer for all three models; {self.base.name!r} and "
                    f"{other.name!r} differ ({self.base.vocab.size} vs {other.vocab.size} ids). Use a black-box "
                    "strategy (--strategy per-step or speculative), which aligns different tokenizers through bytes"
                )
        self.vocab = self.base.vocab
        self.size = self.vocab.size  # logits are cut to the tokenizer's ids (padding rows dropped)

    # ----- exact distributions -------------------------------------------------------------------
    def tuned_scores(self, lp_l: torch.Tensor, lp_e: torch.Tensor, lp_a: torch.Tensor, alpha: float) -> torch.Tensor:
        """log p_L + alpha (log p_E - log p_A) over the shared ids, ``[..., V]`` (the combiner's
        proxy scores, with the whole vocabulary as the candidates)."""
        return combiner.proxy_scores(lp_l, lp_e.double() - lp_a.double(), alpha)

    def teacher_forced(self, prompt: str | None, continuation_ids: Sequence[int], *,
                       messages: Sequence[dict[str, str]] | None = None) -> tuple[torch.Tensor, ...]:
        """log p_L, log p_E, log p_A of the next token at every position of ``continuation_ids``
        (and one past its end) given ``prompt`` (or chat ``messages``, each model's chat template):
        three tensors ``[len + 1, V]`` (one forward each)."""
        out = []
        for scorer in (self.base, self.expert, self.anti_expert):
            prompt_ids = scorer.prompt_ids(prompt=prompt, messages=messages)
            ids = torch.tensor([prompt_ids + list(continuation_ids)], device=scorer.device)
            with torch.inference_mode(), scorer.forward_context():
                logits = scorer.model(input_ids=ids).logits[0, len(prompt_ids) - 1:, : self.size].float()
            out.append(torch.log_softmax(logits, dim=-1))
        return tuple(out)

    # ----- generation ----------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[Any] | None = None, *, request: GenerationRequest | None = None,
                 **options: Any) -> list[GenerationResult]:
        """Proxy-tuned text for each prompt (one batch; a prompt is text, or chat messages that
        each model renders with its chat template); greedy at temperature 0. Options are
        :class:`~blackbox_proxy.request.GenerationRequest` fields (``max_tokens``, ``alpha``,
        ``temperature``, ``top_p``, ``seed``, ``stop``), checked as the black-box tuners check
        them, or one ``request`` (its prompt, unless ``prompts`` are given, and its options)."""
        return self._generate(prompts, request, options)[0]

    def generate_ids(self, prompts: Sequence[str], **options: Any) -> list[list[int]]:
        """The generated token ids per prompt (end token excluded); arguments as :meth:`generate`."""
        return self._generate(prompts, None, options)[1]

    @staticmethod
    def _requests(prompts: str | Sequence[str] | None, request: GenerationRequest | None,
                 options: dict[str, Any]) -> list[GenerationRequest]:
        """One checked :class:`GenerationRequest` per prompt, sharing the options."""
        if request is not None and options:
            raise ConfigurationError("pass either request=GenerationRequest(...) or options, not both")
        if request is not None:
            options = request.model_dump(include={"max_tokens", "alpha", "temperature", "top_p", "seed", "stop",
                                                  "strategy", "chunk", "samples", "drafts", "tail_calls"},
                                         exclude_defaults=True)
            prompts = [request.prompt if request.prompt is not None else request.message_dicts()] \
                if prompts is None else prompts
        prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
        if not prompts:
            raise ConfigurationError("pass one or more non-empty prompts (text, or chat messages)")
        black_box = sorted(set(options) & {"strategy", "chunk", "samples", "drafts", "tail_calls"})
        if black_box:
            raise ConfigurationError("the white-box strategy decodes the exact distribution token by token; leave out "
                                     f"the black-box strategies' options ({', '.join(black_box)})")
        return [GenerationRequest.build(prompt=p, **options) if isinstance(p, str) or p is None
                else GenerationRequest.build(messages=p, **options) for p in prompts]

    def _generate(self, prompts: str | Sequence[str] | None, request: GenerationRequest | None,
                  options: dict[str, Any]) -> tuple[list[GenerationResult], list[list[int]]]:
        requests = self._requests(prompts, request, options)
        first = requests[0]
        max_tokens, alpha, temperature, top_p, seed = (first.max_tokens, first.alpha, first.temperature, first.top_p,
                                                       first.seed)
        stops = list(first.stop)
        batches = [_Batch(s, [s.prompt_ids(prompt=r.prompt, messages=r.message_dicts()) for r in requests], self.size)
                   for s in (self.base, self.expert, self.anti_expert)]
        for b in batches:
            longest = b.ids.shape[1] + max_tokens
            if b.scorer.max_length and longest > b.scorer.max_length:
                raise ConfigurationError(f"prompt + max_tokens is {longest} tokens for {b.scorer.name}, whose context is "
                                         f"{b.scorer.max_length}; lower max_tokens or shorten the prompt")
        generators = []
        for _ in requests:
            g = torch.Generator()
            g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
            generators.append(g)
        rows = len(requests)
        tokens: list[list[int]] = [[] for _ in range(rows)]
        finish: list[str | None] = [None] * rows
        texts: list[str] = [""] * rows
        lps = [b.start() for b in batches]
        for _ in range(max_tokens):
            scores = self.tuned_scores(*lps, alpha)
            chosen = []
            for r in range(rows):
                if finish[r] is not None:
                    chosen.append(0)
                    continue
                probs = combiner.tuned_distribution(scores[r], temperature, top_p)
                token = combiner.choose(probs, generators[r])
                chosen.append(token)
                if token in self.vocab.end_ids:
                    finish[r] = "stop"
                    continue
                tokens[r].append(token)
                texts[r] = self.vocab.bytes_of(tokens[r]).decode("utf-8", errors="replace")
                cut = cut_at_stop(texts[r], stops)
                if cut is not None:
                    texts[r] = cut
                    finish[r] = "stop"
                elif len(tokens[r]) >= max_tokens:
                    finish[r] = "length"
            if all(f is not None for f in finish):
                break
            step = torch.tensor(chosen, dtype=torch.long)
            lps = [b.step(step.to(b.scorer.device)) for b in batches]
        settings = {"strategy": "white-box", "alpha": alpha, "temperature": temperature, "top_p": top_p,
                    "max_tokens": max_tokens, "seed": seed, "base": self.base.name, "expert": self.expert.name,
                    "anti_expert": self.anti_expert.name}
        results = [GenerationResult(text=texts[r], finish_reason=finish[r] or "length",
                                    usage=Usage(generated_tokens=len(tokens[r])), trace=(), settings=settings)
                   for r in range(rows)]
        return results, tokens
