"""Serve the proxy-tuned model as an OpenAI-compatible endpoint (``blackbox-proxy serve``).

Any application that speaks the OpenAI API can use the tuned model (hosted API + expert +
anti-expert + strategy + alpha) without changing a line: point its base URL here.

Routes: ``/v1/models``, ``/v1/completions`` (a text prompt, hosted token ids, or a list of up to
:data:`MAX_PROMPTS` of either, answered in OpenAI's order) and ``/v1/chat/completions``, with ``stream=true``
(server-sent events, one event per piece of text as it is decided), ``max_tokens``,
``temperature`` (default 1, as OpenAI), ``top_p``, ``stop``, ``seed`` and ``n`` (up to 8, not
with streaming). Extra body fields ``alpha``, ``strategy``, ``chunk``, ``samples``, ``drafts`` and
``tail_calls`` override the server's defaults per request. A body converts itself to a
:class:`~blackbox_proxy.request.GenerationRequest` (``to_request``: its checks and messages, a 400
when one fails; the one place the options' ranges are written) within this server's limits.
``usage`` counts the prompt with the small models' tokenizer and the generated tokens;
``proxy_usage`` adds what the hosted API billed (its prompt and
completion tokens), the API calls made, and seconds spent waiting for it vs scoring locally.

Concurrent requests share one copy of each small model: their API calls overlap, and their
scoring shares forwards through the scoring queue (:mod:`blackbox_proxy.local.batching`).

Errors are OpenAI's error JSON: 400 for a request the tuned model cannot serve (with the reason),
401 without the server's own ``api_key`` when one is set, 404 for another model name, and 502
when the hosted API fails (its reason, never its key). Chat works in every mode: on a
``completions`` host the messages are rendered with a chat template (the tuner's ``chat_template``,
else the hosted tokenizer's, else the expert's; the small models use their own), as Liu et al. did
for base models; a ``chat``-mode host is continued by instruction (:mod:`blackbox_proxy.decoding.instructed`),
or gives whole answers with ``strategy: resample``.

Also ``GET /v1/models/{id}`` (404 for another id). Chat ``content`` may be a list of text parts
(joined with newlines); other part types are a 400 naming the type. At most 4 stop sequences.
Refused with a 400 that names the field unless neutral (:data:`~.tuned_bodies.REFUSED`; neutral
values in ``openai_http.NEUTRAL_VALUES``): ``best_of``, ``suffix``, ``logit_bias``,
``presence_penalty``, ``frequency_penalty``, ``repetition_penalty``, ``response_format`` (other
than text), ``tools``, ``tool_choice``, ``functions``, ``function_call``, ``prediction``,
``audio``, ``modalities``, ``web_search_options``, ``reasoning_effort``, vLLM's ``min_tokens``,
``top_k``, ``min_p``, ``ignore_eos``, ``guided_*``, and ``echo`` on chat.

Logprobs (:mod:`.served_logprobs`): completions ``logprobs: N`` and chat ``logprobs: true,
top_logprobs: N`` return the TUNED distribution over the hosted candidates (at temperature 1,
as vLLM reports its raw distribution): each token's log p^ and the N best candidates, streaming
included (an event carries the tokens its text shows; held-back and end tokens come with the
last one). With the per-step strategy only (its trace holds every token's distribution); the
others answer a 400 that says so. ``echo`` (completions) puts the prompt before the answer;
with ``logprobs`` the prompt's tokens are the hosted tokenizer's, each scored by teacher forcing
(the first null), then come the generated tokens; ``max_tokens: 0`` scores the prompt alone.
lm-eval's ``local-completions`` loglikelihood requests (``echo``, ``logprobs``, ``max_tokens`` 1,
or 0 in older versions) work as they are (:mod:`.served_echo`: what is refused, and why a token
outside the hosted top-k is null).

Error messages name the served model and the small models' roles ("the expert"), never their
names or paths on this machine. A client that disconnects cancels its generation, streaming or
not: no more hosted calls are made for it. A generation that reaches a model's context limit
after paid calls ends with ``finish_reason: "length"`` and the text so far (see the tuner).

Replicas (``docs/deploy.md``, ``tests/test_replicas.py``): nothing a request needs is kept
between requests (response ids are fresh and never looked up; no sessions, no counters or rate
limits), so N servers behind a round-robin load balancer answer alike: a seeded or greedy
request gets the same answer from any replica. Every response's ``system_fingerprint`` (also on
``GET /health``) digests the settings that decide answers (:mod:`.served_fingerprint`). What
stays in a process, and why it is harmless, is in docs/deploy.md ("Same answers, to the bit").

Shape: the routes are a router of short handlers (:data:`router`) over one state object,
:class:`TunedService` (the tuner, the served name, the defaults, the limits), kept on the app as
``app.state.tuned``.

Left out: ``best_of``, ``suffix``, tools; the bodies, their conversion to a
:class:`~blackbox_proxy.request.GenerationRequest` and the refusals (:mod:`.tuned_bodies`), the
HTTP plumbing (:mod:`.openai_http`).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from openai.types import CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice, ChoiceDelta

from ..request import GenerationRequest
from ..types import GenerationResult, Usage
from .openai_http import (DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOKENS_LIMIT, APIError, add_model_routes,
                          install_openai_plumbing)
from .served_logprobs import READERS, TokenLogprobs, chat_logprobs, completion_logprobs
from .tuned_bodies import (MAX_N, MAX_PROMPTS, MAX_STOP, REFUSED, REFUSED_CHAT, TunedChatBody,  # noqa: F401
                           TunedCompletionBody, logprobs_asked)
from .tuned_service import Found, TunedService, proxy_usage

DEFAULT_MAX_TOKENS = 256


def _tokens(request: GenerationRequest, result: GenerationResult) -> list[TokenLogprobs]:
    return READERS[request.strategy](result)


router = APIRouter()


def _service(http: Request) -> TunedService:
    return http.app.state.tuned


@router.get("/health")
def health(http: Request) -> dict[str, str]:
    """Liveness for a load balancer (no key needed; the models are loaded before the server
    listens), with the fingerprint that replicas configured alike share."""
    return {"status": "ok", "system_fingerprint": _service(http).fingerprint()}


@router.post("/v1/completions")
async def completions(http: Request) -> Any:
    service = _service(http)
    body = await service.body(http, TunedCompletionBody, REFUSED)
    if body.stream and len(body.prompt) > 1:
        raise APIError(400, "stream=true with several prompts is not supported; send one request per prompt",
                       param="prompt")
    texts = [service.prompt_text(p) for p in body.prompt]
    requests = [await service.request(body, text) for text in texts]
    head = service.head("cmpl")
    asked = logprobs_asked(body)
    # text_offset counts from the prompt's start when the prompt is text or echoed (as OpenAI)
    starts = [0 if body.echo or not isinstance(p, str) else len(p) for p in body.prompt]
    if body.stream:
        def piece(text: str | None, finish: str | None, found: Found) -> dict[str, Any]:
            logprobs = None if found is None else completion_logprobs(
                [t for t, _ in found], body.logprobs, starts[0], [at for _, at in found])
            return service.completion(head, [CompletionChoice.construct(text=text or "", index=0, logprobs=logprobs,
                                                                        finish_reason=finish)])

        final = (lambda **kw: service.completion(head, **kw)) if body.include_usage() else None
        return StreamingResponse(service.stream(requests[0], piece, final, asked), media_type="text/event-stream")
    logprobs = None
    if body.echo and asked:
        done = await service.echoed(body, requests, http)
        groups, logprobs = done if done is not None else (None, None)
    elif body.echo and body.max_tokens == 0:  # the prompt alone, nothing to call
        groups = [[GenerationResult(text="", finish_reason="length", usage=Usage())] * body.n for _ in requests]
    else:
        groups = await service.generate(requests, body.n, http)
    if groups is None:
        return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
    if logprobs is None and asked:
        logprobs = [[completion_logprobs(_tokens(r, res), body.logprobs, start) for res in group]
                    for r, group, start in zip(requests, groups, starts)]
    # OpenAI's order: the n choices of prompt 0, then those of prompt 1, ...
    choices = [CompletionChoice.construct(text=(text if body.echo else "") + res.text, index=len(group) * i + j,
                                          logprobs=None if logprobs is None else logprobs[i][j],
                                          finish_reason=res.finish_reason)
               for i, (text, group) in enumerate(zip(texts, groups)) for j, res in enumerate(group)]
    usages = [service.usage(r, group) for r, group in zip(requests, groups)]
    usage = CompletionUsage(prompt_tokens=sum(u.prompt_tokens for u in usages),
                            completion_tokens=sum(u.completion_tokens for u in usages),
                            total_tokens=sum(u.total_tokens for u in usages))
    return JSONResponse(service.completion(head, choices, usage=usage,
                                           proxy_usage=proxy_usage([r for group in groups for r in group])))


@router.post("/v1/chat/completions")
async def chat(http: Request) -> Any:
    service = _service(http)
    body = await service.body(http, TunedChatBody, REFUSED_CHAT)
    request = await service.request(body)
    head = service.head("chatcmpl")
    top = body.top_logprobs or 0
    if body.stream:
        first = [True]

        def piece(text: str | None, finish: str | None, found: Found) -> dict[str, Any]:
            delta: dict[str, Any] = {"role": "assistant"} if first[0] else {}
            first[0] = False
            if text:
                delta["content"] = text
            logprobs = None if found is None else chat_logprobs([t for t, _ in found], top)
            return service.chat_chunk(head, [ChunkChoice.construct(index=0, delta=ChoiceDelta.construct(**delta),
                                                                   logprobs=logprobs, finish_reason=finish)])

        final = (lambda **kw: service.chat_chunk(head, **kw)) if body.include_usage() else None
        return StreamingResponse(service.stream(request, piece, final, body.logprobs), media_type="text/event-stream")
    groups = await service.generate([request], body.n, http)
    if groups is None:
        return Response(status_code=499)
    [results] = groups
    rid, stamp, fp = head
    completion = ChatCompletion.construct(
        id=rid, object="chat.completion", created=stamp, model=service.name, system_fingerprint=fp,
        choices=[ChatChoice.construct(index=i, message=ChatCompletionMessage(role="assistant", content=r.text),
                                      logprobs=chat_logprobs(_tokens(request, r), top) if body.logprobs else None,
                                      finish_reason=r.finish_reason)
                 for i, r in enumerate(results)],
        usage=service.usage(request, results), proxy_usage=proxy_usage(results))
    return JSONResponse(completion.to_dict())


def create_tuned_app(
    tuner: Any,
    *,
    name: str,
    api_key: str | None = None,
    alpha: float = 1.0,
    strategy: str = "auto",
    chunk: int | None = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """A FastAPI app serving ``tuner`` (an :class:`~blackbox_proxy.tuner.AsyncProxyTuner`) as
    the model ``name``. ``alpha``, ``strategy``, ``chunk`` and ``default_max_tokens`` are the
    defaults a request's fields override (checked as a request's own values are).

    Example::

        tuner = AsyncProxyTuner(base_url=URL, model="base", expert=E, anti_expert=A)
        with ServerThread(create_tuned_app(tuner, name="base-tuned")) as server:
            openai.OpenAI(base_url=server.base_url, api_key="-").completions.create(
                model="base-tuned", prompt="Hello", max_tokens=8)
    """
    defaults = GenerationRequest.check_defaults(alpha=alpha, strategy=strategy, chunk=chunk,
                                                max_tokens=default_max_tokens)
    app = FastAPI(title=f"blackbox-proxy tuned model ({name})")
    app.state.tuned = TunedService(tuner, name=name, defaults=defaults, max_tokens_limit=max_tokens_limit,
                                   max_body_bytes=max_body_bytes)
    install_openai_plumbing(app, api_key=api_key, max_body_bytes=max_body_bytes)
    add_model_routes(app, Model(id=name, object="model", created=int(time.time()), owned_by="blackbox-proxy-tuned"))
    app.include_router(router)
    return app
