"""Serve the proxy-tuned model as an OpenAI-compatible endpoint (``blackbox-proxy serve``).

Any application that speaks the OpenAI API can use the tuned model (hosted API + expert +
anti-expert + strategy + alpha) without changing a line: point its base URL here.

Routes: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``, with ``stream=true``
(server-sent events, one event per piece of text as it is decided), ``max_tokens``,
``temperature`` (default 1, as OpenAI), ``top_p``, ``stop``, ``seed`` and ``n`` (up to 8, not
with streaming). Extra body fields ``alpha``, ``strategy``, ``chunk`` and ``samples`` override
the server's defaults per request. ``usage`` counts the prompt with the small models' tokenizer and the
generated tokens; ``proxy_usage`` adds what the hosted API billed (its prompt and completion
tokens), the API calls made, and seconds spent waiting for it vs scoring locally.

Concurrent requests share one copy of each small model: their API calls overlap, and their
scoring shares forwards through the scoring queue (:mod:`blackbox_proxy.local.batching`).

Errors are OpenAI's error JSON: 400 for a request the tuned model cannot serve (with the reason),
401 without the server's own ``api_key`` when one is set, 404 for another model name, and 502
when the hosted API fails (its reason, never its key). Chat routes need a tuner in ``chat-prefix``
mode, or ``chat`` (one-token answers, or whole answers with ``strategy: resample``); a
``completions``-mode tuner serves ``/v1/completions``.

Left out: ``logprobs`` of the tuned distribution, ``echo``, ``best_of``, ``suffix``, tools.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .._logging import redact
from .tasks import gather_or_cancel
from ..errors import ConfigurationError, HostedAPIError, ProxyTuningError
from .model_server import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOKENS_LIMIT, APIError, _as_list, _number, install_openai_plumbing, read_json
from ..tuner import STRATEGIES
from ..types import GenerationResult

logger = logging.getLogger(__name__)

MAX_N = 8
DEFAULT_MAX_TOKENS = 256
_UNSUPPORTED = {"echo": False, "best_of": 1, "suffix": None, "tools": None, "functions": None}


def _error_for(exc: ProxyTuningError) -> APIError:
    """The HTTP answer to a library error: the request's fault (400) or the hosted API's (502)."""
    message = redact(str(exc))
    if isinstance(exc, HostedAPIError):
        return APIError(502, f"the hosted API failed: {message}", type_="upstream_error")
    if isinstance(exc, ConfigurationError):
        return APIError(400, message)
    return APIError(500, message, type_="server_error")


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object such as {\"include_usage\": true}", param="stream_options")
    return bool(options.get("include_usage"))


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_tuned_app(
    tuner: Any,
    *,
    name: str,
    api_key: str | None = None,
    alpha: float = 1.0,
    strategy: str = "per-step",
    chunk: int | None = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """A FastAPI app serving ``tuner`` (an :class:`~blackbox_proxy.tuner.AsyncProxyTuner`) as
    the model ``name``. ``alpha``, ``strategy`` and ``chunk`` are the defaults a request's extra
    body fields override.

    Example::

        tuner = AsyncProxyTuner(base_url=URL, model="base", expert=E, anti_expert=A)
        with ServerThread(create_tuned_app(tuner, name="base-tuned")) as server:
            openai.OpenAI(base_url=server.base_url, api_key="-").completions.create(
                model="base-tuned", prompt="Hello", max_tokens=8)
    """
    if strategy not in STRATEGIES:
        raise ConfigurationError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    app = FastAPI(title=f"blackbox-proxy tuned model ({name})")
    created = int(time.time())
    install_openai_plumbing(app, api_key=api_key, max_body_bytes=max_body_bytes)

    async def _body(request: Request) -> dict[str, Any]:
        body = await read_json(request, max_body_bytes)
        if body.get("model") != name:
            raise APIError(404, f"The model `{body.get('model')}` does not exist. This server serves `{name}`.",
                           code="model_not_found", param="model")
        for key, default in _UNSUPPORTED.items():
            if body.get(key, default) not in (default, None):
                raise APIError(400, f"{key} is not supported by the tuned model server", param=key)
        if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
            raise APIError(400, "the tuned model server does not return logprobs; leave logprobs out", param="logprobs")
        return body

    def _options(body: dict[str, Any]) -> dict[str, Any]:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        request_strategy = body.get("strategy", strategy)
        if request_strategy not in STRATEGIES:
            raise APIError(400, f"strategy must be one of {', '.join(STRATEGIES)}; got {request_strategy!r}",
                           param="strategy")
        stop = _as_list(body.get("stop"))
        if len(stop) > 4:
            raise APIError(400, "at most 4 stop sequences", param="stop")
        return {
            "max_tokens": _number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, int, 1, max_tokens_limit),
            "temperature": _number(body, "temperature", 1.0, float, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, float, 0.0, 1.0),
            "seed": _number(body, "seed", None, int),
            "stop": stop or None,
            "alpha": _number(body, "alpha", alpha, float),
            "strategy": request_strategy,
            "chunk": _number(body, "chunk", chunk, int, 1, 64),
            "samples": _number(body, "samples", None, int, 1, 256),
        }

    def _n(body: dict[str, Any], stream: bool) -> int:
        n = _number(body, "n", 1, int, 1, MAX_N)
        if stream and n > 1:
            raise APIError(400, "stream=true with n > 1 is not supported; send n separate requests", param="n")
        return n

    async def _check(prompt: str | None, messages: list[dict[str, str]] | None, options: dict[str, Any]) -> None:
        try:
            await tuner.client.check()
            tuner.check_request(prompt=prompt, messages=messages, **options)
        except ProxyTuningError as exc:
            raise _error_for(exc) from None

    async def _generate(prompt: str | None, messages: list[dict[str, str]] | None, options: dict[str, Any],
                        n: int) -> list[GenerationResult]:
        seeds = [None if options["seed"] is None else options["seed"] + i for i in range(n)]
        tasks = [asyncio.ensure_future(tuner.generate(prompt, messages=messages, **dict(options, seed=seed)))
                 for seed in seeds]
        try:
            await gather_or_cancel(tasks)  # one failure stops the other choices (no more API calls)
        except ProxyTuningError as exc:
            raise _error_for(exc) from None
        return [task.result() for task in tasks]

    def _usage(prompt: str | None, messages: list[dict[str, str]] | None,
               results: list[GenerationResult]) -> dict[str, Any]:
        prompt_tokens = len(tuner.expert.prompt_ids(prompt=prompt, messages=messages))
        completion = sum(r.usage.generated_tokens for r in results)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def _proxy_usage(results: list[GenerationResult]) -> dict[str, Any]:
        u = results[0].usage
        for r in results[1:]:
            u = u + r.usage
        return {"api_calls": u.api_calls, "hosted_prompt_tokens": u.prompt_tokens,
                "hosted_completion_tokens": u.completion_tokens, "api_seconds": round(u.api_seconds, 4),
                "scoring_seconds": round(u.scoring_seconds, 4), "draft_tokens": u.draft_tokens,
                "accepted_drafts": u.accepted_drafts}

    async def _stream(prompt: str | None, messages: list[dict[str, str]] | None, options: dict[str, Any],
                      chunk_of: Any, usage_wanted: bool) -> AsyncIterator[str]:
        try:
            async for event in tuner.stream(prompt, messages=messages, **options):
                if event.text:
                    yield _sse(chunk_of(event.text, None))
                if event.result is not None:
                    yield _sse(chunk_of(None, event.result.finish_reason))
                    if usage_wanted:
                        final = chunk_of(None, None)
                        final["choices"] = []
                        final["usage"] = _usage(prompt, messages, [event.result])
                        final["proxy_usage"] = _proxy_usage([event.result])
                        yield _sse(final)
        except ProxyTuningError as exc:
            yield _sse(_error_for(exc).body())
        except Exception as exc:  # noqa: BLE001 - headers are sent: say so in the stream
            logger.exception("streamed generation failed")
            yield _sse(APIError(500, f"internal error ({type(exc).__name__})", type_="server_error").body())
        yield "data: [DONE]\n\n"

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "blackbox-proxy-tuned"}]}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await _body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be one text string (token-id and multiple prompts are not supported)",
                           param="prompt")
        stream = bool(body.get("stream"))
        n = _n(body, stream)
        options = _options(body)
        await _check(prompt, None, options)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if stream:
            def chunk_of(text: str | None, finish: str | None) -> dict[str, Any]:
                return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": name,
                        "choices": [{"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}]}

            usage_wanted = _include_usage(body)
            return StreamingResponse(_stream(prompt, None, options, chunk_of, usage_wanted),
                                     media_type="text/event-stream")
        results = await _generate(prompt, None, options, n)
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": int(time.time()), "model": name,
            "choices": [{"text": r.text, "index": i, "logprobs": None, "finish_reason": r.finish_reason}
                        for i, r in enumerate(results)],
            "usage": _usage(prompt, None, results), "proxy_usage": _proxy_usage(results),
        })

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await _body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise APIError(400, "messages must be a non-empty list of {role, content} with text content",
                           param="messages")
        if tuner.mode == "completions":
            raise APIError(400, "this tuned model serves /v1/completions only (its hosted API is used in "
                                "completions mode); start `serve` with --mode chat-prefix for chat")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        stream = bool(body.get("stream"))
        n = _n(body, stream)
        options = _options(body)
        await _check(None, messages, options)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if stream:
            first = [True]

            def chunk_of(text: str | None, finish: str | None) -> dict[str, Any]:
                delta: dict[str, Any] = {}
                if first[0]:
                    delta["role"] = "assistant"
                    first[0] = False
                if text:
                    delta["content"] = text
                return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": name,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            usage_wanted = _include_usage(body)
            return StreamingResponse(_stream(None, messages, options, chunk_of, usage_wanted),
                                     media_type="text/event-stream")
        results = await _generate(None, messages, options, n)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                         "finish_reason": r.finish_reason} for i, r in enumerate(results)],
            "usage": _usage(None, messages, results), "proxy_usage": _proxy_usage(results),
        })

    return app
