"""Streamed chunk calls: SSE with logprobs, read as it arrives, closed when the decoder says so.

A speculative chunk call drafts up to N tokens, but the walk ends at the first draft the tuned
distribution rejects; without streaming the client waits for all N. Streamed, each event's
positions go to a ``watch`` callable as soon as they arrive (the decoder scores and walks them,
in another thread: :mod:`blackbox_proxy.decoding.driver`); when it answers True the stream is closed and
the next call can start. The call's result is then the answer so far: the positions read, and
``finish_reason`` None when the stream was closed before the host finished.

- **Where**: completions and chat-prefix, one choice, on hosts whose dialect streams logprobs
  (``streams_logprobs``: OpenAI, vLLM and this project's servers) or when the user asks for it
  (``stream_chunks=True``). Hosts that need more than one call to read an answer (llama.cpp's
  hidden end, its lossy drawn tokens) are not streamed.
- **Fallback**: a host that streams text without logprobs is noted once (a warning) and asked
  again without streaming; that client streams no more.
- **Retries**: a failure before the first position is retried like any call (``retry.py``); a
  stream that breaks after some positions keeps them (``finish_reason`` None, as if closed):
  nothing paid for is thrown away. A stream that ends without a ``finish_reason`` was cut short
  and is a broken one too.
- **Cache**: the answer read, finished or closed early, is stored under the request's key like
  a whole answer. A closed one is a shorter chunk: a walk that uses it again from the cache
  (resume, a rerun) either stops inside it, as the first one did, or walks all of it and asks
  the next chunk from there; both are ordinary speculative chunks.
- **Billing**: a closed stream's prompt tokens are the host's usage when it streams usage with
  every event (vLLM's ``continuous_usage_stats``, asked for on that dialect), else the length of
  a token-id prompt, else 0 (unknown); its completion tokens are the positions read. A host may
  bill a few more: those it generated before it noticed the close.

This module reads one streamed attempt (:class:`Reader`, :func:`read`, :func:`read_async`); the
client's one call path (cache, retries, cache) runs it like a whole answer.

What it leaves out: several choices per streamed call (multi-draft chunks are whole answers).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from ..errors import HostedResponseError
from ..types import HostedRequest, HostedResult, HostedUsage
from .wire import answer_from_json

logger = logging.getLogger(__name__)

Watch = Callable[[HostedResult], bool]  # positions so far -> True: close the stream
_COMPLETION_LISTS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


class NoStreamedLogprobs(Exception):
    """The host streamed text without logprobs: this client stops streaming (see the module)."""


class StreamedAnswer:
    """One streamed choice, gathered into the shape of the non-streamed answer (its JSON)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.head: dict[str, Any] = {}
        self.text = ""
        self.lists: dict[str, list[Any]] = {name: [] for name in _COMPLETION_LISTS}
        self.content: list[Any] = []  # chat: logprobs.content entries
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.closed_early = False
        self.repeats = 0  # events that repeated the one before, dropped
        self._last_choice: Any = None

    @property
    def positions(self) -> int:
        return len(self.content) if self.endpoint == "chat" else len(self.lists["tokens"])

    def add(self, chunk: dict[str, Any]) -> bool:
        """Take one SSE chunk (a dict); True when it added positions."""
        before = self.positions
        for name in ("id", "created", "model", "system_fingerprint"):
            if name in chunk and name not in self.head:
                self.head[name] = chunk[name]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            logprobs = choice.get("logprobs") or {}
            if logprobs and choice == self._last_choice:  # the same token with the same logprobs again
                self.repeats += 1
                if self.repeats == 1:
                    logger.warning("the hosted stream repeated an event (the same token and logprobs); the "
                                   "repeat was dropped")
                continue
            self._last_choice = choice
            if self.endpoint == "chat":
                self.text += (choice.get("delta") or {}).get("content") or ""
                self.content += logprobs.get("content") or []
            else:
                self.text += choice.get("text") or ""
                tokens = logprobs.get("tokens") or []
                for name in _COMPLETION_LISTS:
                    values = logprobs.get(name)
                    self.lists[name] += list(values) if values is not None else [None] * len(tokens)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        if self.text and not self.positions:
            raise NoStreamedLogprobs()
        return self.positions > before

    def body(self) -> dict[str, Any]:
        """The answer so far as the non-streamed JSON (``finish_reason`` None when closed early)."""
        finish = None if self.closed_early else self.finish
        if self.endpoint == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text},
                      "logprobs": {"content": self.content}, "finish_reason": finish}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": self.text, "logprobs": dict(self.lists), "finish_reason": finish}
            kind = "text_completion"
        out = dict(self.head, object=kind, choices=[choice])
        if self.usage is not None:
            out["usage"] = self.usage
        return out


def snapshot(client: Any, answer: StreamedAnswer, request: HostedRequest) -> HostedResult:
    """The one result of the answer so far, parsed as a whole answer is (``client.parse_all``)."""
    parsed = answer_from_json(answer.endpoint, answer.body())  # no JSON round trip on every event
    result = client.parse_all(answer.endpoint, parsed, request)[0]
    if answer.closed_early or answer.usage is None:
        result = _with_estimated_usage(result, answer, request)
    return result


