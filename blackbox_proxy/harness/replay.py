"""A record-and-replay hosted API on loopback: the yardstick for a remote API's latency and bill.

A hosted stand-in on the same machine shares the client's CPU, so wall time against it says
nothing about a remote API. :class:`ReplayHost` is a real OpenAI-style HTTP server on 127.0.0.1
that answers from a recording of the real server's answers, each released when a latency
model says a remote API would have finished it::

    t(answer of T tokens) = ttft · (1 + jitter · u) + per_token · (T − 1),   u ~ U(−1, 1), seeded

- **record**: with ``upstream=URL`` a request that is not recorded yet goes to the real server
  (without ``stream``); its answer is stored byte for byte and returned at once.
- **store**: a JSON-lines file of answers keyed by request (:mod:`.recording`); a streamed
  request is answered from the non-streamed recording; headers, the API key among them, are
  never stored.
- **replay**: a non-streamed answer is the recorded bytes; a streamed one (``"stream": true``) is
  SSE as OpenAI sends it, synthesised one token per chunk with that token's logprobs, chunk j
  released at ttft + per_token · j, then ``data: [DONE]``.
- **miss**: a request not in the recording (and no upstream) is a 400 with code ``replay_miss``
  that names the route and says how to record it.

Only generation routes (``…/completions``) are delayed; ``/v1/models`` and ``/tokenize`` answer at
once. With a :class:`~.prompt_cache.PromptCache`, every answer's usage reports the prompt tokens a
provider would bill as cached. Left out: prefill time that grows with the prompt, rate limits
and failures (``tests/faults.py`` injects those).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..apps.openai_http import SSE_DONE, ServerThread, sse_event
from ..errors import ConfigurationError
from .prompt_cache import PromptCache
from .recording import STREAM_FIELDS, Answer, Recording, canonical_body, request_key  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

MISS_CODE = "replay_miss"
_COMPLETION_LOGPROBS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
UPSTREAM_TIMEOUT = 600.0  # seconds: a CPU stand-in can take minutes on a long answer


@dataclass(frozen=True)
class LatencyModel:
    """How long a remote API takes: ``ttft`` seconds to the first token, ``per_token`` for each
    further one; each call's ttft is scaled by 1 + ``jitter`` · u, u ~ U(−1, 1) drawn in call
    order from ``seed``.

    >>> round(LatencyModel(ttft=0.4, per_token=0.015, jitter=0).seconds(11), 6)
    0.55
    """

    ttft: float = 0.4
    per_token: float = 0.015
    jitter: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("ttft", "per_token"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
                raise ConfigurationError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if not 0 <= self.jitter < 1:
            raise ConfigurationError(f"jitter must be a fraction of ttft in [0, 1), got {self.jitter!r}")

    def first_token(self, u: float = 0.0) -> float:
        return self.ttft * (1 + self.jitter * u)

    def seconds(self, tokens: int, u: float = 0.0) -> float:
        """When the last of ``tokens`` tokens is out; u = 0 gives the mean (one plain call)."""
        return self.first_token(u) + self.per_token * max(0, tokens - 1)


# ----- streaming: SSE synthesised from a non-streamed answer --------------------------------------


def _choices(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))


def _entries(choice: dict[str, Any]) -> list[Any] | None:
    """The per-token logprobs entries of a choice (chat ``content`` or completions ``tokens``)."""
    logprobs = choice.get("logprobs") or {}
    return logprobs.get("content") if "content" in logprobs else logprobs.get("tokens")


def answer_tokens(answer: dict[str, Any]) -> int:
    """Tokens of the longest choice (an API generates choices side by side): from the logprobs,
    else the completion tokens of the usage shared among the choices."""
    counts = [_entries(c) for c in _choices(answer)]
    if counts and all(c is not None for c in counts):
        return max(len(c) for c in counts)
    usage = answer.get("usage") or {}
    return -(-int(usage.get("completion_tokens") or 0) // max(1, len(counts)))


def _fit(pieces: list[str], text: str) -> list[str]:
    """``pieces`` made to join to ``text``: each kept while the text goes on with it, then empty,
    the rest of the text on the last (a stop sequence cut the text, or bytes were missing)."""
    out, at, broken = [], 0, False
    for piece in pieces:
        broken = broken or not text.startswith(piece, at)
        out.append("" if broken else piece)
        at += 0 if broken else len(piece)
    out[-1] += text[at:]
    return out


def _completion_pieces(choice: dict[str, Any]) -> list[str]:
    """The text cut at each token's ``text_offset`` (counted from the first token's)."""
    text = choice.get("text") or ""
    logprobs = choice.get("logprobs") or {}
    offsets, n = logprobs.get("text_offset") or [], len(logprobs.get("tokens") or [])
    cuts = [0]
    for offset in offsets[1:n]:
        cuts.append(min(len(text), max(cuts[-1], offset - offsets[0])))
    cuts += [cuts[-1]] * (n - len(cuts)) + [len(text)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def _chat_pieces(choice: dict[str, Any], entries: list[dict[str, Any]]) -> list[str]:
    """Each token's text from its ``bytes`` (a character split over tokens comes out whole on the
    token that completes it; an end token, bytes null, is empty)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pieces = [decoder.decode(bytes(e.get("bytes") or b"")) for e in entries]
    pieces[-1] += decoder.decode(b"", final=True)
    return _fit(pieces, (choice.get("message") or {}).get("content") or "")


