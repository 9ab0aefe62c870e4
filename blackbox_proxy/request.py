"""What a generation is asked to do, validated once for every front end.

:class:`GenerationRequest` holds the generation options (the prompt or chat messages,
``max_tokens``, ``alpha``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``strategy``,
``chunk``, ``samples``). The Python API, batch lines, the CLI and both HTTP servers build one
and get the same checks and the same messages; :meth:`GenerationRequest.build` turns every
failure into a one-line :class:`~blackbox_proxy.errors.ConfigurationError`.

Text (the prompt, stop strings, message roles and contents) must be valid Unicode: a lone
surrogate (JSON's ``"\\ud800"``, or a byte that is not UTF-8 in a command-line argument) is
refused up front, naming the field, rather than failing in a tokenizer after the run began.
``seed`` is a 64-bit signed integer (what the hosted APIs and ``torch.Generator`` take) and
``alpha`` is within +-:data:`MAX_ALPHA`, where every strategy's maths stays finite.

Left out: rules that depend on the tuner (the hosted mode, the host's top-k cap, the small
models' context lengths); :meth:`blackbox_proxy.tuner.ProxyTuner.check_request` adds those.
Each server adds its own limits (e.g. the most tokens per request) on top.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .errors import ConfigurationError

STRATEGIES = ("auto", "per-step", "speculative", "resample")  # auto: the cheapest exact one the host allows
# A seed is a 64-bit signed integer: OpenAI's API takes that range, torch.Generator.manual_seed
# takes more, and a server's n choices (seed + i) stay within what torch takes.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_CHUNK = 64  # tokens one speculative call may draft (a chunk is cut at the first rejection anyway)
MAX_SAMPLES = 256  # whole answers the resample strategy may draw per generation
# The speculative and resample maths weigh the unseen tail by ((1 - P_E(C)) / (1 - P_A(C)))^alpha
# with both masses >= 1% (maths/rejection.py): past |alpha| ~ 154 that overflows a float. Useful
# values are 0.5 to 2.
MAX_ALPHA = 100.0
# the options a batch line or a request body may set (besides the prompt or messages)
OPTION_NAMES = ("max_tokens", "alpha", "temperature", "top_p", "seed", "stop", "strategy", "chunk", "samples",
                "tail_calls", "drafts")


def check_strategy(value: Any) -> str:
    """``value`` if it names a strategy, else a ValueError that lists them (pydantic validators
    of every front end use it)."""
    if value not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {brief_repr(value)}")
    return value


def _integer(name: str, value: Any, low: int | None = None, hint: str = "", high: int | None = None) -> int:
    if (isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low)
            or (high is not None and value > high)):
        bound = (f" from {low} to {high}" if high is not None and low is not None
                 else f" >= {low}" if low is not None else "")
        raise ValueError(f"{name} must be an integer{bound}{hint}, got {brief_repr(value)}")
    return value


def brief_repr(value: Any, most: int = 60) -> str:
    """``repr(value)`` cut to ``most`` characters, for messages that echo a bad value in one short line."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (Python's 4300-digit limit)
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= most else text[: most - 3] + "..."


def check_text(name: str, value: str) -> str:
    """``value`` if it is valid Unicode (encodes to UTF-8), else a ValueError naming ``name``.

    A lone surrogate comes from JSON (``"\\ud800"``) or from a command-line argument holding a
    byte that is not UTF-8 (Python reads it as U+DC80..U+DCFF); a tokenizer or a UTF-8 file
    cannot take it.

    >>> check_text("the prompt", "2+2=")
    '2+2='
    >>> check_text("the prompt", "2+2\\udcff")
    Traceback (most recent call last):
    ...
    ValueError: the prompt is not valid Unicode text: a lone surrogate '\\udcff' at character 3 (from the command line: a byte that is not UTF-8); pass UTF-8 text
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = value[exc.start]
        origin = " (from the command line: a byte that is not UTF-8)" if "\udc80" <= char <= "\udcff" else ""
        raise ValueError(f"{name} is not valid Unicode text: a lone surrogate {char!r} at character {exc.start}"
                         f"{origin}; pass UTF-8 text") from None
    return value


def message_text(content: Any) -> str:
    """A message's ``content`` as text: a string, or a list of content parts (what current
    OpenAI clients send) whose ``text`` parts are joined with newlines (as vLLM does); any other
    part type (``image_url``, ``input_audio``, ``file``...) is a ValueError naming it.

    >>> message_text([{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}])
    'Hi\\nthere'
    >>> message_text([{"type": "image_url", "image_url": {"url": "x"}}])
    Traceback (most recent call last):
    ...
    ValueError: a message's content part of type 'image_url' is not supported; send text parts only
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise ValueError("each message must be a dict with 'role' and 'content' (a string or a list of text parts)")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            name = brief_repr(kind) if isinstance(kind, str) else "(missing or not a string)"
            raise ValueError(f"a message's content part of type {name} is not supported; send text parts only")
        if not isinstance(part.get("text"), str):
            raise ValueError("a text content part needs 'text' (a string)")
        texts.append(part["text"])
    return "\n".join(texts)


