"""Serve the proxy-tuned model as an OpenAI-compatible endpoint (``blackbox-proxy serve``).

Any application that speaks the OpenAI API can use the tuned model (hosted API + expert +
anti-expert + strategy + alpha) without changing a line: point its base URL here.

Routes: ``/v1/models``, ``/v1/completions`` (a text prompt, hosted token ids, or a list of up to
:data:`MAX_PROMPTS` of either, answered in OpenAI's order) and ``/v1/chat/completions``, with ``stream=true``
(server-sent events, one event per piece of text as it is decided), ``max_tokens``,
``temperature`` (default 1, as OpenAI), ``top_p``, ``stop``, ``seed`` and ``n`` (up to 8, not
with streaming). Extra body fields ``alpha``, ``strategy``, ``chunk``, ``samples``, ``drafts`` and ``tail_calls`` override
the server's defaults per request. A body becomes a
:class:`~blackbox_proxy.request.GenerationRequest` (its checks and messages, a 400 when one
fails) within this server's limits. ``usage`` counts the prompt with the small models' tokenizer
and the generated tokens; ``proxy_usage`` adds what the hosted API billed (its prompt and
completion tokens), the API calls made, and seconds spent waiting for it vs scoring locally.

Concurrent requests share one copy of each small model: their API calls overlap, and their
scoring shares forwards through the scoring queue (:mod:`blackbox_proxy.local.batching`).

Errors are OpenAI's error JSON: 400 for a request the tuned model cannot serve (with the reason),
401 without the server's own ``api_key`` when one is set, 404 for another model name, and 502
when the hosted API fails (its reason, never its key). Chat works in every mode: on a
``completions`` host the messages are rendered with a chat template (the tuner's ``chat_template``,
else the hosted tokenizer's, else the expert's; the small models use their own), as Liu et al. did
for base models; ``chat`` mode gives one-token answers, or whole answers with ``strategy: resample``.

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
limits), so N servers behind a round-robin load balancer answer alike: a seeded request, or a
greedy one, gets the same answer from any replica, whatever that replica served before. Every
response's ``system_fingerprint`` (also on ``GET /health``) digests the settings that decide
answers (:mod:`.served_fingerprint`): replicas that show the same one are configured alike.
What stays in a process, and why it is harmless:

- the small models' caches: KV caches live for one generation; the last prompt's KV is reused
  by the next generation, exactly (the same floats a fresh process computes,
  :class:`~blackbox_proxy.local.sessions.PromptStore`); the self-checks on fixed probes (tree
  attention, adapter rows) reach the same verdict in every replica;
- batch scoring (on by default): generations that overlap share forwards, and a row of a shared
  forward differs from a lone one in the last bits, which can flip a near-tie between two
  candidates; ``serve --no-batch-scoring`` makes each generation's scoring a function of its
  request alone (concurrent requests then take turns on the small models);
- what a server learns of its host: the dialect (``serve`` pins the one its start-up probe
  found, so a failed ``/v1/models`` later changes nothing), the hosted tokenizer (found at
  start-up), and a host that streams without logprobs (chunks asked whole from then on: the
  same draws, ``tests/test_streamed.py``). Pass ``--dialect`` and ``--hosted-tokenizer`` so no
  replica depends on its start-up probes; the fingerprint shows one that does;
- a ``--cache`` file replays the hosted answers its replica stored: share one file among the
  replicas of one machine, or leave it out where the hosted API is not deterministic;
- ``created`` of ``/v1/models`` (the process's start), and each response's id and time.

Unseeded sampling differs between replicas, as between two calls (torch's default generator,
seeded by the OS at start). The hosted API may answer one request differently from call to
call (most hosted APIs' logprobs vary slightly); a single server sees that too.

Left out: ``best_of``, ``suffix``, tools; the bodies and refusals (:mod:`.tuned_bodies`), the HTTP
plumbing (:mod:`.openai_http`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice, ChoiceDelta

from .._logging import redact
from ..errors import ConfigurationError, HostedAPIError, ProxyTuningError
from ..request import GenerationRequest, check_strategy
from ..types import GenerationResult, Usage
from .openai_http import (DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOKENS_LIMIT, SSE_DONE, APIError, BodyLimits,
                          add_model_routes, checked_number, install_openai_plumbing, parse_body, read_json,
                          refuse_unsupported, sse_event)
from .served_echo import echo
from .served_fingerprint import fingerprinter
from .served_logprobs import READERS, StreamedTokens, TokenLogprobs, chat_logprobs, completion_logprobs
from .tasks import gather_or_cancel
from .tuned_bodies import (MAX_N, MAX_PROMPTS, MAX_STOP, REFUSED, REFUSED_CHAT, TunedChatBody,  # noqa: F401
                           TunedCompletionBody, check_asks, logprobs_asked)

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
Found = list[tuple[TokenLogprobs, int]] | None  # a streamed piece's tokens and their offsets (None: not asked)


def _public_names(tuner: Any) -> Callable[[str], str]:
    """A function that rewrites a message for a remote client: the small models' names (often
    file paths on this machine) become their roles."""
    names = [(getattr(tuner.expert, "name", None), "the expert"),
             (getattr(tuner.anti_expert, "name", None), "the anti-expert")]
    vocab = getattr(tuner, "hosted_vocab", None)
    names.append((getattr(vocab, "name", None), "the hosted tokenizer"))
    names = sorted(((str(n), role) for n, role in names if n), key=lambda pair: -len(pair[0]))
    if not names:
        return lambda message: message
    # a name counts when it stands alone (quoted or not), not inside a longer word or path
    pattern = re.compile("|".join(f"(?<![\\w/.+-])(?:'{re.escape(n)}'|{re.escape(n)})(?![\\w/+-]|\\.\\w)"
                                  for n, _ in names))
    roles = {n: role for n, role in reversed(names)}
    return lambda message: pattern.sub(lambda m: roles[m.group(0).strip("'")], message)


def _error_for(exc: ProxyTuningError, public: Callable[[str], str] = lambda m: m) -> APIError:
    """The HTTP answer to a library error: the request's fault (400) or the hosted API's (502),
    its message rewritten by ``public`` (no local paths)."""
    message = public(redact(str(exc)))
    if isinstance(exc, HostedAPIError):
        return APIError(502, f"the hosted API failed: {message}", type_="upstream_error")
    if isinstance(exc, ConfigurationError):
        return APIError(400, message)
    return APIError(500, message, type_="server_error")


async def _disconnected(http: Request) -> None:
    """Return when the client closes the connection (the body has been read, so the next ASGI
    message is the disconnect; a finished response ends the wait by cancelling it)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


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
    try:
        check_strategy(strategy)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    try:  # the defaults obey the bounds a request's own values do
        checked_number("alpha", alpha, float)
        if chunk is not None:
            checked_number("chunk", chunk, int, 1, 64)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    app = FastAPI(title=f"blackbox-proxy tuned model ({name})")
    created = int(time.time())
    install_openai_plumbing(app, api_key=api_key, max_body_bytes=max_body_bytes)
    limits = BodyLimits(max_tokens=max_tokens_limit, n=MAX_N, stop=MAX_STOP)
    public = _public_names(tuner)
    fingerprint = fingerprinter(tuner, name=name, alpha=alpha, strategy=strategy, chunk=chunk,
                                default_max_tokens=default_max_tokens, max_tokens_limit=max_tokens_limit)

    async def _body(request: Request, model: type[Any], refused: tuple[str, ...]) -> Any:
        raw = await read_json(request, max_body_bytes)
        if raw.get("model") != name:
            raise APIError(404, f"The model `{raw.get('model')}` does not exist. This server serves `{name}`.",
                           code="model_not_found", param="model")
        # what this server does not do is said before the body is checked
        refuse_unsupported(raw, refused, server="the tuned model server")
        body = parse_body(model, raw, limits)
        if body.stream and body.n > 1:
            raise APIError(400, "stream=true with n > 1 is not supported; send n separate requests", param="n")
        check_asks(body, body.strategy or strategy, tuner)
        return body

    async def _request(body: Any, prompt: str | None, messages: Any) -> GenerationRequest:
        """The body's :class:`GenerationRequest`, checked against the tuner (400/502 if not)."""
        try:
            await tuner.client.check()
            request = GenerationRequest.build(
                prompt=prompt, messages=messages,
                max_tokens=default_max_tokens if body.max_tokens is None else max(1, body.max_tokens),
                temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=list(body.stop) or None,
                alpha=alpha if body.alpha is None else body.alpha, strategy=body.strategy or strategy,
                chunk=chunk if body.chunk is None else body.chunk, samples=body.samples,
                drafts=body.drafts, tail_calls=body.tail_calls)
            tuner.check_request(request=request)
        except ProxyTuningError as exc:
            raise _error_for(exc, public) from None
        return request

    async def _run(works: list[Awaitable[Any]], http: Request) -> list[Any] | None:
        """The works' answers, or None when the client went away first (they are then
        cancelled: no more hosted calls for an answer nobody reads)."""
        tasks = [asyncio.ensure_future(w) for w in works]
        work = asyncio.ensure_future(gather_or_cancel(tasks))  # one failure stops the others
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler itself is cancelled
            for task in (gone, work, *tasks):
                task.cancel()
            await asyncio.gather(gone, work, *tasks, return_exceptions=True)
        if not work.done() or work.cancelled():
            logger.info("the client disconnected; its generation was cancelled")
            return None
        try:
            work.result()
        except ProxyTuningError as exc:
            raise _error_for(exc, public) from None
        return [task.result() for task in tasks]

    async def _generate(request: GenerationRequest, n: int, http: Request) -> list[GenerationResult] | None:
        """The n answers (seeds seed, seed + 1, ...), or None when the client went away."""
        seeds = [None if request.seed is None else request.seed + i for i in range(n)]
        return await _run([tuner.generate(request=request.model_copy(update={"seed": seed})) for seed in seeds], http)

    async def _generate_all(requests: list[GenerationRequest], n: int,
                            http: Request) -> list[list[GenerationResult]] | None:
        """:func:`_generate` for several prompts at once (their calls overlap); None when the
        client went away."""
        tasks = [asyncio.ensure_future(_generate(r, n, http)) for r in requests]
        await gather_or_cancel(tasks)  # one failure cancels the other prompts (no more paid calls)
        groups = [task.result() for task in tasks]
        return None if any(g is None for g in groups) else groups

    def _usage(request: GenerationRequest, results: list[GenerationResult]) -> CompletionUsage:
        prompt_tokens = len(tuner.expert.prompt_ids(prompt=request.prompt, messages=request.message_dicts()))
        completion = sum(r.usage.generated_tokens for r in results)
        return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                               total_tokens=prompt_tokens + completion)

    def _proxy_usage(results: list[GenerationResult]) -> dict[str, Any]:
        u = results[0].usage
        for r in results[1:]:
            u = u + r.usage
        return {"api_calls": u.api_calls, "hosted_prompt_tokens": u.prompt_tokens,
                "hosted_completion_tokens": u.completion_tokens, "api_seconds": round(u.api_seconds, 4),
                "scoring_seconds": round(u.scoring_seconds, 4), "draft_tokens": u.draft_tokens,
                "accepted_drafts": u.accepted_drafts}

    def _tokens(request: GenerationRequest, result: GenerationResult) -> list[TokenLogprobs]:
        return READERS[request.strategy](result)

    # Responses are built with openai.types' construct() (no validation): a finish_reason may come
    # from the hosted API (resample) and be one those types do not list, and a streamed completion
    # chunk has finish_reason null, which Completion's choice type does not allow either.
    # One id, `created` and system_fingerprint per response, every streamed chunk included (as
    # OpenAI does): head = (id, created, fingerprint).
    def _head(prefix: str) -> tuple[str, int, str]:
        return f"{prefix}-{uuid.uuid4().hex}", int(time.time()), fingerprint()

    def _completion(head: tuple[str, int, str], choices: list[Any], **extra: Any) -> dict[str, Any]:
        rid, stamp, fp = head
        return Completion.construct(id=rid, object="text_completion", created=stamp, model=name,
                                    system_fingerprint=fp, choices=choices, **extra).to_dict()

    def _chat_chunk(head: tuple[str, int, str], choices: list[Any], **extra: Any) -> dict[str, Any]:
        rid, stamp, fp = head
        return ChatCompletionChunk.construct(id=rid, object="chat.completion.chunk", created=stamp, model=name,
                                             system_fingerprint=fp, choices=choices, **extra).to_dict()

    async def _stream(request: GenerationRequest, piece: Callable[[str | None, str | None, Found], dict[str, Any]],
                      final: Callable[..., dict[str, Any]] | None, logprobs: bool) -> AsyncIterator[str]:
        tokens = StreamedTokens(request.strategy) if logprobs else None
        shown = 0
        try:
            async for event in tuner.stream(request=request):
                shown += len(event.text)
                found = tokens.add(event.steps, shown) if tokens is not None else None
                if event.text:
                    yield sse_event(piece(event.text, None, found))
                    found = [] if found is not None else None
                if event.result is not None:
                    if tokens is not None and found is not None:
                        found += tokens.finish(event.result)
                    yield sse_event(piece(None, event.result.finish_reason, found))
                    if final is not None:
                        yield sse_event(final(choices=[], usage=_usage(request, [event.result]),
                                              proxy_usage=_proxy_usage([event.result])))
        except ProxyTuningError as exc:
            yield sse_event(_error_for(exc, public).body())
        except Exception as exc:  # noqa: BLE001 - headers are sent: say so in the stream
            logger.exception("streamed generation failed")
            yield sse_event(APIError(500, f"internal error ({type(exc).__name__})", type_="server_error").body())
        yield SSE_DONE

    add_model_routes(app, Model(id=name, object="model", created=created, owned_by="blackbox-proxy-tuned"))

    @app.get("/health")
    def health() -> dict[str, str]:
        """Liveness for a load balancer (no key needed; the models are loaded before the server
        listens), with the fingerprint that replicas configured alike share."""
        return {"status": "ok", "system_fingerprint": fingerprint()}

    def _prompt_text(prompt: str | tuple[int, ...]) -> str:
        """A prompt as text: token ids are the hosted model's (decoded with its tokenizer)."""
        if isinstance(prompt, str):
            return prompt
        vocab = tuner.hosted_vocab
        if vocab is None:
            raise APIError(400, "token-id prompts need the hosted tokenizer, which this server does not know; "
                                "send text, or start serve with --hosted-tokenizer", param="prompt")
        if any(not 0 <= i < vocab.size or vocab.token_bytes[i] is None for i in prompt):
            raise APIError(400, f"prompt token ids must be text tokens of the hosted tokenizer (0 to {vocab.size - 1})",
                           param="prompt")
        try:
            return vocab.bytes_of(prompt).decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, "the prompt's token ids do not decode to whole UTF-8 text", param="prompt") from None

    async def _echoed(body: Any, requests: list[GenerationRequest], http: Request) -> tuple[Any, Any] | None:
        """Echo with logprobs (:mod:`.served_echo`): ([[result]] per prompt, [[logprobs]] per prompt)."""
        most = default_max_tokens if body.max_tokens is None else body.max_tokens
        answers = await _run([echo(tuner, p, alpha=r.alpha, max_tokens=most, temperature=r.temperature, top_p=r.top_p,
                                   seed=r.seed) for p, r in zip(body.prompt, requests)], http)
        if answers is None:
            return None
        return [[a.result] for a in answers], [[completion_logprobs(a.tokens, body.logprobs)] for a in answers]

    @app.post("/v1/completions")
    async def completions(http: Request) -> Any:
        body = await _body(http, TunedCompletionBody, REFUSED)
        if body.stream and len(body.prompt) > 1:
            raise APIError(400, "stream=true with several prompts is not supported; send one request per prompt",
                           param="prompt")
        texts = [_prompt_text(p) for p in body.prompt]
        requests = [await _request(body, text, None) for text in texts]
        head = _head("cmpl")
        asked = logprobs_asked(body)
        # text_offset counts from the prompt's start when the prompt is text or echoed (as OpenAI)
        starts = [0 if body.echo or not isinstance(p, str) else len(p) for p in body.prompt]
        if body.stream:
            def piece(text: str | None, finish: str | None, found: Found) -> dict[str, Any]:
                logprobs = None if found is None else completion_logprobs(
                    [t for t, _ in found], body.logprobs, starts[0], [at for _, at in found])
                return _completion(head, [CompletionChoice.construct(text=text or "", index=0, logprobs=logprobs,
                                                                           finish_reason=finish)])

            final = (lambda **kw: _completion(head, **kw)) if body.include_usage() else None
            return StreamingResponse(_stream(requests[0], piece, final, asked), media_type="text/event-stream")
        logprobs = None
        if body.echo and asked:
            done = await _echoed(body, requests, http)
            groups, logprobs = done if done is not None else (None, None)
        elif body.echo and body.max_tokens == 0:  # the prompt alone, nothing to call
            groups = [[GenerationResult(text="", finish_reason="length", usage=Usage())] * body.n for _ in requests]
        else:
            groups = await _generate_all(requests, body.n, http)
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
        usages = [_usage(r, group) for r, group in zip(requests, groups)]
        usage = CompletionUsage(prompt_tokens=sum(u.prompt_tokens for u in usages),
                                completion_tokens=sum(u.completion_tokens for u in usages),
                                total_tokens=sum(u.total_tokens for u in usages))
        return JSONResponse(_completion(head, choices, usage=usage,
                                        proxy_usage=_proxy_usage([r for group in groups for r in group])))

    @app.post("/v1/chat/completions")
    async def chat(http: Request) -> Any:
        body = await _body(http, TunedChatBody, REFUSED_CHAT)
        request = await _request(body, None, body.messages)
        head = _head("chatcmpl")
        top = body.top_logprobs or 0
        if body.stream:
            first = [True]

            def piece(text: str | None, finish: str | None, found: Found) -> dict[str, Any]:
                delta: dict[str, Any] = {"role": "assistant"} if first[0] else {}
                first[0] = False
                if text:
                    delta["content"] = text
                logprobs = None if found is None else chat_logprobs([t for t, _ in found], top)
                return _chat_chunk(head, [ChunkChoice.construct(index=0, delta=ChoiceDelta.construct(**delta),
                                                                      logprobs=logprobs, finish_reason=finish)])

            final = (lambda **kw: _chat_chunk(head, **kw)) if body.include_usage() else None
            return StreamingResponse(_stream(request, piece, final, body.logprobs), media_type="text/event-stream")
        results = await _generate(request, body.n, http)
        if results is None:
            return Response(status_code=499)
        completion = ChatCompletion.construct(
            id=head[0], object="chat.completion", created=head[1], model=name, system_fingerprint=head[2],
            choices=[ChatChoice.construct(index=i, message=ChatCompletionMessage(role="assistant", content=r.text),
                                          logprobs=chat_logprobs(_tokens(request, r), top) if body.logprobs else None,
                                          finish_reason=r.finish_reason)
                     for i, r in enumerate(results)],
            usage=_usage(request, results), proxy_usage=_proxy_usage(results))
        return JSONResponse(completion.to_dict())

    return app
