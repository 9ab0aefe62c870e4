"""``echo`` with ``logprobs`` on ``blackbox-proxy serve``'s completions route: the prompt's own
tokens with their tuned log-probabilities (teacher forcing), then what is generated after it.

lm-evaluation-harness's ``local-completions`` scores a continuation this way: it sends context +
continuation as the prompt (text or token ids) with ``echo: true``, ``logprobs``, and
``max_tokens`` 1 (0 in older versions) and reads ``token_logprobs`` / ``top_logprobs`` past the
context's tokens.

- The tokens are the hosted tokenizer's: the ids sent, or the text's canonical encoding; without
  the hosted tokenizer echo with logprobs is refused (:func:`~.tuned_bodies.check_asks`).
- The first token has no logprob (null, as OpenAI and vLLM answer), nor do tokens before the first
  that holds visible text (the small models need a non-empty context; in practice the first only).
- Every other token: its tuned log-probability under teacher forcing (:mod:`blackbox_proxy.decoding.forcing`:
  one hosted call per token, the per-step maths at temperature 1, exactly what ``blackbox-proxy
  eval`` reads on loglik items) and ``top_logprobs`` over the hosted candidates. A token outside
  the hosted top-k has no tuned probability: its ``token_logprob`` is null (its ``top_logprobs``
  still hold the candidates); a higher ``--top-k`` covers more.
- ``max_tokens`` > 0: the same per-step decoder generates after the prompt; those tokens follow
  with their logprobs (as without echo).
- Echo cannot know where a client's context ends: the small models see the first token as their
  prompt and the rest as its continuation. With raw rendering (the default in completions mode)
  that is the same text eval scores; small models rendering chat (``--expert-render chat``) see
  the first token alone as the user's turn, so score with raw rendering.

Left out: streaming, n > 1, stop strings with generation, hosts in chat modes (their answers
cannot be teacher-forced), strategies other than per-step (all refused with a 400).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..decoding.forcing import drive_async, generate_after_async, open_forcing
from ..types import GenerationResult
from .openai_http import APIError
from .served_logprobs import TokenLogprobs, from_forced, from_per_step


@dataclass(frozen=True)
class Echoed:
    """An echo answer: every token (the prompt's, then the generated ones) and ``result``, the
    generated part (its text, finish reason, and the usage of forcing and generation together)."""

    tokens: list[TokenLogprobs]
    result: GenerationResult


def prompt_ids(vocab: Any, prompt: str | tuple[int, ...]) -> list[int]:
    """The prompt's hosted token ids: those sent, or the text's canonical encoding."""
    if not isinstance(prompt, str):
        return list(prompt)
    ids = vocab.encode_bytes(prompt.encode("utf-8"))
    if ids is None:
        raise APIError(400, "the hosted tokenizer cannot spell this prompt as tokens; send token ids", param="prompt")
    return ids


def head_length(vocab: Any, ids: Sequence[int]) -> int:
    """How many leading tokens get no logprob: the first, and any more up to the first whose text
    is whole UTF-8 and not blank (the context the small models start from)."""
    for n in range(1, len(ids) + 1):
        try:
            if vocab.bytes_of(ids[:n]).decode("utf-8").strip():
                return n
        except UnicodeDecodeError:
            continue
    return len(ids)


async def echo(tuner: Any, prompt: str | tuple[int, ...], *, alpha: float, max_tokens: int, temperature: float,
               top_p: float, seed: int | None) -> Echoed:
    """Teacher-force ``prompt`` (see the module docstring), then generate ``max_tokens`` after it
    with the per-step strategy."""
    vocab = tuner.hosted_vocab
    ids = prompt_ids(vocab, prompt)
    head = head_length(vocab, ids)
    await tuner.client.check()
    forcing = await asyncio.to_thread(
        open_forcing, tuner, ids[head:], alpha=alpha, prompt=vocab.bytes_of(ids[:head]).decode("utf-8"),
        then=max_tokens, temperature=temperature, top_p=top_p, seed=seed, top_on_miss=True, hosted_prompt=ids[:head])
    try:
        await drive_async(tuner, forcing)
        generated = await generate_after_async(tuner, forcing) if max_tokens > 0 else None
    finally:
        forcing.close()
    forced = forcing.result()
    tokens = from_forced(forced.steps, [vocab.bytes_of([i]) for i in ids[:head]])
    if generated is None:
        return Echoed(tokens, GenerationResult(text="", finish_reason="length", usage=forced.usage))
    return Echoed(tokens + from_per_step(generated),
                  dataclasses.replace(generated, usage=forced.usage + generated.usage))
