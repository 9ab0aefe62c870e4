"""The OpenAI-compatible HTTP plumbing both servers share (``serve-model`` and ``serve``).

- :class:`APIError` and :func:`install_openai_plumbing`: the optional bearer key on ``/v1``
  routes (401), the request-body limit (413), and every error as OpenAI's error JSON;
- :func:`read_json` and :func:`parse_body`: a request body read within its limit and validated
  by the pydantic models :class:`CompletionBody` (``/v1/completions``) and :class:`ChatBody`
  (``/v1/chat/completions``), whose 400 messages echo the bad value; :class:`BodyLimits` holds
  the limits that differ between servers;
- :func:`sse_event` / :data:`SSE_DONE`: server-sent events as OpenAI streams them;
- :func:`add_model_routes`: ``/v1/models`` and ``/v1/models/{id}``;
- :func:`refuse_unsupported` / :data:`NEUTRAL_VALUES`: a 400 naming an answer-changing field a
  server does not honour (neutral values pass);
- a request body must arrive within :data:`BODY_TIMEOUT` seconds (408);
- re-exported from :mod:`.loopback`: :class:`ServerThread`, :func:`free_port`, :func:`check_port`,
  :data:`UVICORN_OPTIONS` (running an app, and the port check).

In a body, JSON ``null`` means "the default" for the numeric options and ``stop``; a chat message's
``content`` may be a list of text parts (see :func:`blackbox_proxy.request.message_text`); unknown
fields are kept (``model_extra``) for each server to accept, refuse or ignore.

Left out: routes and response bodies (each server builds its own from ``openai.types``), model
specifics (vocabulary ranges, chat templates, ``logit_bias``) and streaming responses.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from .._logging import register_secret
from ..request import SEED_MAX, SEED_MIN, Message, brief_repr, check_text
from .loopback import UVICORN_OPTIONS, ServerThread, check_port, free_port  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS_LIMIT = 4096
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB of request JSON
SSE_DONE = "data: [DONE]\n\n"
BODY_TIMEOUT = 30.0  # seconds a client may take to send its request body (then 408)


class APIError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        from openai.types import ErrorObject

        error = ErrorObject(message=self.message, type=self.type, param=self.param, code=self.code)
        return {"error": error.to_dict()}


def install_openai_plumbing(app: Any, *, api_key: str | None, max_body_bytes: int) -> None:
    """What every OpenAI-style app of this project shares: the optional bearer key on ``/v1``
    routes and on the API description (``/docs``, ``/redoc``, ``/openapi.json``: 401 without
    it), the body-size limit (413), and every error as OpenAI's error JSON (unknown routes, bad
    JSON, :class:`APIError`, and a bare 500 without traceback for bugs)."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if api_key is not None:
        api_key = api_key.strip()
        if not api_key:
            raise ValueError("api_key is empty; pass a real key or None for an open server")
        register_secret(api_key)
    expected = f"Bearer {api_key}".encode() if api_key else None
    described = {getattr(app, name, None) for name in ("openapi_url", "docs_url", "redoc_url",
                                                         "swagger_ui_oauth2_redirect_url")} - {None}

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Any:
        path = request.url.path
        if expected is not None and (path.startswith("/v1") or path in described):
            given = request.headers.get("authorization", "").strip().encode("utf-8", "replace")
            if not hmac.compare_digest(given, expected):
                err = APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>` with this "
                                    "server's --api-key", type_="invalid_request_error", code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401, headers={"www-authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            err = APIError(413, f"the request body is larger than this server's limit of {max_body_bytes} bytes")
            return JSONResponse(err.body(), status_code=413)
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: "unknown route; this server has /v1/models, /v1/completions and /v1/chat/completions",
                   405: "method not allowed on this route"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(APIError(exc.status_code, message).body(), status_code=exc.status_code)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, f"invalid request: {exc.errors()[:1]}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        err = APIError(500, f"internal error ({type(exc).__name__})", type_="server_error")
        return JSONResponse(err.body(), status_code=500)


async def read_json(request: Any, max_body_bytes: int, *, timeout: float | None = None) -> dict[str, Any]:
    """The request's JSON object, read within ``max_body_bytes`` (413) and ``timeout`` seconds
    (408; default :data:`BODY_TIMEOUT`), or a 400 that says why."""
    import asyncio

    raw = b""
    deadline = asyncio.get_running_loop().time() + (BODY_TIMEOUT if timeout is None else timeout)
    parts = request.stream().__aiter__()
    while True:  # bounded in size even without a content-length header, and in time for slow senders
        try:
            async with asyncio.timeout_at(deadline):
                part = await parts.__anext__()
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise APIError(408, "the request body took too long to arrive; send it at once") from None
        raw += part
        if len(raw) > max_body_bytes:
            raise APIError(413, f"the request body is larger than this server's limit of {max_body_bytes} bytes")
    try:
        body = json.loads(raw)
    except Exception:  # noqa: BLE001
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def sse_event(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ----- request bodies -----------------------------------------------------------------------------


def checked_number(name: str, value: Any, kind: type, low: float | None = None, high: float | None = None) -> Any:
    """``value`` as ``kind`` (int or float) within [low, high], or a ValueError that echoes it.

    >>> checked_number("top_p", 1, float, 0, 1)
    1.0
    >>> checked_number("n", 9, int, 1, 8)
    Traceback (most recent call last):
    ...
    ValueError: n must be <= 8, got 9
    """
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
        value = float(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low if kind is int else format(low, 'g')}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high if kind is int else format(high, 'g')}, got {value!r}")
    return value


def number(kind: type, low: float | None = None, high: float | None = None) -> Any:
    """A body field type: ``kind`` within [low, high] (see :func:`checked_number`), or None."""
    def check(value: Any, info: ValidationInfo) -> Any:
        return None if value is None else checked_number(info.field_name or "value", value, kind, low, high)

    return Annotated[kind | None, BeforeValidator(check)]


# Flags count by truthiness, as the servers always read them (a client may send 1 or "yes").
def _flag(value: Any) -> bool:
    """true or false (null, 0 and 1 read as OpenAI's SDKs and vLLM read them); anything else, such
    as -1 or "false", is refused rather than read by Python's truthiness."""
    if value is None or value is False or value == 0 and type(value) is int:
        return False
    if value is True or value == 1 and type(value) is int:
        return True
    raise ValueError(f"must be true or false, got {brief_repr(value)}")


Flag = Annotated[bool, BeforeValidator(_flag)]


@dataclass(frozen=True)
class BodyLimits:
    """Limits that differ between servers (given to :func:`parse_body`)."""

    max_tokens: int = DEFAULT_MAX_TOKENS_LIMIT
    n: int = 16
    top_logprobs: int = 20
    stop: int | None = None  # the most stop sequences; None: any number
    stop_chars: int = 1024  # the most characters of all stop sequences together


def _limits(info: ValidationInfo) -> BodyLimits:
    return info.context if isinstance(info.context, BodyLimits) else BodyLimits()


class SamplingBody(BaseModel):
    """The options every generation route takes. ``max_completion_tokens`` (OpenAI's newer
    name) wins over ``max_tokens``; ``max_tokens`` None means the route's default."""

    model_config = ConfigDict(extra="allow", frozen=True)
    nullable: ClassVar[frozenset[str]] = frozenset({"max_tokens", "temperature", "top_p", "seed", "stop", "n"})
    fewest_tokens: ClassVar[int] = 1  # the least max_tokens (0 where echo asks only the prompt's logprobs)

    stream: Flag = False
    max_tokens: int | None = None
    temperature: number(float, 0.0, 2.0) = 1.0
    top_p: number(float, 0.0, 1.0) = 1.0
    seed: number(int, SEED_MIN, SEED_MAX) = None
    stop: tuple[str, ...] = ()
    n: int = 1

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "max_completion_tokens" in data:
            data["max_tokens"] = data.pop("max_completion_tokens")
        return {k: v for k, v in data.items() if not (v is None and k in cls.nullable)}

    @field_validator("max_tokens", "n", mode="before")
    @classmethod
    def _bounded(cls, value: Any, info: ValidationInfo) -> int:
        low = cls.fewest_tokens if info.field_name == "max_tokens" else 1
        return checked_number(info.field_name, value, int, low, getattr(_limits(info), info.field_name))

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any, info: ValidationInfo) -> tuple[str, ...]:
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        for s in stops:
            check_text("a stop string", s)
        most = _limits(info).stop
        if most is not None and len(stops) > most:
            raise ValueError(f"at most {most} stop sequences on this server, got {len(stops)}")
        chars = sum(map(len, stops))
        if chars > _limits(info).stop_chars:
            raise ValueError(f"the stop sequences may hold at most {_limits(info).stop_chars} characters together "
                             f"on this server, got {chars}")
        return tuple(stops)


class CompletionBody(SamplingBody):
    """A ``/v1/completions`` body: one prompt (text, or token ids where ``token_prompts``)."""

    nullable: ClassVar[frozenset[str]] = SamplingBody.nullable | {"logprobs"}
    token_prompts: ClassVar[bool] = True
    prompt_error: ClassVar[str] = "prompt must be a string or a list of token ids (one prompt per request)"

    prompt: str | tuple[int, ...] = Field(default=None, validate_default=True)
    logprobs: int | None = None
    echo: Flag = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        one = (str, list) if cls.token_prompts else str
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], one):
            value = value[0]  # a batch of one prompt
        if isinstance(value, str):
            return check_text("the prompt", value)
        if cls.token_prompts and isinstance(value, list) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in value):
            return tuple(value)
        raise ValueError(cls.prompt_error)

    @model_validator(mode="after")
    def _zero_needs_echo(self) -> "CompletionBody":
        """``max_tokens`` 0 (where ``fewest_tokens`` allows it) asks the prompt's logprobs alone."""
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be >= 1 (0 only with echo=true, for the prompt's logprobs), got 0")
        return self

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs(cls, value: Any, info: ValidationInfo) -> int:
        k = checked_number("logprobs", value, int, 0)
        most = _limits(info).top_logprobs
        if k > most:
            raise ValueError(f"logprobs must be at most {most} on this server, got {k}")
        return k


class ChatBody(SamplingBody):
    """A ``/v1/chat/completions`` body: messages as :class:`~blackbox_proxy.request.Message`
    (``null_content`` servers read a null ``content`` as empty text)."""

    nullable: ClassVar[frozenset[str]] = SamplingBody.nullable | {"top_logprobs"}
    null_content: ClassVar[bool] = False

    messages: tuple[Message, ...] = Field(default=None, validate_default=True)
    logprobs: Flag = False
    top_logprobs: int | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, value: Any) -> tuple[Message, ...]:
        if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            if cls.null_content:
                value = [dict(m, content=m.get("content") or "") for m in value]
            messages = []
            for m in value:
                try:
                    messages.append(Message.model_validate(m))
                except ValidationError as exc:  # its own reason (a lone surrogate, an image part...)
                    original = (exc.errors()[0].get("ctx") or {}).get("error")
                    raise ValueError(str(original) if isinstance(original, Exception)
                                     else "messages must be {role, content} with text content") from None
            return tuple(messages)
        raise ValueError("messages must be a non-empty list of {role, content} with text content")

    @field_validator("top_logprobs", mode="before")
    @classmethod
    def _top_logprobs(cls, value: Any, info: ValidationInfo) -> int:
        if not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs=true")
        k = checked_number("top_logprobs", value, int, 0)
        most = _limits(info).top_logprobs
        if k > most:
            raise ValueError(f"top_logprobs must be at most {most} on this server, got {k}")
        return k


# Fields that change the answer and that a server may not do, with the values that change
# nothing (those pass). Each server refuses the ones it does not honour (see refuse_unsupported).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "echo": (False, None), "best_of": (1, None), "suffix": (None, ""),
    "presence_penalty": (0, None), "frequency_penalty": (0, None), "repetition_penalty": (1, None),
    "logit_bias": (None, {}), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "prediction": (None,), "audio": (None,), "modalities": (None, ["text"]), "web_search_options": (None,),
    "min_tokens": (None, 0), "top_k": (None, -1, 0), "min_p": (None, 0), "ignore_eos": (None, False),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "reasoning_effort": (None,),
    # vLLM's extra sampling and chat fields
    "continue_final_message": (None, False), "add_generation_prompt": (None, True), "bad_words": (None, []),
    "allowed_token_ids": (None,), "structured_outputs": (None,), "include_stop_str_in_output": (None, False),
    "stop_token_ids": (None, []), "use_beam_search": (None, False), "length_penalty": (None, 1),
    "truncate_prompt_tokens": (None,), "logits_processors": (None,), "guided_whitespace_pattern": (None,),
}


def refuse_unsupported(raw: dict[str, Any], fields: Any, *, server: str) -> None:
    """A 400 naming the first of ``fields`` that ``raw`` sets to a value that would change the
    answer (:data:`NEUTRAL_VALUES` lists the values that do not)."""
    def same(value: Any, neutral: Any) -> bool:
        if isinstance(neutral, (int, float)) and not isinstance(neutral, bool):  # 0 and 0.0, never False
            return isinstance(value, (int, float)) and not isinstance(value, bool) and value == neutral
        return type(value) is type(neutral) and value == neutral

    for key in fields:
        if key in raw and not any(same(raw[key], v) for v in NEUTRAL_VALUES[key]):
            raise APIError(400, f"{key} is not supported by {server}; leave it out (got {brief_repr(raw[key])})",
                           param=key)


def add_model_routes(app: Any, model: Any) -> None:
    """``GET /v1/models`` and ``GET /v1/models/{id}`` (the SDK's ``models.retrieve``; 404 for an
    id this server does not serve) for the one ``model`` (an ``openai.types.Model``)."""
    from fastapi.responses import JSONResponse

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        # openai.types has no model-list type (the SDK pages it), hence the plain wrapper
        return {"object": "list", "data": [model.to_dict()]}

    @app.get("/v1/models/{model_id:path}")
    def retrieve(model_id: str) -> Any:
        if model_id != model.id:
            raise APIError(404, f"The model `{model_id}` does not exist. This server serves `{model.id}`.",
                           code="model_not_found", param="model")
        return JSONResponse(model.to_dict())


Body = TypeVar("Body", bound=SamplingBody)


def parse_body(model: type[Body], body: dict[str, Any], limits: BodyLimits) -> Body:
    """``body`` validated as ``model`` under ``limits``; the first problem is a 400."""
    try:
        return model.model_validate(body, context=limits)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = error.get("loc") or ()
        original = (error.get("ctx") or {}).get("error")
        message = str(original) if isinstance(original, Exception) else f"{'.'.join(map(str, where))}: {error['msg']}"
        raise APIError(400, message, param=str(where[0]) if where else None) from None