def _choice_deltas(choice: dict[str, Any], chat: bool, fallback_tokens: int) -> list[tuple[int, dict[str, Any]]]:
    """(token position, choice part of a chunk) for one choice streamed one token per chunk."""
    index, finish = choice.get("index", 0), choice.get("finish_reason")
    entries, logprobs = _entries(choice) or [], choice.get("logprobs") or {}
    if not entries:  # no logprobs asked: the whole text at once, when its last token is out
        text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
        pieces, parts, first = [text or ""], [None], max(0, fallback_tokens - 1)
    elif chat:
        pieces, parts, first = _chat_pieces(choice, entries), [{"content": [e]} for e in entries], 0
    else:
        pieces, first = _completion_pieces(choice), 0
        parts = [{name: (logprobs.get(name) or [None] * len(pieces))[j: j + 1] for name in _COMPLETION_LOGPROBS}
                 for j in range(len(pieces))]
    last = first + len(pieces) - 1
    if not chat:
        return [(first + j, {"index": index, "text": piece, "logprobs": part,
                             "finish_reason": finish if first + j == last else None})
                for j, (piece, part) in enumerate(zip(pieces, parts))]
    return ([(0, {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})]
            + [(first + j, {"index": index, "delta": {"content": piece}, "logprobs": part, "finish_reason": None})
               for j, (piece, part) in enumerate(zip(pieces, parts))]
            + [(last, {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish})])


def stream_events(path: str, answer: dict[str, Any], *, include_usage: bool = False,
                  continuous_usage: bool = False) -> list[tuple[int, str]]:
    """The SSE events of a recorded answer streamed as OpenAI and vLLM do, one token per chunk;
    each with the token position whose time releases it. Joined, the chunks' texts are the
    answer's text and their logprobs its logprobs; the last event is ``data: [DONE]``.
    ``continuous_usage`` (vLLM's ``continuous_usage_stats``): every chunk carries the usage so
    far, the prompt's tokens and one completion token per position out (over all choices)."""
    chat = path.rstrip("/").endswith("chat/completions")
    head = {k: answer[k] for k in ("id", "created", "model", "system_fingerprint") if k in answer}
    head["object"] = "chat.completion.chunk" if chat else "text_completion"
    tokens = answer_tokens(answer)
    parts = sorted(((position, i, part) for choice in _choices(answer)
                    for i, (position, part) in enumerate(_choice_deltas(choice, chat, tokens))),
                   key=lambda x: (x[0], x[2]["index"], x[1]))
    prompt_tokens = int((answer.get("usage") or {}).get("prompt_tokens") or 0)
    details = (answer.get("usage") or {}).get("prompt_tokens_details")
    choices = max(1, len(_choices(answer)))

    def chunk(position: int, part: dict[str, Any]) -> dict[str, Any]:
        out = dict(head, choices=[part])
        if continuous_usage:
            done = min(tokens, position + 1) * choices
            out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": done,
                            "total_tokens": prompt_tokens + done}
            if details is not None:
                out["usage"]["prompt_tokens_details"] = details
        return out

    events = [(position, sse_event(chunk(position, part))) for position, _, part in parts]
    last = max((position for position, _ in events), default=0)
    if include_usage and answer.get("usage") is not None:
        events.append((last, sse_event(dict(head, choices=[], usage=answer["usage"]))))
    events.append((last, SSE_DONE))
    return events


# ----- the HTTP app -------------------------------------------------------------------------------


@dataclass
class ReplayStats:
    """What a replay host did: answers replayed, recorded from upstream, and requests missed."""

    replayed: int = 0
    recorded: int = 0
    missed: list[str] = field(default_factory=list)  # "METHOD path" of each miss


def _root(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def _error(status: int, message: str, code: str | None = None, type_: str = "invalid_request_error") -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}}, status_code=status)


