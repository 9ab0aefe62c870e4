"""One API round of a generation: ask the decoder's request, run the small models over the text
so far while the call is in flight (:meth:`~blackbox_proxy.decoding.base.DecoderBase.prefetch`),
and hand the answer back to the decoder. Sync and async twins, used by :mod:`blackbox_proxy.tuner`.

A context limit met after paid calls ends the generation there with ``finish_reason="length"``
(:func:`~blackbox_proxy.context_limits.stop_at_context`); before any paid call it is raised.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

from .context_limits import stop_at_context
from .decoding import DecoderBase
from .errors import ContextLimitError, HostedBadRequestError


def round_sync(client: Any, decoder: DecoderBase, pool: Executor) -> None:
    """One round with a :class:`~blackbox_proxy.hosts.client.HostedClient`; the prefetch runs in
    ``pool`` (one thread: torch releases the GIL) while this thread waits for the API."""
    paid = decoder.usage.api_calls > 0
    try:
        request = decoder.request()
        started = time.perf_counter()
        ahead = pool.submit(decoder.prefetch)
        try:
            results = client.complete(request)
        finally:
            ahead.result()  # the decoder is touched by one thread at a time
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
        results = await client.complete(request)
        paid = True
        await in_thread(decoder.observe, results, time.perf_counter() - started)
    except (ContextLimitError, HostedBadRequestError) as exc:
        stop_at_context(decoder, exc, paid)
