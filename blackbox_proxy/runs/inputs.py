"""The input side of a long run: JSONL lines read and checked, all of them, before anything is paid.

One JSON object per line: ``id`` (a string or an integer, unique; the line number when left out),
``prompt`` or ``messages``, the generation options it sets (:data:`~blackbox_proxy.request.OPTION_NAMES`)
and any other field, copied into the line's result. A line must be strict JSON (no NaN or
Infinity), valid Unicode, nested at most :data:`MAX_DEPTH` deep, and its prompt or messages must
pass :class:`~blackbox_proxy.request.GenerationRequest`'s checks; its options are checked with
the run's defaults (:meth:`BatchItem.request`). :func:`read_items` reports every malformed line
with its number, and stops (``on_error="stop"``) or leaves them out (``"skip"``).

Left out: what is done with the items (``blackbox-proxy batch``: :mod:`blackbox_proxy.apps.batch`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from ..request import OPTION_NAMES, GenerationRequest, Message, brief_repr, check_text
from .results import id_key

ON_ERROR = ("stop", "skip")
_READ = ("id", "prompt", "messages") + OPTION_NAMES
MAX_DEPTH = 32  # how deep a line's fields may nest (a result is written with them, after it is paid)
_SHOWN = 8  # problems listed in one message


class BatchInputError(ConfigurationError):
    """The input file has malformed lines (each reported with its line number)."""



@dataclass(frozen=True)
class BatchItem:
    """One prompt of the input file: its prompt or messages (already checked), the generation
    options the line sets (``options``) and the fields copied into its result (``extra``)."""

    id: Any
    line: int
    prompt: str | None
    messages: tuple[Message, ...] | None
    options: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return id_key(self.id)

    def request(self, defaults: dict[str, Any]) -> GenerationRequest:
        """This line's :class:`GenerationRequest`: the run's ``defaults`` with the line's own
        options over them. Raises :class:`ConfigurationError` with the first problem.

        >>> item = BatchItem(id="q1", line=1, prompt="2+2=", messages=None, options={"max_tokens": 4})
        >>> request = item.request({"max_tokens": 16, "alpha": 0.5, "seed": None})
        >>> request.max_tokens, request.alpha, request.seed
        (4, 0.5, None)
        """
        return GenerationRequest.build(prompt=self.prompt, messages=self.messages, **{**defaults, **self.options})


class _NotJSON(str):
    """Where a line says NaN, Infinity or -Infinity (Python writes them; JSON has no such value)."""


def _check_values(obj: Any) -> None:
    """Every string of a line (keys included) valid Unicode and nesting at most MAX_DEPTH deep,
    or a ValueError naming the field: the line is written back with its result, after it is paid."""
    stack: list[tuple[str, Any, int]] = [("", obj, 0)]
    while stack:
        where, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"field {where!r} nests deeper than {MAX_DEPTH} levels; flatten it")
        if isinstance(value, _NotJSON):
            raise ValueError(f"field {where!r} is {value}, which is not a JSON value; use null, a number or a string")
        if isinstance(value, float) and not math.isfinite(value):  # 1e999 reads as infinity
            raise ValueError(f"field {where!r} is a number too large for a double ({value}); use a smaller one")
        if isinstance(value, str):
            check_text(f"field {where!r}", value)
        elif isinstance(value, dict):
            for key, item in value.items():
                inner = f"{where}.{key}" if where else key
                check_text(f"a field name in {where or 'the line'!r}", key)
                stack.append((inner, item, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item, depth + 1) for i, item in enumerate(value))


def json_object(raw: str) -> dict[str, Any]:
    """One input line's JSON object, or a ValueError that says what is wrong with it: not JSON,
    not an object, NaN or Infinity (Python writes them, JSON has none), nesting deeper than
    :data:`MAX_DEPTH`, strings that are not valid Unicode. ``batch`` and ``eval`` read their
    lines through this, before anything is paid.

    >>> json_object('{"answer": NaN}')
    Traceback (most recent call last):
    ...
    ValueError: field 'answer' is NaN, which is not a JSON value; use null, a number or a string
    """
    try:
        obj = json.loads(raw, parse_constant=_NotJSON)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg.removesuffix(' at')}, column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"not usable JSON (nested too deeply; keep fields under {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # an integer longer than Python reads
        raise ValueError(f"not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {obj if isinstance(obj, _NotJSON) else type(obj).__name__}")
    _check_values(obj)
    return obj


def parse_line(raw: str, line: int) -> BatchItem:
    """One input line as a :class:`BatchItem`, or a ValueError that says what is wrong with it."""
    obj = json_object(raw)
    ident = obj.get("id", line)
    if isinstance(ident, bool) or not isinstance(ident, (str, int)) or ident == "":
        raise ValueError(f"id must be a non-empty string or an integer, got {brief_repr(ident)}")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        raise ValueError('needs exactly one of "prompt" (text) or "messages" (a list of {role, content})')
    # The prompt or messages alone are checked here, before any model loads; the options only
    # with the run's defaults (a line's samples may rely on the run's strategy, say).
    try:
        asked = GenerationRequest.build(prompt=prompt, messages=messages)
    except ConfigurationError as exc:
        raise ValueError(str(exc)) from None
    options = {k: obj[k] for k in OPTION_NAMES if obj.get(k) is not None}
    extra = {k: v for k, v in obj.items() if k not in _READ}
    return BatchItem(ident, line, asked.prompt, asked.messages, options, extra)


def joined(problems: list[str], advice: str) -> str:
    """Problems as one line: the first few, a count of the rest, then what to do."""
    shown = "; ".join(problems[:_SHOWN]) + (f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else "")
    return f"{shown}. {advice}"


def read_items(path: str | os.PathLike, *, on_error: str = "stop") -> tuple[list[BatchItem], list[str]]:
    """Parse the input JSONL. Returns (items, problems); each problem names its line.

    With ``on_error="stop"`` any problem raises :class:`BatchInputError` listing them all.
    Blank lines are ignored; a repeated id is a problem on its second line.
    """
    if on_error not in ON_ERROR:
        raise ConfigurationError(f"on_error must be one of {', '.join(ON_ERROR)}; got {on_error!r}")
    items, problems = read_lines(Path(path))
    messages = [message for _, message in problems]
    if messages and on_error == "stop":
        raise BatchInputError(joined(messages, "Fix the input, or pass --on-error skip to leave these lines out"))
    return items, messages


def read_lines(path: Path) -> tuple[list[BatchItem], list[tuple[int, str]]]:
    """(items, [(line number, problem)]) of the input file."""
    if not path.is_file():
        raise ConfigurationError(f"the input file {path} does not exist; pass a JSONL file with one prompt per line")
    items: list[BatchItem] = []
    problems: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8", errors="strict") as handle:
            lines = list(handle)
    except UnicodeDecodeError as exc:
        raise BatchInputError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read the input file {path} ({exc.strerror}); check its permissions") from None
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            item = parse_line(raw, number)
        except ValueError as exc:
            problems.append((number, f"{path.name} line {number}: {exc}"))
            continue
        if item.key in seen:
            problems.append((number, f"{path.name} line {number}: id {brief_repr(item.id)} repeats line {seen[item.key]}; "
                                     "ids must be unique"))
            continue
        seen[item.key] = number
        items.append(item)
    return items, problems
