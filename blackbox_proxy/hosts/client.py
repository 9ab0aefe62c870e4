"""The hosted model behind an OpenAI-compatible API: sync and async clients over one base.

:class:`HostedClient` (``openai.OpenAI``) and :class:`AsyncHostedClient` (``openai.AsyncOpenAI``)
carry out the I/O steps of :class:`~.base.HostedBase`'s one call path (read the cache, call under
the retry policy with the whole-answer or the streamed reader, write the cache) and ask
``/v1/models`` once. Everything else (configuration, dialects, request building, parsing, the
modes) is the base's: ``base.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..errors import HostedAPIError
from ..types import HostedRequest, HostedResult
from . import streaming
from .base import HostedBase, Plan
from .dialects import DIALECTS
from .retry import async_retrying, retrying

__all__ = ["DIALECTS", "AsyncHostedClient", "HostedClient"]  # DIALECTS: for the CLI's --dialect


class HostedClient(HostedBase):
    """Synchronous client (``openai.OpenAI``). See the module docstring for the modes.

    Example::

        client = HostedClient(base_url="http://127.0.0.1:8000/v1", model="tiny", mode="completions")
        result = client.complete(HostedRequest(mode="completions", prompt="Hello", max_tokens=1, top_k=5))
        result.positions[0].candidates[0].data
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import openai

        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=self._api_key, timeout=self.timeout, max_retries=0
        )

    def _with_retries(self, fn: Callable[[], Any], accept: Callable[[Any], Any] | None = None) -> Any:
        """``fn()`` under the retry policy; ``accept(response)`` turns the answer into the result
        (an incomplete answer, :class:`HostedResponseError`, is asked again)."""
        return retrying(self._site(), self._rng)(lambda: accept(fn()) if accept is not None else fn())

    def check(self) -> None:
        """Ask ``/v1/models`` once: fail fast on a bad URL, key or model name; detect the dialect."""
        if self._checked:
            return
        try:
            models = self._with_retries(lambda: self._client.models.list())
        except HostedAPIError as exc:
            self._after_models_error(exc)
            return
        self._after_models(models)

    def complete(self, request: HostedRequest) -> list[HostedResult]:
        """One API call (more where the dialect must complete the answer); one
        :class:`HostedResult` per choice (``request.n`` of them)."""
        self.check()
        return self._run(self._answer(request))

    def complete_streamed(self, request: HostedRequest, watch: streaming.Watch) -> list[HostedResult]:
        """:meth:`complete`, streamed where :meth:`streams` says: ``watch(positions so far)`` after
        each event, True closes the stream (:mod:`~blackbox_proxy.hosts.streaming`)."""
        if not self.streams(request):
            return self.complete(request)
        self.check()
        try:
            return self._run(self._call(request, watch))
        except streaming.NoStreamedLogprobs:
            self._stop_streaming()
            return self.complete(request)

    def _run(self, plan: Plan) -> list[HostedResult]:
        value = None
        try:
            while True:
                value = self._carry_out(plan.send(value))
        except StopIteration as done:
            return done.value

    def _carry_out(self, step: tuple) -> Any:
        if step[0] == "get":
            return self.cache.get(step[1])
        if step[0] == "put":
            return self.cache.put(step[1], step[2])
        _, endpoint, kwargs, request, watch = step
        create = self._create(endpoint)
        if watch is None:
            return self._with_retries(lambda: create(**kwargs), lambda r: self._whole(endpoint, request, r))

        def attempt() -> streaming.Reader:
            reader, streamed = self._streamed(endpoint, request, watch)
            return streaming.read(reader, create(**kwargs, **streamed))

        return self._with_retries(attempt).outcome()

    def close(self) -> None:
        self._client.close()
        if self._own_cache:
            self.cache.close()


class AsyncHostedClient(HostedBase):
    """Asynchronous twin of :class:`HostedClient` (``openai.AsyncOpenAI``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import openai

        self._client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self._api_key, timeout=self.timeout, max_retries=0
        )

    async def _with_retries(self, fn: Callable[[], Any], accept: Callable[[Any], Any] | None = None) -> Any:
        """See :meth:`HostedClient._with_retries`."""
        async def attempt() -> Any:  # a coroutine function: tenacity awaits it
            response = await fn()
            return accept(response) if accept is not None else response

        return await async_retrying(self._site(), self._rng)(attempt)

    async def check(self) -> None:
        if self._checked:
            return
        try:
            models = await self._with_retries(lambda: self._client.models.list())
        except HostedAPIError as exc:
            self._after_models_error(exc)
            return
        self._after_models(models)

    async def complete(self, request: HostedRequest) -> list[HostedResult]:
        """See :meth:`HostedClient.complete`."""
        await self.check()
        return await self._run(self._answer(request))

    async def complete_streamed(self, request: HostedRequest, watch: streaming.Watch) -> list[HostedResult]:
        """See :meth:`HostedClient.complete_streamed`."""
        if not self.streams(request):
            return await self.complete(request)
        await self.check()
        try:
            return await self._run(self._call(request, watch))
        except streaming.NoStreamedLogprobs:
            self._stop_streaming()
            return await self.complete(request)

    async def _run(self, plan: Plan) -> list[HostedResult]:
        value = None
        try:
            while True:
                value = await self._carry_out(plan.send(value))
        except StopIteration as done:
            return done.value

    async def _carry_out(self, step: tuple) -> Any:
        if step[0] == "get":
            return await asyncio.to_thread(self.cache.get, step[1])
        if step[0] == "put":
            return await asyncio.to_thread(self.cache.put, step[1], step[2])
        _, endpoint, kwargs, request, watch = step
        create = self._create(endpoint)
        if watch is None:
            return await self._with_retries(lambda: create(**kwargs), lambda r: self._whole(endpoint, request, r))

        async def attempt() -> streaming.Reader:
            reader, streamed = self._streamed(endpoint, request, watch)
            return await streaming.read_async(reader, create(**kwargs, **streamed))

        return (await self._with_retries(attempt)).outcome()

    async def close(self) -> None:
        await self._client.close()
        if self._own_cache:
            self.cache.close()