def create_replay_app(recording: Recording, *, latency: LatencyModel | None = None, upstream: str | None = None,
                      stats: ReplayStats | None = None, miss_hint: str | None = None,
                      prompt_cache: PromptCache | None = None) -> Any:
    """The replay host's ASGI app (see the module docstring). ``latency`` None: no delay.
    ``upstream``: the real server's base URL, to record misses from. ``prompt_cache``: report the
    cached prompt tokens a provider would bill (:mod:`.prompt_cache`) in every answer's usage."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    rng = random.Random(latency.seed if latency else 0)
    stats = stats if stats is not None else ReplayStats()
    hint = miss_hint or "start the replay host with upstream=<the real server's base URL> to record it"

    async def forward(request: Request, path: str, body: Any, streamed: bool, raw: bytes) -> Answer | Response:
        content = json.dumps(body).encode() if streamed else raw  # record the non-streamed answer
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        try:
            async with httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT) as http:
                reply = await http.request(request.method, _root(upstream) + path, content=content, headers=headers)
        except httpx.HTTPError as exc:
            return _error(502, f"the real server at {upstream} cannot be reached ({type(exc).__name__}); "
                               "check that it is running", type_="server_error")
        try:
            answer = Answer(reply.status_code, reply.headers.get("content-type", "application/json"),
                            reply.content.decode("utf-8"))
        except UnicodeDecodeError:
            return Response(reply.content, status_code=reply.status_code, media_type=reply.headers.get("content-type"))
        if reply.status_code < 500:  # a server failure is not an answer worth replaying
            recording.add(request.method, path, body, answer)
            stats.recorded += 1
        return answer

    async def handle(request: Request) -> Response:
        arrived = time.monotonic()
        raw = await request.body()
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        streamed = isinstance(parsed, dict) and bool(parsed.get("stream"))
        body = canonical_body(raw)
        answer = recording.get(request_key(request.method, path, body))
        fresh = False
        if answer is None and upstream:
            found = await forward(request, path, body, streamed, raw)
            if not isinstance(found, Answer):
                return found
            answer, fresh = found, True
        if answer is None:
            stats.missed.append(f"{request.method} {path}")
            model = parsed.get("model") if isinstance(parsed, dict) else None
            return _error(400, f"this request is not in the recording {recording.path} ({request.method} {path}, "
                               f"model {model!r}, {len(recording)} answers recorded); {hint}", code=MISS_CODE)
        if not fresh:
            stats.replayed += 1
        generation = request.method == "POST" and request.url.path.endswith("/completions") and answer.status == 200
        delayed = latency is not None and not fresh  # a fresh answer already took the real server's time
        if generation and prompt_cache is not None:
            answer = _with_cached_tokens(answer, prompt_cache, parsed)
        if not generation or not (streamed or delayed):
            return Response(answer.body.encode("utf-8"), status_code=answer.status, media_type=answer.content_type)
        recorded = json.loads(answer.body)
        u = rng.uniform(-1.0, 1.0)  # one draw per generation call, in arrival order

        async def wait_until(due: float) -> None:
            await asyncio.sleep(max(0.0, arrived + due - time.monotonic()))

        if not streamed:
            await wait_until(latency.seconds(answer_tokens(recorded), u))
            return Response(answer.body.encode("utf-8"), status_code=answer.status, media_type=answer.content_type)
        options = parsed.get("stream_options")
        usage = isinstance(options, dict) and bool(options.get("include_usage"))
        continuous = isinstance(options, dict) and bool(options.get("continuous_usage_stats"))
        events = stream_events(path, recorded, include_usage=usage, continuous_usage=continuous)

        async def release() -> AsyncIterator[str]:
            for position, event in events:
                if delayed:
                    await wait_until(latency.first_token(u) + latency.per_token * position)
                if await request.is_disconnected():
                    return  # the client closed the stream (a speculative chunk rejected a draft)
                yield event

        return StreamingResponse(release(), media_type="text/event-stream")

    return Starlette(routes=[Route("/{path:path}", handle, methods=["GET", "POST"])])


def _with_cached_tokens(answer: Answer, cache: PromptCache, body: Any) -> Answer:
    """``answer`` with the cached prompt tokens ``cache`` gives in its usage (OpenAI's field)."""
    data = json.loads(answer.body)
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return answer
    cached = cache.cached(body, int(usage.get("prompt_tokens") or 0))
    data["usage"] = dict(usage, prompt_tokens_details=dict(usage.get("prompt_tokens_details") or {},
                                                           cached_tokens=cached))
    return Answer(answer.status, answer.content_type, json.dumps(data))


class ReplayHost(ServerThread):
    """The replay app on 127.0.0.1 in a background thread; a context manager. ``base_url`` ends
    in ``/v1``; ``stats`` counts what it did.

    Example::

        with ReplayHost("answers.jsonl", upstream="http://127.0.0.1:8000/v1") as host:  # record
            ProxyTuner(base_url=host.base_url, ...).generate(...)
        with ReplayHost("answers.jsonl", latency=LatencyModel(ttft=0.4)) as host:       # replay
            ProxyTuner(base_url=host.base_url, ...).generate(...)
    """

    def __init__(self, recording: Recording | str | Path, *, latency: LatencyModel | None = None,
                 upstream: str | None = None, port: int = 0, miss_hint: str | None = None,
                 prompt_cache: PromptCache | None = None) -> None:
        self.recording = recording if isinstance(recording, Recording) else Recording(recording)
        self.latency = latency
        self.stats = ReplayStats()
        super().__init__(create_replay_app(self.recording, latency=latency, upstream=upstream, stats=self.stats,
                                           miss_hint=miss_hint, prompt_cache=prompt_cache), host="127.0.0.1",
                         port=port)
