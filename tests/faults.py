"""Fault injection in front of a real app: an ASGI wrapper that fails some requests on purpose.

Used only to test the client's retries; the answers that do get through come from the real
model server underneath.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter

KINDS = ("429", "500", "timeout", "truncated")


class FaultyApp:
    """Fails a fraction ``rate`` of ``/v1/`` requests, each with a kind drawn from ``kinds``:

    - ``429``: rate limited, with ``retry-after`` (seconds);
    - ``500``: a server error;
    - ``timeout``: waits ``hang`` seconds (longer than the client's timeout) before answering;
    - ``truncated``: the real answer, cut in half (a 200 whose JSON does not parse);
    - ``no-logprobs``: the real answer with every ``logprobs`` removed (a valid but useless 200);
    - ``echo-key``: a 400 whose message repeats the request's Authorization header.
    """

    def __init__(self, app, *, rate: float, seed: int = 0, kinds=KINDS, hang: float = 2.0,
                 retry_after: str = "0.05", paths=("/v1/completions", "/v1/chat/completions", "/v1/models")) -> None:
        self.app = app
        self.rate = rate
        self.rng = random.Random(seed)
        self.kinds = tuple(kinds)
        self.hang = hang
        self.retry_after = retry_after
        self.paths = tuple(paths)
        self.counts: Counter = Counter()
        self.script: list[str] = []  # kinds to use first, in order, before drawing at random

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        self.counts["requests"] += 1
        if self.script:
            kind = self.script.pop(0)
        elif self.rng.random() < self.rate:
            kind = self.rng.choice(self.kinds)
        else:
            kind = "ok"
        self.counts[kind] += 1
        if kind == "ok":
            return await self.app(scope, receive, send)
        if kind == "429":
            return await _json(send, 429, {"error": {"message": "Rate limit reached", "type": "rate_limit"}},
                               [(b"retry-after", self.retry_after.encode())])
        if kind == "500":
            return await _json(send, 500, {"error": {"message": "The server had an error", "type": "server_error"}})
        if kind == "timeout":
            await asyncio.sleep(self.hang)
            return await _json(send, 504, {"error": {"message": "too late", "type": "server_error"}})
        if kind == "echo-key":
            auth = dict(scope["headers"]).get(b"authorization", b"").decode()
            return await _json(send, 400, {"error": {"message": f"bad request from {auth}", "type": "invalid"}})
        status, headers, body = await _capture(self.app, scope, receive)
        if kind == "truncated":
            body = body[: len(body) // 2]
        elif kind == "no-logprobs":
            data = json.loads(body)
            for choice in data.get("choices", []):
                choice["logprobs"] = None
            body = json.dumps(data).encode()
        else:
            raise ValueError(f"unknown fault kind {kind!r}")
        headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _json(send, status, obj, headers=()):
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


async def _capture(app, scope, receive):
    """Run the real app and collect its whole answer."""
    out = {"status": 500, "headers": [], "body": b""}

    async def send(message):
        if message["type"] == "http.response.start":
            out["status"], out["headers"] = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return out["status"], out["headers"], out["body"]


# How hosts word "the text no longer fits" (each as its API returns it), and one that says nothing useful.
CONTEXT_WORDINGS = {
    "openai": {"message": "This model's maximum context length is {n} tokens. However, your messages resulted in "
                          "{m} tokens. Please reduce the length of the messages.",
               "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"},
    "vllm": {"message": "The decoder prompt (length {m}) is longer than the maximum model length of {n}. Make sure "
                        "that `max_model_len` is no smaller than the number of text tokens.",
             "type": "BadRequestError", "code": 400},
    "llama.cpp": {"message": "the request exceeds the available context size, try increasing it",
                  "type": "exceed_context_size_error", "code": 400},
    "tgi": {"message": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= {n}. Given: {m} "
                       "`inputs` tokens and 1 `max_new_tokens`", "type": "validation"},
    "deepseek": {"message": "This model's maximum context length is {n} tokens. However, you requested {m} tokens "
                            "({m} in the messages, 0 in the completion). Please reduce the length of the messages "
                            "or completion.", "type": "invalid_request_error"},
    "gemini": {"message": "The input token count ({m}) exceeds the maximum number of tokens allowed ({n}).",
               "type": "INVALID_ARGUMENT"},
    "terse": {"message": "request rejected (E4711)", "type": "invalid_request_error"},
}


class ContextLimited:
    """A host that hides its context size: requests whose prompt (text, token ids, or messages and
    the assistant's partial answer, counted in characters or ids) is longer than ``limit`` get
    the 400 of ``wording`` (:data:`CONTEXT_WORDINGS`); the rest reach the real app."""

    def __init__(self, app, *, limit: int, wording: str = "openai") -> None:
        self.app, self.limit, self.wording = app, limit, wording
        self.refused = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in ("/v1/completions", "/v1/chat/completions"):
            return await self.app(scope, receive, send)
        raw, receive = await _read_body(receive)
        body = json.loads(raw)
        prompt = body.get("prompt") or "".join(str(m.get("content") or "") for m in body.get("messages", []))
        if len(prompt) > self.limit:
            self.refused += 1
            error = {k: (v.format(n=self.limit, m=len(prompt)) if isinstance(v, str) else v)
                     for k, v in CONTEXT_WORDINGS[self.wording].items()}
            return await _json(send, 400, {"error": error})
        return await self.app(scope, receive, send)


async def _read_body(receive):
    """The request's whole body, and a ``receive`` that hands it to the app underneath (then the
    client's own messages: its disconnect, when it comes)."""
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    raw = b"".join(chunks)
    return raw, _replaying(raw, receive)


def _replaying(raw, receive):
    """A ``receive`` that hands ``raw`` to the app as the whole body, then the client's messages."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    return replay


class IgnoresLogitBias:
    """A host that accepts ``logit_bias`` and drops it (some OpenAI-compatible servers do): the
    body reaches the real app without it. ``seen`` counts the requests that carried one."""

    def __init__(self, app) -> None:
        self.app, self.seen = app, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in ("/v1/completions", "/v1/chat/completions"):
            return await self.app(scope, receive, send)
        raw, _ = await _read_body(receive)
        body = json.loads(raw)
        if body.pop("logit_bias", None):
            self.seen += 1
        raw = json.dumps(body).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        return await self.app(dict(scope, headers=headers), _replaying(raw, receive), send)
