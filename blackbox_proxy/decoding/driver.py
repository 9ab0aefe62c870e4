"""Driving a decoder: one API round at a time, and what a context limit does to a generation.

A round asks the decoder's request, runs the small models over the text so far while the call
is in flight (:meth:`~.base.Decoder.prefetch`), walks a streamed chunk as it arrives (the
decoder's ``take``, through :class:`_Watch`), and hands the answer back to the decoder. Sync and
async twins (:func:`round_sync`, :func:`round_async`), used by :mod:`blackbox_proxy.tuner` and
teacher forcing.

Context limits: a generation that cannot fit is refused before the first paid call
(:func:`check_fits`, used by the tuner for the expert, the anti-expert and the hosted model when
its context is known); one that outgrows a context after paid calls ends there with
``finish_reason="length"`` and the text so far (:func:`stop_at_context`).

Left out: where the lengths come from (the scorers' ``max_length``, the hosted ``max_model_len``
found by ``hosts/discover.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

from ..errors import ConfigurationError, ContextLimitError, HostedBadRequestError
from .base import Decoder

logger = logging.getLogger(__name__)


def check_fits(who: str, prompt_tokens: int, max_tokens: int, context: int | None) -> None:
    """Refuse before the first paid call a generation that cannot fit ``who``'s context."""
    if context and prompt_tokens + max_tokens > context:
        room = context - prompt_tokens
        fix = f"pass max_tokens {room} or less" if room > 0 else "shorten the prompt"
        raise ConfigurationError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is more than "
                                 f"the context of {who} ({context} tokens); {fix}")


# How hosts word a text that outgrew their context (OpenAI, DeepSeek, Mistral, vLLM, llama.cpp,
# TGI and Together, Gemini, Anthropic): any one of these, lower-cased, in a 400.
CONTEXT_WORDS = ("context length", "context size", "context window", "maximum context", "maximum model length",
                 "max_model_len", "prompt is too long", "too many tokens", "exceeds the maximum number of tokens",
                 "tokens + `max_new_tokens` must be")


def is_context_limit(exc: BaseException) -> bool:
    """Whether ``exc`` says a text outgrew a model's context: a small model's
    (:class:`ContextLimitError`) or the hosted one's, as hosts word it (:data:`CONTEXT_WORDS`)."""
    if isinstance(exc, ContextLimitError):
        return True
    text = str(exc).lower()
    return isinstance(exc, HostedBadRequestError) and any(words in text for words in CONTEXT_WORDS)


def stop_at_context(decoder: Decoder, exc: BaseException, paid: bool, outgrew: bool = False) -> None:
    """End ``decoder`` with ``finish_reason="length"`` (the text so far) when ``exc`` is a context
    limit reached after paid calls; otherwise re-raise it. A host's 400 counts as one when it says
    so in any known wording, or, whatever it says, when it carried a longer text than any the
    host answered in this generation (``outgrew``). The decoders change no
    state before :meth:`observe` appends, so the text so far is consistent."""
    if not paid or not (is_context_limit(exc) or (outgrew and isinstance(exc, HostedBadRequestError))):
        raise exc
    logger.warning("the generation reached a model's context limit after %d tokens; it stops there "
                   "(finish_reason length): %s", decoder.generated, exc)
    decoder.stop("length")


class _Watch:
    """What a streamed chunk call hands each event's positions to (:mod:`~blackbox_proxy.hosts.streaming`):
    the decoder's ``take`` (:meth:`~.walks.draft.DraftWalk.take`) runs in the worker
    (``submit``), one job at a time, on the newest positions, while the client reads on; a job
    that found the end of the walk closes the stream at the next event. Never blocks the reader."""

    def __init__(self, decoder: Decoder, submit: Callable[..., Any]) -> None:
        self.decoder, self.submit = decoder, submit
        self.job: Any = None  # a concurrent.futures.Future or an asyncio future
        self.over = False

    answered = False  # the host's answer began: its call is paid for

    def __call__(self, result: Any) -> bool:
        self.answered = True
        if self.job is not None and self.job.done():
            self.over = bool(self.job.result())  # a failure in the walk is raised here, in the reader
            self.job = None
        if not self.over and self.job is None:
            self.job = self.submit(self.decoder.take, result)
        return self.over

    def wait(self) -> None:
        """Let the last job end (the decoder is touched by one thread at a time)."""
        if self.job is not None:
            self.job.result()


def round_sync(client: Any, decoder: Decoder, pool: Executor) -> None:
    """One round with a :class:`~blackbox_proxy.hosts.client.HostedClient`; the prefetch runs in
    ``pool`` (one thread: torch releases the GIL) while this thread waits for the API."""
    paid = decoder.usage.api_calls > 0
    watch = request = None
    try:
        request = decoder.request()
        started = time.perf_counter()
        ahead = pool.submit(decoder.prefetch)
        watch = _Watch(decoder, pool.submit)
        try:
            results = client.complete_streamed(request, watch) if request.stream else client.complete(request)
        finally:
            ahead.result()  # the decoder is touched by one thread at a time
            watch.wait()
        paid = True
        decoder.answered(request)
        decoder.observe(results, time.perf_counter() - started)
    except ContextLimitError as exc:  # a small model's: raised after this round's call was answered
        stop_at_context(decoder, exc, paid or (watch is not None and watch.answered))
    except HostedBadRequestError as exc:
        stop_at_context(decoder, exc, paid, request is not None and decoder.outgrew(request))


async def round_async(client: Any, decoder: Decoder,
                      in_thread: Callable[..., Awaitable[Any]]) -> None:
    """One round with an :class:`~blackbox_proxy.hosts.client.AsyncHostedClient`; local work
    (observe) runs through ``in_thread`` so the event loop stays free. No prefetch here: the
    async tuner's forwards are shared with concurrent generations (the scoring queue), and a
    prefetch in that queue made the batches, hence the last float bits and a near tie, depend on
    timing; a repeated batch then sent a request its response cache did not hold. Concurrent
    generations already overlap scoring with each other's API waits."""
    paid = decoder.usage.api_calls > 0
    watch = request = None
    try:
        request = decoder.request()
        started = time.perf_counter()
        if request.stream:
            watch = _Watch(decoder, lambda fn, *args: asyncio.ensure_future(in_thread(fn, *args)))
            try:
                results = await client.complete_streamed(request, watch)
            finally:
                if watch.job is not None:
                    await watch.job
        else:
            results = await client.complete(request)
        paid = True
        decoder.answered(request)
        await in_thread(decoder.observe, results, time.perf_counter() - started)
    except ContextLimitError as exc:  # a small model's: raised after this round's call was answered
        stop_at_context(decoder, exc, paid or (watch is not None and watch.answered))
    except HostedBadRequestError as exc:
        stop_at_context(decoder, exc, paid, request is not None and decoder.outgrew(request))
