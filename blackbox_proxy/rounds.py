"""One API round of a generation: ask the decoder's request, run the small models over the text
so far while the call is in flight (:meth:`~blackbox_proxy.decoding.base.DecoderBase.prefetch`),
walk a streamed chunk as it arrives (the decoder's ``take``, through :class:`_Watch`), and hand
the answer back to the decoder. Sync and async twins, used by :mod:`blackbox_proxy.tuner`.

A context limit met after paid calls ends the generation there with ``finish_reason="length"``
(:func:`~blackbox_proxy.context_limits.stop_at_context`); before any paid call it is raised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

from .context_limits import stop_at_context
from .decoding import DecoderBase
from .errors import ContextLimitError, HostedBadRequestError


class _Watch:
    """What a streamed chunk call hands each event's positions to (:mod:`~blackbox_proxy.hosts.streaming`):
    the decoder's :meth:`~blackbox_proxy.decoding.streamed.StreamedWalk.take` runs in the worker
    (``submit``), one job at a time, on the newest positions, while the client reads on; a job
    that found the end of the walk closes the stream at the next event. Never blocks the reader."""

    def __init__(self, decoder: DecoderBase, submit: Callable[..., Any]) -> None:
        self.decoder, self.submit = decoder, submit
        self.job: Any = None  # a concurrent.futures.Future or an asyncio future
        self.over = False

    def __call__(self, result: Any) -> bool:
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


def round_sync(client: Any, decoder: DecoderBase, pool: Executor) -> None:
    """One round with a :class:`~blackbox_proxy.hosts.client.HostedClient`; the prefetch runs in
    ``pool`` (one thread: torch releases the GIL) while this thread waits for the API."""
    paid = decoder.usage.api_calls > 0
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
        decoder.observe(results, time.perf_counter() - started)
    except (ContextLimitError, HostedBadRequestError) as exc:
        stop_at_context(decoder, exc, paid)


async def round_async(client: Any, decoder: DecoderBase,
                      in_thread: Callable[..., Awaitable[Any]]) -> None:
    """One round with an :class:`~blackbox_proxy.hosts.client.AsyncHostedClient`; local work
    (observe) runs through ``in_thread`` so the event loop stays free. No prefetch here: the
    async tuner's forwards are shared with concurrent generations (the scoring queue), and a
    prefetch in that queue made the batches, hence the last float bits and a near tie, depend on
    timing; a repeated batch then sent a request its response cache did not hold. Concurrent
    generations already overlap scoring with each other's API waits."""
    paid = decoder.usage.api_calls > 0
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
        await in_thread(decoder.observe, results, time.perf_counter() - started)
    except (ContextLimitError, HostedBadRequestError) as exc:
        stop_at_context(decoder, exc, paid)
