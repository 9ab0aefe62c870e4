"""The project's own OpenAI-compatible model server (``blackbox-proxy serve-model``): its routes.

It serves a :class:`~blackbox_proxy.local.runner.ModelRunner` (any local Hugging Face causal LM)
with ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``, returning logprobs in
OpenAI's exact shapes: ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset`` for
completions, ``content`` entries with ``bytes`` for chat. It honours temperature, top_p, seed,
stop, max_tokens, n, logit_bias and echo, accepts token-id prompts, continues a final assistant
message (vLLM's ``continue_final_message``), and refuses more top logprobs than
``max_top_logprobs`` with a 400. It is the hosted stand-in for tests and the demo, and lets a
user compare black-box results against the white-box truth.

Conventions worth knowing:
- reported logprobs are the model's raw distribution (before temperature/top-p), as vLLM does;
- when the model ends the text, that end token is reported as a last logprobs entry (text
  ``<|endoftext|>`` or the like, ``bytes`` null) and is not part of ``text``;
- tokens whose bytes are not valid UTF-8 print as ``bytes:\\xNN...`` (OpenAI's legacy style);
  two ids with the same string are merged (log-sum-exp) in completions' string-keyed dicts;
- ``return_tokens_as_token_ids`` (as in vLLM) prints tokens as ``token_id:N``.

It also answers vLLM's ``/tokenize`` and ``/detokenize`` (so clients can discover its tokenizer;
``hosts/discover.py``), reports ``root`` in ``/v1/models``, and answers ``GET /v1/models/{id}``
(404 for another id). Chat ``content`` may be a list of text parts (joined with newlines); other
part types are a 400 naming the type. At most 16 stop sequences of 1,024 characters together.

Refused with a 400 that names the field, unless given a neutral value (0 penalties, ``best_of``
1, ``response_format`` ``{"type": "text"}``, ``tool_choice`` "none"...; the list is
:data:`REFUSED`, the neutral values ``openai_http.NEUTRAL_VALUES``): ``presence_penalty``,
``frequency_penalty``, ``repetition_penalty``, ``response_format``, ``tools``, ``tool_choice``,
``functions``, ``function_call``, ``best_of``, ``suffix``, ``prediction``, ``audio``,
``modalities``, ``web_search_options``, ``reasoning_effort``, vLLM's ``min_tokens``, ``top_k``,
``min_p``, ``ignore_eos``, ``guided_*``, ``bad_words``, ``allowed_token_ids``, ``structured_outputs``,
``include_stop_str_in_output``, ``stop_token_ids``, ``use_beam_search``, ``length_penalty``,
``truncate_prompt_tokens`` and ``logits_processors``.
Other unknown fields (``user``, ``metadata``...) change nothing and are ignored.

``echo`` (completions) puts the prompt's text and logprobs before the answer (the first prompt
token's logprob is null); with ``max_tokens: 0`` only the prompt is scored, as lm-eval's
``local-completions`` asks. ``stream=true`` answers in server-sent events once the generation is
done: one event per choice (with its logprobs), a usage event when
``stream_options.include_usage``, then ``[DONE]``; not token by token.

Shape: a router of short handlers over one :class:`ModelService` (the runner, the limits, the
pieces of an answer). Left out: token-by-token streaming, ``best_of``, tools; the generation
itself (:mod:`blackbox_proxy.local.runner`) and the HTTP plumbing (:mod:`.openai_http`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.completion_usage import PromptTokensDetails
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage, ChatCompletionTokenLogprob
from openai.types.chat.chat_completion import Choice as ChatChoice, ChoiceLogprobs
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice, ChoiceDelta
from openai.types.chat.chat_completion_token_logprob import TopLogprob
from openai.types.completion_choice import Logprobs
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from ..errors import ConfigurationError
from ..local.runner import Generation, ModelRunner, Sampled
from .openai_http import (DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOKENS_LIMIT, NEUTRAL_VALUES, SSE_DONE, APIError,
                          BodyLimits, ChatBody, CompletionBody, Flag, add_model_routes, install_openai_plumbing,
                          parse_body, read_json, refuse_unsupported, sse_event)

__all__ = ["DEFAULT_MAX_TOP_LOGPROBS", "create_app"]

DEFAULT_MAX_TOP_LOGPROBS = 20
MAX_STOP = 16  # stop sequences per request (and 1,024 characters together: BodyLimits.stop_chars)
# answer-changing fields this server does not honour: a 400 naming them unless neutral
# (logit_bias, logprobs, top_logprobs and echo are honoured)
REFUSED = tuple(k for k in NEUTRAL_VALUES if k not in ("logit_bias", "logprobs", "top_logprobs", "echo",
                                                        "continue_final_message", "add_generation_prompt"))


@dataclass(frozen=True)
class _LocalLimits(BodyLimits):
    vocab_size: int = 0


class _LocalOptions(BaseModel):
    """What this server takes beyond OpenAI's common options (as vLLM and OpenAI do)."""

    nullable: ClassVar[frozenset[str]] = frozenset({"logit_bias"})

    return_tokens_as_token_ids: Flag = False
    logit_bias: dict[int, float] = {}

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias(cls, value: Any, info: ValidationInfo) -> dict[int, float]:
        size = getattr(info.context, "vocab_size", 0)
        if not isinstance(value, dict):
            raise ValueError("logit_bias must be an object mapping token ids to numbers")
        out = {}
        for key, bias in value.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias key {key!r} is not a token id") from None
            if not 0 <= token < size or isinstance(bias, bool) or not isinstance(bias, (int, float)) \
                    or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias needs token ids in [0, {size}) and values in [-100, 100]")
            out[token] = float(bias)
        return out


