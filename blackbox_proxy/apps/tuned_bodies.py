"""What a request to ``blackbox-proxy serve`` may ask: its bodies, limits and refusals.

- :class:`TunedCompletionBody` / :class:`TunedChatBody`: OpenAI's bodies (:mod:`.openai_http`)
  plus the tuned model's extra fields ``alpha``, ``strategy``, ``chunk``, ``samples``,
  ``drafts`` and ``tail_calls``; a completions prompt is one text, hosted token ids, or a list
  of up to :data:`MAX_PROMPTS` of either; ``max_tokens`` 0 only with ``echo``. A body converts
  itself to a :class:`~blackbox_proxy.request.GenerationRequest` (``to_request(defaults)``),
  which checks the generation options: their ranges are written there and nowhere here.
- :data:`REFUSED`: answer-changing fields the tuned model does not honour (a 400 naming them
  unless neutral); :func:`check_asks`: the 400s for ``logprobs`` and ``echo`` combinations it
  cannot serve, each with its reason.

Left out: the routes (:mod:`.tuned_server`) and what logprobs and echo return
(:mod:`.served_logprobs`, :mod:`.served_echo`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, Field, field_validator

from ..request import OPTION_NAMES, GenerationRequest, check_text
from .openai_http import NEUTRAL_VALUES, APIError, ChatBody, CompletionBody
from .served_logprobs import refusal

MAX_N = 8
MAX_STOP = 4  # stop sequences per request (each is held back from the stream while it could begin)
MAX_PROMPTS = 16  # prompts in one /v1/completions body (each answered n times)
# answer-changing fields the tuned model does not honour, per route: a 400 naming them unless
# neutral (logprobs and top_logprobs are honoured with the per-step and speculative strategies, echo on completions)
REFUSED = tuple(k for k in NEUTRAL_VALUES if k not in ("logprobs", "top_logprobs", "echo"))
REFUSED_CHAT = REFUSED + ("echo",)


class _ProxyOptions(BaseModel):
    """The extra body fields of a tuned request, as sent (null: the server's default); checked by
    :meth:`to_request`."""

    nullable: ClassVar[frozenset[str]] = frozenset({"alpha", "strategy", "chunk", "samples", "drafts", "tail_calls"})

    alpha: Any = None
    strategy: Any = None
    chunk: Any = None
    samples: Any = None
    drafts: Any = None
    tail_calls: Any = None
    stream_options: Any = None

    def to_request(self, defaults: dict[str, Any], *, prompt: str | None = None) -> GenerationRequest:
        """This body's generation: its fields, else the server's ``defaults`` (GenerationRequest
        fields), checked by :class:`GenerationRequest` (a ConfigurationError naming the field).
        ``prompt``: the completions prompt as text (one of a body's prompts)."""
        mine = {name: getattr(self, name, None) for name in OPTION_NAMES}
        mine["stop"] = list(mine["stop"]) or None
        if mine["max_tokens"] is not None:
            mine["max_tokens"] = max(1, mine["max_tokens"])  # 0 (echo: the prompt alone) generates nothing
        options = {name: defaults.get(name) if value is None else value for name, value in mine.items()}
        return GenerationRequest.build(prompt=prompt, messages=getattr(self, "messages", None), **options)

    def include_usage(self) -> bool:
        """``stream_options.include_usage`` (read only when streaming, as OpenAI does)."""
        if self.stream_options is None:
            return False
        if not isinstance(self.stream_options, dict):
            raise APIError(400, "stream_options must be an object such as {\"include_usage\": true}",
                           param="stream_options")
        return bool(self.stream_options.get("include_usage"))


class TunedCompletionBody(_ProxyOptions, CompletionBody):
    """``prompt``: one text, one list of hosted token ids, or a list of either (OpenAI's batch,
    as lm-eval's ``local-completions`` sends): always a tuple of prompts here."""

    nullable: ClassVar[frozenset[str]] = CompletionBody.nullable | _ProxyOptions.nullable
    fewest_tokens: ClassVar[int] = 0  # only with echo (the prompt's logprobs alone)
    prompt_error: ClassVar[str] = ("prompt must be a string, a list of token ids, or a list of up to "
                                   f"{MAX_PROMPTS} of either")

    prompt: tuple[Any, ...] = Field(default=None, validate_default=True)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> tuple[Any, ...]:
        def ids(v: Any) -> bool:
            return isinstance(v, list) and bool(v) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)

        prompts = [value] if isinstance(value, str) or ids(value) else value
        if not isinstance(prompts, list) or not 1 <= len(prompts) <= MAX_PROMPTS:
            raise ValueError(cls.prompt_error)
        out: list[Any] = []
        for one in prompts:
            if isinstance(one, str):
                out.append(check_text("the prompt", one))
            elif ids(one):
                out.append(tuple(one))
            else:
                raise ValueError(cls.prompt_error)
        return tuple(out)



class TunedChatBody(_ProxyOptions, ChatBody):
    nullable: ClassVar[frozenset[str]] = ChatBody.nullable | _ProxyOptions.nullable


def logprobs_asked(body: Any) -> bool:
    """Completions: ``logprobs`` given (0 included: the chosen tokens' logprobs alone); chat:
    ``logprobs: true``."""
    return body.logprobs is not None and body.logprobs is not False


def check_asks(body: Any, strategy: str, tuner: Any) -> None:
    """A 400 with its reason for what this server cannot return: logprobs with a strategy that
    records no per-token distribution, and echo (completions) with logprobs where the prompt
    cannot be teacher-forced or its tokens are unknown, or with streaming, n > 1, or stop."""
    asked = logprobs_asked(body)
    reason = refusal(strategy) if asked else None
    if reason:
        raise APIError(400, reason, param="logprobs")
    if not getattr(body, "echo", False):
        return
    if body.stream:
        raise APIError(400, "stream=true with echo is not supported; send stream=false", param="echo")
    if not asked:
        return
    if tuner.mode != "completions":
        raise APIError(400, "echo with logprobs teacher-forces the prompt as raw text the hosted model continues, "
                            f"which needs a completions host (serve --mode completions); this server's hosted model "
                            f"is in {tuner.mode} mode", param="echo")
    if tuner.hosted_vocab is None:
        raise APIError(400, "echo with logprobs returns the prompt's hosted tokens, and this server does not know the "
                            "hosted tokenizer: start serve with --hosted-tokenizer", param="echo")
    if body.n > 1:
        raise APIError(400, "n > 1 with echo and logprobs is not supported; send n separate requests", param="n")
    if body.max_tokens and body.stop:
        raise APIError(400, "stop with echo and max_tokens > 0 is not supported; leave stop out (or send "
                            "max_tokens 0 for the prompt's logprobs alone)", param="stop")
