"""The state the tuned server's routes share (:mod:`.tuned_server` holds the routes).

:class:`TunedService`: the tuner, the served name, the request defaults, the body limits and the
fingerprint, with what the handlers ask of them: a body read and checked, its
:class:`~blackbox_proxy.request.GenerationRequest`, generations run until the client goes away,
the streamed events of one, echo, and the pieces of an answer (usage, ids, response bodies).
Library errors become OpenAI error JSON here: 400 for a request the tuned model cannot serve,
502 when the hosted API fails (its reason, never its key; the small models' names replaced by
their roles).

Left out: the routes and how an answer is assembled (:mod:`.tuned_server`), the bodies
(:mod:`.tuned_bodies`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from openai.types import Completion, CompletionUsage
from openai.types.chat import ChatCompletionChunk

from .._logging import redact
from ..errors import ConfigurationError, HostedAPIError, ProxyTuningError
from ..request import GenerationRequest
from ..runs.gather import gather_or_cancel
from ..types import GenerationResult
from .openai_http import SSE_DONE, APIError, BodyLimits, parse_body, read_json, refuse_unsupported, sse_event
from .served_echo import echo
from .served_fingerprint import fingerprinter
from .served_logprobs import StreamedTokens, TokenLogprobs, completion_logprobs
from .tuned_bodies import MAX_N, MAX_STOP, check_asks

logger = logging.getLogger(__name__)

Found = list[tuple[TokenLogprobs, int]] | None  # a streamed piece's tokens and their offsets (None: not asked)
Head = tuple[str, int, str]  # one response's (id, created, system_fingerprint), every streamed chunk included


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


async def _disconnected(http: Request) -> None:
    """Return when the client closes the connection (the body has been read, so the next ASGI
    message is the disconnect; a finished response ends the wait by cancelling it)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