class TokenizeBody(BaseModel):
    """vLLM's ``/tokenize`` body (the text form): what a text prompt becomes on this server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    prompt: str
    add_special_tokens: Flag = True


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    tokens: list[int]

    @field_validator("tokens")
    @classmethod
    def _ids(cls, value: list[int], info: ValidationInfo) -> list[int]:
        size = getattr(info.context, "vocab_size", 0)
        if any(not 0 <= t < size for t in value):
            raise ValueError(f"tokens must be ids in [0, {size})")
        return value


class LocalCompletionBody(_LocalOptions, CompletionBody):
    nullable: ClassVar[frozenset[str]] = CompletionBody.nullable | _LocalOptions.nullable
    fewest_tokens: ClassVar[int] = 0  # with echo (see CompletionBody)


class LocalChatBody(_LocalOptions, ChatBody):
    nullable: ClassVar[frozenset[str]] = ChatBody.nullable | _LocalOptions.nullable
    null_content: ClassVar[bool] = True  # an assistant turn's null content is empty text

    continue_final_message: Flag = False
    add_generation_prompt: Flag = True


# What OpenAI's chat completions take (``--openai-like``): any other field is OpenAI's 400.
OPENAI_CHAT_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "seed",
    "logit_bias", "logprobs", "top_logprobs", "stream", "stream_options", "presence_penalty", "frequency_penalty",
    "user", "response_format", "tools", "tool_choice", "parallel_tool_calls", "service_tier", "store", "metadata",
    "modalities", "prediction", "reasoning_effort", "audio", "functions", "function_call", "web_search_options",
})


class ModelService:
    """What the model server's routes share: the runner, the body limits, and the pieces of an
    answer (generations within the context, usage, logprobs in OpenAI's shapes). ``openai_like``:
    behave as OpenAI's chat API does (chat only, its fields only)."""

    def __init__(self, runner: ModelRunner, *, limits: _LocalLimits, max_tokens_limit: int,
                 max_body_bytes: int, openai_like: bool = False) -> None:
        self.runner, self.limits = runner, limits
        self.max_tokens_limit, self.max_body_bytes = max_tokens_limit, max_body_bytes
        self.openai_like = openai_like

    def chat_only(self, route: str) -> None:
        """A 404 for routes OpenAI's chat models do not have (``openai_like``)."""
        if self.openai_like:
            raise APIError(404, f"This is a chat model and not supported in the {route} endpoint. "
                                "Did you mean to use v1/chat/completions?", code="not_found")

    async def body(self, http: Request, model: type[Any], *, named: bool = True) -> Any:
        """The request's body as ``model``, for this server's model (``named``: the model must be
        named; the tokenizer routes may leave it out)."""
        raw = await read_json(http, self.max_body_bytes)
        if raw.get("model") != self.runner.name and (named or raw.get("model") is not None):
            raise APIError(404, f"The model `{raw.get('model')}` does not exist. This server serves "
                                f"`{self.runner.name}`.", code="model_not_found", param="model")
        if not named:
            return parse_body(model, raw, self.limits)
        if self.openai_like:
            unknown = sorted(set(raw) - OPENAI_CHAT_FIELDS)
            if unknown:
                raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}")
        refuse_unsupported(raw, REFUSED, server="this model server")
        body = parse_body(model, raw, self.limits)
        options = raw.get("stream_options")
        if body.stream and options is not None and not isinstance(options, dict):
            raise APIError(400, "stream_options must be an object such as {\"include_usage\": true}",
                           param="stream_options")
        return body

    def _max_tokens(self, prompt_ids: list[int], max_tokens: int) -> int:
        """``max_tokens`` within the model's context after the prompt (a 400 for a prompt that
        is empty, has foreign ids, or fills the context)."""
        runner = self.runner
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if any(i < 0 or i >= runner.vocab.size for i in prompt_ids):
            raise APIError(400, f"token ids must be integers in [0, {runner.vocab.size})", param="prompt")
        limit = runner.max_length
        if limit and len(prompt_ids) >= limit:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this model's context is {limit}",
                           param="prompt")
        return min(max_tokens, limit - len(prompt_ids)) if limit else max_tokens

    async def generate(self, prompt_ids: list[int], body: Any, default_max: int, top_k: int) -> list[Generation]:
        max_tokens = self._max_tokens(prompt_ids, default_max if body.max_tokens is None else body.max_tokens)
        return await asyncio.to_thread(
            self.runner.generate, prompt_ids, max_tokens=max_tokens, top_k=top_k, temperature=body.temperature,
            top_p=body.top_p, seed=body.seed, stop=list(body.stop), n=body.n, logit_bias=body.logit_bias)

    @staticmethod
    def usage(prompt_ids: list[int], gens: list[Generation]) -> CompletionUsage:
        """Token counts, with the prompt tokens read from a kept KV cache as OpenAI reports its
        prompt cache (``prompt_tokens_details.cached_tokens``; exact here, where OpenAI counts
        blocks of 128 from 1,024 tokens on)."""
        completion = sum(len(g.tokens) for g in gens)
        cached = max((g.cached_prompt_tokens for g in gens), default=0)
        return CompletionUsage(prompt_tokens=len(prompt_ids), completion_tokens=completion,
                               total_tokens=len(prompt_ids) + completion,
                               prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def text(self, token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else self.runner.token_text(token_id)

    def _width(self, token_id: int) -> int:
        """The characters a token adds to the text (an end token adds none)."""
        vocab = self.runner.vocab
        if token_id in vocab.end_ids:
            return 0
        return len((vocab.token_bytes[token_id] or b"").decode("utf-8", errors="replace"))

    def completion_logprobs(self, gen: Generation, offset: int, as_ids: bool,
                            echoed: tuple[list[int], tuple[Sampled, ...]] | None = None) -> Logprobs:
        tokens, token_logprobs, tops, offsets = [], [], [], []
        if echoed is not None:  # the prompt's tokens first; its first token has no logprob (null)
            prompt_ids, scored = echoed
            at = 0
            for i, tid in enumerate(prompt_ids):
                tokens.append(self.text(tid, as_ids))
                token_logprobs.append(None if i == 0 else scored[i - 1].logprob)
                tops.append(None if i == 0 else self.top_dict(scored[i - 1], as_ids))
                offsets.append(at)
                at += self._width(tid)
        for s in gen.tokens:
            tokens.append(self.text(s.token_id, as_ids))
            token_logprobs.append(s.logprob)
            tops.append(self.top_dict(s, as_ids))
            offsets.append(offset)
            offset += self._width(s.token_id)
        # construct(): echo's first entries are null, which the SDK type does not list
        return Logprobs.construct(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=tops,
                                  text_offset=offsets)

    def top_dict(self, s: Sampled, as_ids: bool) -> dict[str, float]:
        entry: dict[str, float] = {}
        for tid, value in s.top:
            key = self.text(tid, as_ids)
            # float32 log-sum-exp, as this server has always merged same-text tokens
            entry[key] = value if key not in entry else float(
                torch.logaddexp(torch.tensor(entry[key]), torch.tensor(value)))
        return entry

    def chat_logprobs(self, gen: Generation, as_ids: bool) -> ChoiceLogprobs:
        runner = self.runner
        return ChoiceLogprobs(content=[
            ChatCompletionTokenLogprob(
                token=self.text(s.token_id, as_ids), logprob=s.logprob, bytes=runner.token_bytes(s.token_id),
                top_logprobs=[TopLogprob(token=self.text(t, as_ids), logprob=v, bytes=runner.token_bytes(t))
                              for t, v in s.top],
            )
            for s in gen.tokens
        ])


def _include_usage(body: Any) -> bool:
    """``stream_options.include_usage``, read only when streaming (as OpenAI does)."""
    return bool(body.stream and ((body.model_extra or {}).get("stream_options") or {}).get("include_usage"))


def _sse(chunks: list[dict[str, Any]]) -> StreamingResponse:
    """A whole answer as server-sent events: one per choice, then usage if asked, then [DONE]."""
    async def events() -> Any:
        for chunk in chunks:
            yield sse_event(chunk)
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream")


router = APIRouter()


def _service(http: Request) -> ModelService:
    return http.app.state.model


# vLLM's tokenizer routes (at the root as vLLM has them, and under /v1): clients find out which
# tokenizer this server's text prompts go through and send token ids instead.
@router.post("/tokenize")
@router.post("/v1/tokenize")
async def tokenize(http: Request) -> dict[str, Any]:
    service = _service(http)
    service.chat_only("v1/tokenize")
    body = await service.body(http, TokenizeBody, named=False)
    runner = service.runner
    ids = runner.encode_prompt(body.prompt) if body.add_special_tokens \
        else list(runner.tokenizer.encode(body.prompt, add_special_tokens=False))
    return {"tokens": ids, "count": len(ids), "max_model_len": runner.max_length}


@router.post("/detokenize")
@router.post("/v1/detokenize")
async def detokenize(http: Request) -> dict[str, Any]:
    service = _service(http)
    service.chat_only("v1/detokenize")
    body = await service.body(http, DetokenizeBody, named=False)
    return {"prompt": service.runner.tokenizer.decode(body.tokens)}


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.post("/v1/completions")
async def completions(http: Request) -> JSONResponse:
    service = _service(http)
    service.chat_only("v1/completions")
    runner = service.runner
    body = await service.body(http, LocalCompletionBody)
    prompt = body.prompt
    prompt_ids = (runner.encode_prompt(prompt) if prompt else []) if isinstance(prompt, str) else list(prompt)
    gens = await service.generate(prompt_ids, body, 16, body.logprobs or 0)
    start = len(prompt) if isinstance(prompt, str) else 0
    echoed, head = None, ""
    if body.echo:  # the prompt's own logprobs and text before the answer (as lm-eval asks)
        head = prompt if isinstance(prompt, str) else runner.tokenizer.decode(prompt_ids)
        start = len(head)
        if body.logprobs is not None:
            echoed = (prompt_ids, await asyncio.to_thread(runner.prompt_logprobs, prompt_ids, body.logprobs))
    choices = [
        CompletionChoice(index=index, text=head + gen.text, finish_reason=gen.finish_reason,
                         logprobs=None if body.logprobs is None else service.completion_logprobs(
                             gen, start, body.return_tokens_as_token_ids, echoed))
        for index, gen in enumerate(gens)
    ]
    completion = Completion(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()),
                            model=runner.name, choices=choices, usage=service.usage(prompt_ids, gens))
    if body.stream:
        head = {k: v for k, v in completion.to_dict().items() if k not in ("choices", "usage")}
        chunks = [dict(head, choices=[c.to_dict()]) for c in choices]
        if _include_usage(body):
            chunks.append(dict(head, choices=[], usage=completion.usage.to_dict()))
        return _sse(chunks)
    return JSONResponse(completion.to_dict())


@router.post("/v1/chat/completions")
async def chat(http: Request) -> JSONResponse:
    service = _service(http)
    runner = service.runner
    body = await service.body(http, LocalChatBody)
    if body.continue_final_message and body.messages[-1].role != "assistant":
        raise APIError(400, "continue_final_message needs a final assistant message", param="messages")
    try:
        prompt_ids = runner.render_chat([m.model_dump() for m in body.messages],
                                        continue_final=body.continue_final_message,
                                        add_generation_prompt=body.add_generation_prompt)
    except ConfigurationError as exc:
        raise APIError(400, str(exc)) from None
    gens = await service.generate(prompt_ids, body, service.max_tokens_limit, body.top_logprobs or 0)
    as_ids = body.return_tokens_as_token_ids
    choices = [
        ChatChoice(index=index, message=ChatCompletionMessage(role="assistant", content=gen.text),
                   finish_reason=gen.finish_reason,
                   logprobs=service.chat_logprobs(gen, as_ids) if body.logprobs else None)
        for index, gen in enumerate(gens)
    ]
    completion = ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", object="chat.completion",
                                created=int(time.time()), model=runner.name, choices=choices,
                                usage=service.usage(prompt_ids, gens))
    if body.stream:
        def chunk(chunk_choices: list[Any], **extra: Any) -> dict[str, Any]:
            return ChatCompletionChunk.construct(id=completion.id, object="chat.completion.chunk",
                                                 created=completion.created, model=runner.name,
                                                 choices=chunk_choices, **extra).to_dict()

        chunks = [chunk([ChunkChoice.construct(
            index=c.index, delta=ChoiceDelta.construct(role="assistant", content=c.message.content),
            logprobs=c.logprobs, finish_reason=c.finish_reason)]) for c in choices]
        if _include_usage(body):
            chunks.append(chunk([], usage=completion.usage))
        return _sse(chunks)
    return JSONResponse(completion.to_dict())