class Message(BaseModel):
    """One chat message: ``role`` and text ``content`` (a list of text parts is joined, see
    :func:`message_text`)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    role: str
    content: str

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, value: Any) -> Any:
        if isinstance(value, Message):
            return value
        if not isinstance(value, dict) or not isinstance(value.get("role"), str) or "content" not in value:
            raise ValueError("each message must be a dict with 'role' and 'content' (strings)")
        value = dict(value, content=message_text(value["content"]))
        check_text("a message's role", value["role"])
        check_text("a message's content", value["content"])
        return value


class GenerationRequest(BaseModel):
    """One generation's options, validated (see the module docstring).

    >>> GenerationRequest.build(prompt="2+2=", max_tokens=4, stop="\\n").stop
    ('\\n',)
    >>> GenerationRequest.build(prompt="2+2=", alpha=float("nan"))
    Traceback (most recent call last):
    ...
    blackbox_proxy.errors.ConfigurationError: alpha must be a finite number, got nan
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    max_tokens: int = 64
    alpha: float = 1.0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    strategy: str = "auto"
    chunk: int | None = None  # speculative: fixed chunk length; None = adaptive
    samples: int | None = None  # resample: answers drawn; None = the default
    tail_calls: int = 1  # speculative: most tail-probe calls per rejection (0: the candidates-only rule)
    drafts: int | None = None  # speculative: most drafts per chunk call; None = greedy adaptive up to 4, sampling 1

    @classmethod
    def build(cls, **options: Any) -> "GenerationRequest":
        """A validated request; options left as None take their defaults. Raises
        :class:`ConfigurationError` with the first problem's message."""
        given = {k: v for k, v in options.items() if v is not None or k in ("prompt", "messages")}
        try:
            return cls(**given)
        except ValidationError as exc:
            raise ConfigurationError(_first_message(exc), field=_first_field(exc)) from None

    @classmethod
    def check_defaults(cls, **options: Any) -> dict[str, Any]:
        """``options`` (request fields, e.g. a server's default alpha and strategy) checked one at
        a time with the request's own rules, as they will be when a request uses them; None means
        unset. Returns the checked values; raises :class:`ConfigurationError` with the first problem.

        >>> GenerationRequest.check_defaults(alpha=1.5, chunk=None)
        {'alpha': 1.5, 'chunk': None}
        >>> GenerationRequest.check_defaults(alpha=float("nan"))
        Traceback (most recent call last):
        ...
        blackbox_proxy.errors.ConfigurationError: alpha must be a finite number, got nan
        """
        checked: dict[str, Any] = {}
        for name, value in options.items():
            if name not in OPTION_NAMES:
                raise ConfigurationError(f"unknown option {name!r}; the options are: {', '.join(OPTION_NAMES)}")
            try:
                checked[name] = None if value is None else getattr(cls, f"_{name}")(value)
            except ValueError as exc:
                raise ConfigurationError(str(exc), field=name) from None
        return checked

    # ----- one field at a time (before pydantic converts anything) ---------------------------------
    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise ValueError(f"the prompt must be text, got {type(value).__name__} {brief_repr(value, 40)}")
        if value is not None and not value.strip():
            raise ValueError("the prompt is empty; pass some text")
        return value if value is None else check_text("the prompt", value)

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _max_tokens(cls, value: Any) -> int:
        return _integer("max_tokens", value, 1)

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha(cls, value: Any) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"alpha must be a finite number, got {brief_repr(value)}")
        if abs(value) > MAX_ALPHA:
            raise ValueError(f"alpha must be between -{MAX_ALPHA:g} and {MAX_ALPHA:g} (typical: 0.5 to 2), "
                             f"got {brief_repr(value)}")
        return float(value)

    @field_validator("temperature", mode="before")
    @classmethod
    def _temperature(cls, value: Any) -> float:
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or value < 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {brief_repr(value)}")
        return float(value)

    @field_validator("top_p", mode="before")
    @classmethod
    def _top_p(cls, value: Any) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < value <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {brief_repr(value)}")
        return float(value)

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> int | None:
        return None if value is None else _integer("seed", value, SEED_MIN, " (64-bit)", SEED_MAX)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            return (check_text("the stop string", value),) if value else ()
        if isinstance(value, (list, tuple)) and all(isinstance(s, str) and s for s in value):
            return tuple(check_text("a stop string", s) for s in value)
        raise ValueError(f"stop must be a string or a list of non-empty strings, got {brief_repr(value)}")

    _strategy = field_validator("strategy", mode="before")(lambda cls, value: check_strategy(value))

    @field_validator("chunk", mode="before")
    @classmethod
    def _chunk(cls, value: Any) -> int | None:
        return None if value is None else _integer("chunk", value, 1, " (or left out for adaptive)", high=MAX_CHUNK)

    @field_validator("tail_calls", mode="before")
    @classmethod
    def _tail_calls(cls, value: Any) -> int:
        return _integer("tail_calls", value, 0, " (0 turns tail probes off)", high=8)

    @field_validator("drafts", mode="before")
    @classmethod
    def _drafts(cls, value: Any) -> int | None:
        return None if value is None else _integer("drafts", value, 1, " (1: one draft per call; left out: adaptive)",
                                                   high=16)

    @field_validator("samples", mode="before")
    @classmethod
    def _samples(cls, value: Any) -> int | None:
        return None if value is None else _integer("samples", value, 1, high=MAX_SAMPLES)

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, value: Any) -> Any:
        if value is not None and (not isinstance(value, (list, tuple)) or not value):
            raise ValueError("messages must be a non-empty list of {'role': str, 'content': str}")
        return value

    # ----- rules between fields --------------------------------------------------------------
    @model_validator(mode="after")
    def _together(self) -> "GenerationRequest":
        if self.prompt is None and self.messages is None:
            raise ValueError("pass a prompt (text) or messages")
        if self.prompt is not None and self.messages is not None:
            raise ValueError("pass either a prompt or messages, not both")
        if self.messages is not None and not any(m.content.strip() for m in self.messages):
            raise ValueError("the messages are empty; pass some text")
        if self.samples is not None and self.strategy != "resample":
            raise ValueError("samples is for --strategy resample")
        if self.strategy == "resample" and (self.temperature != 1.0 or self.top_p != 1.0):
            raise ValueError(
                f"the resample strategy draws whole answers at temperature 1 with top_p 1 and reweights them to "
                f"the proxy-tuned distribution; got temperature={self.temperature:g}, top_p={self.top_p:g}: pass "
                "temperature=1, top_p=1 (or use --strategy per-step)"
            )
        if self.strategy == "speculative" and (self.temperature not in (0.0, 1.0) or self.top_p != 1.0):
            raise ValueError(
                f"the speculative strategy samples the tuned distribution at temperature 1 (or greedy at 0) "
                f"with top_p 1; got temperature={self.temperature:g}, top_p={self.top_p:g}: use --strategy "
                "per-step for other settings"
            )
        return self

    # ----- views -----------------------------------------------------------------------------
    def message_dicts(self) -> list[dict[str, str]] | None:
        """The messages as ``{"role", "content"}`` dicts (None for a text prompt)."""
        return None if self.messages is None else [{"role": m.role, "content": m.content} for m in self.messages]

    def message_pairs(self) -> tuple[tuple[str, str], ...]:
        """The conversation as (role, content) pairs; a text prompt is one user turn."""
        if self.messages is None:
            return (("user", self.prompt or ""),)
        return tuple((m.role, m.content) for m in self.messages)


def _first_message(exc: ValidationError) -> str:
    """The first problem of a validation error, as the validator wrote it (or pydantic's own
    words with the field's name, e.g. for an unknown option)."""
    error = exc.errors()[0]
    original = (error.get("ctx") or {}).get("error")
    if isinstance(original, Exception):
        return str(original)
    where = ".".join(str(p) for p in error.get("loc", ()))
    if error.get("type") == "extra_forbidden":
        return f"unknown option {where!r}; the options are: prompt, messages, {', '.join(OPTION_NAMES)}"
    return f"{where}: {error.get('msg')}" if where else str(error.get("msg"))


def _first_field(exc: ValidationError) -> str | None:
    """The option the first problem is about (None: a rule between options)."""
    where = exc.errors()[0].get("loc") or ()
    return str(where[0]) if where else None


def cut_at_stop(text: str, stops: Iterable[str]) -> str | None:
    """``text`` cut before the earliest stop string it contains, or None when it holds none.

    >>> cut_at_stop("12 + 7 = 19\\nQuestion", ["\\nQuestion", "#"])
    '12 + 7 = 19'
    >>> cut_at_stop("no stop here", ["\\n"]) is None
    True
    """
    hits = [text.find(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else None