class TunedService:
    """What the tuned server's routes share: the tuner (an
    :class:`~blackbox_proxy.tuner.AsyncProxyTuner`), the served ``name``, the ``defaults`` a
    request's fields override (GenerationRequest fields: alpha, strategy, chunk, max_tokens), the
    body limits, and the fingerprint of the settings that decide answers."""

    def __init__(self, tuner: Any, *, name: str, defaults: dict[str, Any], max_tokens_limit: int,
                 max_body_bytes: int) -> None:
        self.tuner, self.name, self.defaults = tuner, name, defaults
        self.limits = BodyLimits(max_tokens=max_tokens_limit, n=MAX_N, stop=MAX_STOP)
        self.max_body_bytes = max_body_bytes
        self.public = _public_names(tuner)
        self.fingerprint = fingerprinter(tuner, name=name, alpha=defaults["alpha"], strategy=defaults["strategy"],
                                         chunk=defaults["chunk"], default_max_tokens=defaults["max_tokens"],
                                         max_tokens_limit=max_tokens_limit)

    # ----- requests ----------------------------------------------------------------------------------
    async def body(self, http: Request, model: type[Any], refused: tuple[str, ...]) -> Any:
        """The request's body as ``model``, for this server's model and within its limits (4xx if not)."""
        raw = await read_json(http, self.max_body_bytes)
        if raw.get("model") != self.name:
            raise APIError(404, f"The model `{raw.get('model')}` does not exist. This server serves `{self.name}`.",
                           code="model_not_found", param="model")
        # what this server does not do is said before the body is checked
        refuse_unsupported(raw, refused, server="the tuned model server")
        body = parse_body(model, raw, self.limits)
        if body.stream and body.n > 1:
            raise APIError(400, "stream=true with n > 1 is not supported; send n separate requests", param="n")
        return body

    async def request(self, body: Any, prompt: str | None = None) -> GenerationRequest:
        """The body's :class:`GenerationRequest` (for ``prompt`` on completions), checked against
        the tuner and what this server can return (400/502 if not)."""
        try:
            request = body.to_request(self.defaults, prompt=prompt)
            await self.tuner.client.check()
            request = self.tuner.check_request(request=request)  # its strategy chosen (auto)
            check_asks(body, request.strategy, self.tuner)
        except ProxyTuningError as exc:
            raise self.error(exc) from None
        return request

    def error(self, exc: ProxyTuningError) -> APIError:
        """The HTTP answer to a library error: the request's fault (400) or the hosted API's (502),
        its message with the small models' names as their roles."""
        message = self.public(redact(str(exc)))
        if isinstance(exc, HostedAPIError):
            return APIError(502, f"the hosted API failed: {message}", type_="upstream_error")
        if isinstance(exc, ConfigurationError):
            return APIError(400, message, param=getattr(exc, "field", None))
        return APIError(500, message, type_="server_error")

    def prompt_text(self, prompt: str | tuple[int, ...]) -> str:
        """A prompt as text: token ids are the hosted model's (decoded with its tokenizer)."""
        if isinstance(prompt, str):
            return prompt
        vocab = self.tuner.hosted_vocab
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

    # ----- generating ----------------------------------------------------------------------------------
    async def run(self, works: list[Awaitable[Any]], http: Request) -> list[Any] | None:
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
            raise self.error(exc) from None
        return [task.result() for task in tasks]

    async def generate(self, requests: list[GenerationRequest], n: int,
                       http: Request) -> list[list[GenerationResult]] | None:
        """n answers per request (seeds seed, seed + 1, ...), all at once (their calls overlap);
        None when the client went away."""
        seeds = [[None if r.seed is None else r.seed + i for i in range(n)] for r in requests]
        answers = await self.run([self.tuner.generate(request=r.model_copy(update={"seed": seed}))
                                  for r, group in zip(requests, seeds) for seed in group], http)
        return None if answers is None else [answers[i * n:(i + 1) * n] for i in range(len(requests))]

    async def echoed(self, body: Any, requests: list[GenerationRequest], http: Request) -> tuple[Any, Any] | None:
        """Echo with logprobs (:mod:`.served_echo`): ([[result]] per prompt, [[logprobs]] per prompt)."""
        most = self.defaults["max_tokens"] if body.max_tokens is None else body.max_tokens
        answers = await self.run([echo(self.tuner, p, alpha=r.alpha, max_tokens=most, temperature=r.temperature,
                                       top_p=r.top_p, seed=r.seed) for p, r in zip(body.prompt, requests)], http)
        if answers is None:
            return None
        return [[a.result] for a in answers], [[completion_logprobs(a.tokens, body.logprobs)] for a in answers]

    async def stream(self, request: GenerationRequest, piece: Callable[[str | None, str | None, Found], dict[str, Any]],
                     final: Callable[..., dict[str, Any]] | None, logprobs: bool) -> AsyncIterator[str]:
        """Server-sent events of one streamed generation: ``piece(text, finish, tokens)`` per piece
        of text, ``final(...)`` with the usage when asked, errors as an event (the headers are sent)."""
        tokens = StreamedTokens(request.strategy) if logprobs else None
        shown = 0
        try:
            async for event in self.tuner.stream(request=request):
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
                        yield sse_event(final(choices=[], usage=self.usage(request, [event.result]),
                                              proxy_usage=proxy_usage([event.result])))
        except ProxyTuningError as exc:
            yield sse_event(self.error(exc).body())
        except Exception as exc:  # noqa: BLE001 - headers are sent: say so in the stream
            logger.exception("streamed generation failed")
            yield sse_event(APIError(500, f"internal error ({type(exc).__name__})", type_="server_error").body())
        yield SSE_DONE

    # ----- answers ---------------------------------------------------------------------------------------
    def usage(self, request: GenerationRequest, results: list[GenerationResult]) -> CompletionUsage:
        """The prompt counted with the small models' tokenizer (rendered as the generation rendered
        it: messages through the hosted rendering where the expert has no chat template), and the
        generated tokens."""
        prompt_tokens = len(self.tuner.expert.prompt_ids(prompt=self.tuner.prompt_text(request),
                                                         messages=request.message_dicts()))
        completion = sum(r.usage.generated_tokens for r in results)
        return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                               total_tokens=prompt_tokens + completion)

    # Responses are built with openai.types' construct() (no validation): a finish_reason may come
    # from the hosted API (resample) and be one those types do not list, and a streamed completion
    # chunk has finish_reason null, which Completion's choice type does not allow either.
    def head(self, prefix: str) -> Head:
        return f"{prefix}-{uuid.uuid4().hex}", int(time.time()), self.fingerprint()

    def completion(self, head: Head, choices: list[Any], **extra: Any) -> dict[str, Any]:
        rid, stamp, fp = head
        return Completion.construct(id=rid, object="text_completion", created=stamp, model=self.name,
                                    system_fingerprint=fp, choices=choices, **extra).to_dict()

    def chat_chunk(self, head: Head, choices: list[Any], **extra: Any) -> dict[str, Any]:
        rid, stamp, fp = head
        return ChatCompletionChunk.construct(id=rid, object="chat.completion.chunk", created=stamp, model=self.name,
                                             system_fingerprint=fp, choices=choices, **extra).to_dict()


def proxy_usage(results: list[GenerationResult]) -> dict[str, Any]:
    """What the proxy paid for the answers: hosted calls and tokens, seconds waiting and scoring."""
    u = sum((r.usage for r in results[1:]), results[0].usage)
    return {"api_calls": u.api_calls, "hosted_prompt_tokens": u.prompt_tokens,
            "hosted_cached_prompt_tokens": u.cached_prompt_tokens,
            "hosted_completion_tokens": u.completion_tokens, "api_seconds": round(u.api_seconds, 4),
            "scoring_seconds": round(u.scoring_seconds, 4), "draft_tokens": u.draft_tokens,
            "accepted_drafts": u.accepted_drafts, "tail_calls": u.tail_calls,
            "untrusted_tail_calls": u.untrusted_tail_calls}