def _with_estimated_usage(result: HostedResult, answer: StreamedAnswer, request: HostedRequest) -> HostedResult:
    prompt = result.usage.prompt_tokens
    if not prompt and isinstance(request.prompt, tuple):
        prompt = len(request.prompt)
    usage = HostedUsage(prompt, max(result.usage.completion_tokens, answer.positions), result.usage.cached_prompt_tokens)
    return HostedResult(result.text, result.positions, result.finish_reason, usage, result.extra_calls)


def chunk_dict(chunk: Any) -> dict[str, Any]:
    """An SDK stream chunk as a plain dict."""
    return chunk.to_dict() if hasattr(chunk, "to_dict") else dict(chunk)


_TRANSPORTS = ("httpx", "httpx2", "httpcore", "httpcore2", "h11", "openai")  # openai 3.x reads with httpx2, a fork


def broken_stream(exc: BaseException) -> bool:
    """A stream that failed while being read: the HTTP stack's errors (whichever httpx the SDK
    uses), a socket's, or an event that is not JSON; not an error of this package."""
    root = type(exc).__module__.split(".")[0]
    return root in _TRANSPORTS or isinstance(exc, (OSError, json.JSONDecodeError))


def as_connection_error(exc: BaseException, url: str) -> BaseException:
    """A read failure before any position, as the error the retry policy retries."""
    import openai

    try:  # the HTTP package the SDK is built on (openai 3.x: httpx2, a fork of httpx)
        import httpx2 as http
    except ImportError:
        import httpx as http
    if isinstance(exc, (openai.APIError, json.JSONDecodeError)):  # an event that is not JSON: the answer's fault
        return exc
    return openai.APIConnectionError(message=f"the stream broke ({type(exc).__name__})",
                                     request=http.Request("POST", url))


class Reader:
    """What both clients do with each chunk of one streamed attempt: gather it, and hand the
    positions so far to the watch; :meth:`feed` answers True when the stream is to be closed. A
    watch that raises is kept in ``failure`` and raised by the client after the stream is closed
    (it is not the host's failure, so it is never retried)."""

    def __init__(self, client: Any, endpoint: str, request: HostedRequest, watch: Watch) -> None:
        self.client, self.request, self.watch = client, request, watch
        self.answer = StreamedAnswer(endpoint)
        self.last: HostedResult | None = None  # the positions last handed to the watch
        self.failure: BaseException | None = None

    def feed(self, chunk: Any) -> bool:
        if not self.answer.add(chunk_dict(chunk)):
            return False
        try:
            result = snapshot(self.client, self.answer, self.request)
        except HostedResponseError:
            if self.last is None:
                raise  # nothing walked yet: the retry policy asks again
            return self._keep("an event the parser refused")
        self.last = result
        try:
            stop = self.watch(result)
        except Exception as exc:  # noqa: BLE001 - raised again once the stream is closed
            self.failure, stop = exc, True
        if stop:
            self.answer.closed_early = True
        return stop

    def broke(self, exc: BaseException) -> None:
        """A read failure: keep what was walked, or raise it for the retry policy (raised as it
        is when it is not the stream that broke)."""
        if not broken_stream(exc):
            raise exc
        if self.last is None:
            raise as_connection_error(exc, self.client.base_url) from exc
        self._keep(type(exc).__name__)

    def ended(self) -> None:
        """The stream ran out: without a ``finish_reason`` it was cut short (a proxy or the host
        dropped the rest), which is a broken stream, not an answer without logprobs."""
        if self.answer.finish is not None or self.answer.closed_early or self.failure is not None:
            return
        if self.last is None:
            raise as_connection_error(EOFError("the stream ended before the host finished"), self.client.base_url)
        self._keep("it ended before the host finished")

    def _keep(self, why: str) -> bool:
        logger.info("the hosted stream broke after %d tokens (%s); they are kept", len(self.last.positions), why)
        self.answer.closed_early = True
        self.broken = True
        return True

    broken = False

    def outcome(self) -> tuple[list[HostedResult], str | None]:
        """After the stream is closed: the watch's failure raised, else :meth:`results`."""
        if self.failure is not None:
            raise self.failure
        return self.results()

    def results(self) -> tuple[list[HostedResult], str | None]:
        """The call's results, and the JSON to cache (None: not cacheable)."""
        if self.broken:
            last = self.last
            return [HostedResult(last.text, last.positions, None, last.usage, last.extra_calls)], None
        try:
            result = snapshot(self.client, self.answer, self.request)
        except HostedResponseError:
            if self.last is None:
                raise
            self._keep("the whole answer was refused")
            return self.results()
        return [result], json.dumps(self.answer.body())


def read(reader: Reader, stream: Any) -> Reader:
    """Read one streamed attempt's ``stream`` (an SDK ``Stream``) into ``reader`` until its watch
    closes it, the host finishes, or the stream breaks (what was walked is kept, see
    :meth:`Reader.broke`); the stream is closed in every case."""
    ended = False
    try:
        for chunk in stream:
            if reader.feed(chunk):
                break
        else:
            ended = True
    except Exception as exc:
        reader.broke(exc)
    finally:
        stream.close()
    if ended:
        reader.ended()
    return reader


async def read_async(reader: Reader, opening: Any) -> Reader:
    """The async twin of :func:`read`: ``opening`` is the SDK call that opens the stream."""
    stream = await opening
    ended = False
    try:
        async for chunk in stream:
            if reader.feed(chunk):
                break
        else:
            ended = True
    except Exception as exc:
        reader.broke(exc)
    finally:
        await stream.close()
    if ended:
        reader.ended()
    return reader
