"""Decoders built by hand for the decoder-level tests (no tuner, no HTTP).

A decoder is built whole from four values (what is asked, what the host allows, the scoring, the
prompt); :func:`build` makes them from a few keywords, with the same defaults the tests used before
the decoders were composed: a completions host that streams nothing, one choice per call, no
``logit_bias``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from blackbox_proxy.decoding import HostedPrompt, PerStepDecoder, ResampleDecoder, Scoring, SpeculativeDecoder
from blackbox_proxy.request import GenerationRequest
from blackbox_proxy.tokens.aligner import Aligner
from blackbox_proxy.types import HostCapabilities

STRATEGY = {PerStepDecoder: "per-step", SpeculativeDecoder: "speculative", ResampleDecoder: "resample"}


def build(cls: type, expert: Any, anti_expert: Any, vocab: Any, *, same_vocab: bool = True, prompt: str = "x",
          prompt_ids: Sequence[int] | None = None, mode: str = "completions", top_k: int = 20, max_choices: int = 1,
          logit_bias_cap: int = 0, streams: bool = False, end_ids: Sequence[int] = (), tail_draws: int | None = None,
          **options: Any) -> Any:
    """A ``cls`` decoder over scorer sessions ``expert``/``anti_expert`` on the small ``vocab``;
    ``same_vocab``: the hosted tokenizer is ``vocab`` (else bytes are aligned, hosted vocabulary
    unknown); ``prompt_ids``: token-id prompts (None: text); ``options``: GenerationRequest fields."""
    params = GenerationRequest.build(prompt=prompt, strategy=STRATEGY[cls], **options)
    host = HostCapabilities(mode=mode, top_k=top_k, max_choices=max_choices, logit_bias_cap=logit_bias_cap,
                            streams_logprobs=streams, end_ids=tuple(end_ids))
    scoring = Scoring(expert, anti_expert, Aligner(vocab, vocab if same_vocab else None), same_vocab=same_vocab,
                      alpha=params.alpha)
    hosted = HostedPrompt(text=prompt if mode == "completions" else None, messages=params.message_pairs(),
                          ids=tuple(prompt_ids) if prompt_ids is not None else None)
    extra = {"tail_draws": tail_draws} if tail_draws is not None else {}
    return cls(params, host=host, scoring=scoring, prompt=hosted, **extra)