def create_app(
    runner: ModelRunner,
    *,
    max_top_logprobs: int = DEFAULT_MAX_TOP_LOGPROBS,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    openai_like: bool = False,
) -> Any:
    """A FastAPI app serving ``runner`` under OpenAI's routes (a router over one
    :class:`ModelService`, kept on the app as ``app.state.model``).

    ``api_key``: when set, every ``/v1`` route needs ``Authorization: Bearer <api_key>`` (401
    otherwise). ``max_body_bytes``: larger request bodies get a 413. Every error is OpenAI's
    error JSON with a 4xx status; an unexpected failure is a 500 with the exception's class
    name only (the traceback goes to the server's log, never to the client).

    ``openai_like``: a stand-in for OpenAI's chat models: chat completions only (the other routes
    404), a field OpenAI does not know gets its 400 ("Unrecognized request argument supplied:
    ..."), ``top_logprobs`` above ``max_top_logprobs`` (keep it at 20) a 400, a trailing
    assistant message is answered with a new turn, and ``/v1/models`` says ``owned_by: system``.
    """
    app = FastAPI(title=f"blackbox-proxy model server ({runner.name})")
    limits = _LocalLimits(max_tokens=max_tokens_limit, n=16, top_logprobs=max_top_logprobs, stop=MAX_STOP,
                          vocab_size=runner.vocab.size)
    app.state.model = ModelService(runner, limits=limits, max_tokens_limit=max_tokens_limit,
                                   max_body_bytes=max_body_bytes, openai_like=openai_like)
    install_openai_plumbing(app, api_key=api_key, max_body_bytes=max_body_bytes)
    # ``root``: where the weights and tokenizer came from, as vLLM reports it (a client may load
    # that tokenizer locally and check it against /tokenize)
    owner = "system" if openai_like else "blackbox-proxy"
    add_model_routes(app, Model(id=runner.name, object="model", created=int(time.time()), owned_by=owner,
                                root=str(getattr(runner.tokenizer, "name_or_path", "") or runner.name)))
    app.include_router(router)
    return app
