"""The project's own OpenAI-compatible model server (``blackbox-proxy serve-model``).

It serves any local Hugging Face causal LM with ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions``, returning logprobs in OpenAI's exact shapes: ``tokens`` /
``token_logprobs`` / ``top_logprobs`` / ``text_offset`` for completions, ``content`` entries
with ``bytes`` for chat. It honours temperature, top_p, seed, stop, max_tokens and n, accepts
token-id prompts, continues a final assistant message (vLLM's ``continue_final_message``), and
refuses more top logprobs than ``max_top_logprobs`` with a 400. It is the hosted stand-in for
tests and the demo, and lets a user compare black-box results against the white-box truth.

Conventions worth knowing:
- reported logprobs are the model's raw distribution (before temperature/top-p), as vLLM does;
- when the model ends the text, that end token is reported as a last logprobs entry (text
  ``<|endoftext|>`` or the like, ``bytes`` null) and is not part of ``text``;
- tokens whose bytes are not valid UTF-8 print as ``bytes:\\xNN...`` (OpenAI's legacy style);
  two ids with the same string are merged (log-sum-exp) in completions' string-keyed dicts;
- ``return_tokens_as_token_ids`` (as in vLLM) prints tokens as ``token_id:N``.
Left out: streaming, ``echo``, ``best_of``, logit_bias, tools.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .._logging import register_secret
from ..local.engine import CachedContext, model_lock, select_device
from ..harness.launch import free_port  # noqa: F401 - re-exported for tests and callers
from ..tokens.vocab import Vocabulary, vocabulary_from_hf

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOP_LOGPROBS = 20
DEFAULT_MAX_TOKENS_LIMIT = 4096
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB of request JSON


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
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Generation:
    tokens: tuple[Sampled, ...]
    text_ids: tuple[int, ...]  # generated ids that are part of the text (no end token)
    text: str
    finish_reason: str


class ModelRunner:
    """One local causal LM that generates with logprobs; requests are serialised by a lock.

    The KV caches of the last ``cache_slots`` contexts are kept; a request continues the one
    sharing its longest prefix, so per-step clients (each request = previous one + one token) cost
    one token of compute even when several clients interleave.
    """

    def __init__(self, model: Any, tokenizer: Any, *, name: str, cache_slots: int = 32) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        extra = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.vocab: Vocabulary = vocabulary_from_hf(tokenizer, end_ids=extra, name=name)
        self.lock = model_lock(model)  # shared with any Scorer on the same model object
        self.cache_slots = max(1, cache_slots)
        self.contexts: list[CachedContext] = []  # most recently used last
        self.max_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None

    @classmethod
    def from_pretrained(cls, path: str, *, name: str | None = None, device: str | None = None,
                        cache_slots: int = 32) -> "ModelRunner":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        target = select_device(device)
        dtype = torch.float32 if target.type == "cpu" else "auto"
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(target)
        return cls(model, tokenizer, name=name or str(path).rstrip("/").split("/")[-1], cache_slots=cache_slots)

    # ----- text helpers --------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        data = self.vocab.token_bytes[token_id] if token_id < self.vocab.size else None
        if data is None:
            return self.vocab.special_text.get(token_id, "")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)

    def token_bytes(self, token_id: int) -> list[int] | None:
        data = self.vocab.token_bytes[token_id] if token_id < self.vocab.size else None
        return list(data) if data is not None else None

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt, add_special_tokens=True))

    def render_chat(self, messages: list[dict[str, Any]], *, continue_final: bool, add_generation_prompt: bool) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"model {self.name} has no chat template; use /v1/completions")
        clean = [{"role": m.get("role"), "content": m.get("content") or ""} for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(
                clean,
                tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final,
                continue_final_message=continue_final,
            )
        except Exception as exc:  # noqa: BLE001 - jinja and template errors
            raise APIError(400, f"cannot apply the chat template: {exc}") from None
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # ----- generation ----------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: list[str],
        top_k: int,
        n: int = 1,
        logit_bias: dict[int, float] | None = None,
    ) -> list[Generation]:
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        with self.lock:
            return [self._one(prompt_ids, max_tokens, temperature, top_p, stop, top_k, generator, logit_bias or {})
                    for _ in range(n)]

    def _one(self, prompt_ids, max_tokens, temperature, top_p, stop, top_k, generator, logit_bias) -> Generation:
        ids = list(prompt_ids)
        out: list[Sampled] = []
        text_ids: list[int] = []
        finish = "length"
        context = self._context_for(ids)
        logprobs = self._extend(context, ids)
        for _ in range(max_tokens):
            biased = logprobs
            if logit_bias:  # like OpenAI: biases the draw, not the reported logprobs
                biased = logprobs.clone()
                for token_id, bias in logit_bias.items():
                    biased[token_id] += bias
            token = self._draw(biased, temperature, top_p, generator)
            top: tuple[tuple[int, float], ...] = ()
            if top_k > 0:
                values, indices = torch.topk(logprobs, min(top_k, logprobs.shape[0]))
                top = tuple((int(i), _finite(float(v))) for v, i in zip(values, indices))
            out.append(Sampled(token, _finite(float(logprobs[token])), top))
            if token in self.vocab.end_ids:
                finish = "stop"
                break
            text_ids.append(token)
            if stop:
                text = self.vocab.bytes_of(text_ids).decode("utf-8", errors="replace")
                if any(s and s in text for s in stop):
                    finish = "stop"
                    break
            ids.append(token)
            if len(out) < max_tokens:
                logprobs = self._extend(context, ids)
        text = self.vocab.bytes_of(text_ids).decode("utf-8", errors="replace")
        if stop:
            hits = [text.find(s) for s in stop if s and s in text]
            if hits:
                text = text[: min(hits)]
        return Generation(tuple(out), tuple(text_ids), text, finish)

    def _context_for(self, ids: list[int]) -> CachedContext:
        """A kept context that ``ids`` extends (the longest such), else a new slot while there is
        room, else the one sharing the longest prefix (cropped). Clients that interleave thus keep
        their own contexts instead of overwriting each other's."""
        def shared(context: CachedContext) -> int:
            n = 0
            for a, b in zip(context.ids, ids):
                if a != b:
                    break
                n += 1
            return n

        extended = [c for c in self.contexts if c.ids and shared(c) == len(c.ids)]
        if extended:
            best = max(extended, key=lambda c: len(c.ids))
        elif len(self.contexts) < self.cache_slots:
            best = CachedContext(self.model)
        else:
            best = max(self.contexts, key=shared)
        if best in self.contexts:
            self.contexts.remove(best)
        self.contexts.append(best)
        return best

    @staticmethod
    def _extend(context: CachedContext, ids: list[int]) -> torch.Tensor:
        return context.extend_to(ids)

    @staticmethod
    def _draw(logprobs: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
        if temperature == 0:
            return int(torch.argmax(logprobs))
        probs = torch.softmax(logprobs.double() / temperature, dim=-1)
        if top_p < 1:
            order = torch.argsort(probs, descending=True)
            sorted_probs = probs[order]
            keep = (torch.cumsum(sorted_probs, 0) - sorted_probs) < top_p
            keep[0] = True
            mask = torch.zeros_like(probs, dtype=torch.bool)
            mask[order[keep]] = True
            probs = torch.where(mask, probs, torch.zeros_like(probs))
            probs = probs / probs.sum()
        return int(torch.multinomial(probs.float(), 1, generator=generator))


def _finite(logprob: float) -> float:
    """JSON has no -inf: impossible tokens get OpenAI's -9999 sentinel."""
    return logprob if math.isfinite(logprob) else -9999.0


# ----- HTTP ------------------------------------------------------------------------------------


def _as_list(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise APIError(400, "stop must be a string or a list of strings", param="stop")


def _number(body: dict, key: str, default: Any, kind: type, low: float | None = None, high: float | None = None) -> Any:
    value = body.get(key, default)
    if value is None:
        value = default
    if value is None:
        return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise APIError(400, f"{key} must be an integer, got {value!r}", param=key)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise APIError(400, f"{key} must be a number, got {value!r}", param=key)
        value = float(value)
    if low is not None and value < low:
        raise APIError(400, f"{key} must be >= {low:g}, got {value!r}", param=key)
    if high is not None and value > high:
        raise APIError(400, f"{key} must be <= {high:g}, got {value!r}", param=key)
    return value


def install_openai_plumbing(app: Any, *, api_key: str | None, max_body_bytes: int) -> None:
    """What every OpenAI-style app of this project shares: the optional bearer key on ``/v1``
    routes (401), the body-size limit (413), and every error as OpenAI's error JSON (unknown
    routes, bad JSON, :class:`APIError`, and a bare 500 without traceback for bugs)."""
    import hmac

    from starlette.exceptions import HTTPException as StarletteHTTPException

    if api_key is not None:
        api_key = api_key.strip()
        if not api_key:
            raise ValueError("api_key is empty; pass a real key or None for an open server")
        register_secret(api_key)
    expected = f"Bearer {api_key}".encode() if api_key else None

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Any:
        if expected is not None and request.url.path.startswith("/v1"):
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


async def read_json(request: Request, max_body_bytes: int) -> dict[str, Any]:
    """The request's JSON object, read within ``max_body_bytes`` (413) or a 400 that says why."""
    raw = b""
    async for part in request.stream():  # bounded even without a content-length header
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


def create_app(
    runner: ModelRunner,
    *,
    max_top_logprobs: int = DEFAULT_MAX_TOP_LOGPROBS,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> Any:
    """A FastAPI app serving ``runner`` under OpenAI's routes.

    ``api_key``: when set, every ``/v1`` route needs ``Authorization: Bearer <api_key>`` (401
    otherwise). ``max_body_bytes``: larger request bodies get a 413. Every error is OpenAI's
    error JSON with a 4xx status; an unexpected failure is a 500 with the exception's class
    name only (the traceback goes to the server's log, never to the client).
    """
    app = FastAPI(title=f"blackbox-proxy model server ({runner.name})")
    created = int(time.time())
    install_openai_plumbing(app, api_key=api_key, max_body_bytes=max_body_bytes)

    async def _json(request: Request) -> dict[str, Any]:
        body = await read_json(request, max_body_bytes)
        if body.get("model") != runner.name:
            raise APIError(404, f"The model `{body.get('model')}` does not exist. This server serves `{runner.name}`.",
                           code="model_not_found", param="model")
        if body.get("stream"):
            raise APIError(400, "stream=true is not supported by this server", param="stream")
        return body

    def _sampling(body: dict, default_max: int | None) -> dict[str, Any]:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", default_max, int, 1, max_tokens_limit)
        return {
            "max_tokens": max_tokens,
            "temperature": _number(body, "temperature", 1.0, float, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, float, 0.0, 1.0),
            "seed": _number(body, "seed", None, int),
            "stop": _as_list(body.get("stop")),
            "n": _number(body, "n", 1, int, 1, 16),
            "logit_bias": _logit_bias(body.get("logit_bias")),
        }

    def _logit_bias(value: Any) -> dict[int, float]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise APIError(400, "logit_bias must be an object mapping token ids to numbers", param="logit_bias")
        out = {}
        for key, bias in value.items():
            try:
                token = int(key)
            except (TypeError, ValueError):
                raise APIError(400, f"logit_bias key {key!r} is not a token id", param="logit_bias") from None
            if not 0 <= token < runner.vocab.size or isinstance(bias, bool) or not isinstance(bias, (int, float)) \
                    or not -100 <= bias <= 100:
                raise APIError(400, f"logit_bias needs token ids in [0, {runner.vocab.size}) and values in "
                                    "[-100, 100]", param="logit_bias")
            out[token] = float(bias)
        return out

    def _check_length(prompt_ids: list[int], max_tokens: int) -> int:
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if any((not isinstance(i, int)) or i < 0 or i >= runner.vocab.size for i in prompt_ids):
            raise APIError(400, f"token ids must be integers in [0, {runner.vocab.size})", param="prompt")
        limit = runner.max_length
        if limit and len(prompt_ids) >= limit:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this model's context is {limit}", param="prompt")
        if limit:
            max_tokens = min(max_tokens, limit - len(prompt_ids))
        return max_tokens

    def _usage(prompt_ids: list[int], gens: list[Generation]) -> dict[str, int]:
        completion = sum(len(g.tokens) for g in gens)
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                "total_tokens": len(prompt_ids) + completion}

    def _text(token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else runner.token_text(token_id)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": runner.name, "object": "model", "created": created,
                                            "owned_by": "blackbox-proxy"}]}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        import asyncio

        body = await _json(request)
        opts = _sampling(body, 16)
        k = body.get("logprobs")
        if k is not None:
            k = _number(body, "logprobs", None, int, 0)
            if k > max_top_logprobs:
                raise APIError(400, f"logprobs must be at most {max_top_logprobs} on this server, got {k}", param="logprobs")
        if body.get("echo"):
            raise APIError(400, "echo is not supported by this server", param="echo")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = runner.encode_prompt(prompt) if prompt else []
        elif isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            prompt_ids = list(prompt)
        else:
            raise APIError(400, "prompt must be a string or a list of token ids (one prompt per request)", param="prompt")
        max_tokens = _check_length(prompt_ids, opts.pop("max_tokens"))
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        gens = await asyncio.to_thread(runner.generate, prompt_ids, max_tokens=max_tokens, top_k=k or 0, **opts)
        choices = []
        for index, gen in enumerate(gens):
            logprobs = None
            if k is not None:
                tokens, token_logprobs, tops, offsets = [], [], [], []
                offset = len(prompt) if isinstance(prompt, str) else 0
                for s in gen.tokens:
                    text = _text(s.token_id, as_ids)
                    tokens.append(text)
                    token_logprobs.append(s.logprob)
                    entry: dict[str, float] = {}
                    for tid, value in s.top:
                        key = _text(tid, as_ids)
                        entry[key] = value if key not in entry else float(torch.logaddexp(torch.tensor(entry[key]), torch.tensor(value)))
                    tops.append(entry)
                    offsets.append(offset)
                    if s.token_id not in runner.vocab.end_ids:
                        offset += len((runner.vocab.token_bytes[s.token_id] or b"").decode("utf-8", errors="replace"))
                logprobs = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
            choices.append({"index": index, "text": gen.text, "finish_reason": gen.finish_reason, "logprobs": logprobs})
        return JSONResponse({
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": runner.name, "choices": choices, "usage": _usage(prompt_ids, gens),
        })

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        import asyncio

        body = await _json(request)
        opts = _sampling(body, max_tokens_limit)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise APIError(400, "messages must be a non-empty list of objects", param="messages")
        want = bool(body.get("logprobs"))
        k = body.get("top_logprobs")
        if k is not None:
            if not want:
                raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
            k = _number(body, "top_logprobs", None, int, 0)
            if k > max_top_logprobs:
                raise APIError(400, f"top_logprobs must be at most {max_top_logprobs} on this server, got {k}",
                               param="top_logprobs")
        continue_final = bool(body.get("continue_final_message"))
        if continue_final and messages[-1].get("role") != "assistant":
            raise APIError(400, "continue_final_message needs a final assistant message", param="messages")
        add_generation_prompt = body.get("add_generation_prompt", True)
        prompt_ids = runner.render_chat(messages, continue_final=continue_final,
                                        add_generation_prompt=bool(add_generation_prompt))
        max_tokens = _check_length(prompt_ids, opts.pop("max_tokens"))
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        gens = await asyncio.to_thread(runner.generate, prompt_ids, max_tokens=max_tokens, top_k=k or 0, **opts)
        choices = []
        for index, gen in enumerate(gens):
            logprobs = None
            if want:
                content = []
                for s in gen.tokens:
                    content.append({
                        "token": _text(s.token_id, as_ids),
                        "logprob": s.logprob,
                        "bytes": runner.token_bytes(s.token_id),
                        "top_logprobs": [
                            {"token": _text(t, as_ids), "logprob": v, "bytes": runner.token_bytes(t)} for t, v in s.top
                        ],
                    })
                logprobs = {"content": content}
            choices.append({"index": index, "message": {"role": "assistant", "content": gen.text},
                            "finish_reason": gen.finish_reason, "logprobs": logprobs})
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": runner.name, "choices": choices, "usage": _usage(prompt_ids, gens),
        })

    return app


class ServerThread:
    """Run an ASGI app with uvicorn in a background thread (tests, the demo). Context manager.

    Example::

        with ServerThread(create_app(runner), port=0) as server:
            print(server.base_url)   # http://127.0.0.1:PORT/v1
    """

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the model server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
