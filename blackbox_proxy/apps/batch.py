"""Batch runs that lose nothing: many prompts from JSONL, results appended as they complete.

Input: one JSON object per line::

    {"id": "q1", "prompt": "Question: 2+3?\\nAnswer:"}
    {"id": "q2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "alpha": 0.5}

``id`` (a string or an integer, unique; the line number when left out) and ``prompt`` or
``messages`` are read; ``max_tokens``, ``alpha``, ``temperature``, ``top_p``, ``seed``, ``stop``,
``strategy``, ``chunk`` and ``samples`` override the run's defaults for that line. Any other field is copied
unchanged into the result (e.g. a reference answer). A line and the run's defaults become one
:class:`~blackbox_proxy.request.GenerationRequest`, so a line gets the checks and messages of
every other front end.

Output: one JSON object per finished prompt, appended and flushed to disk as soon as it
completes: ``id``, ``text``, ``finish_reason``, ``usage``, the copied fields, and ``trace``
when asked. Running the same command again skips the ids already in the output (a line cut
short by a crash is removed first) and finishes the rest: no prompt lost, none answered twice.

Every line is checked before the first API call: a malformed line is reported with its line
number and either stops the run (``on_error="stop"``, the default) or is skipped
(``"skip"``). A prompt whose generation fails (after the hosted client's retries) stops the run,
or with ``"skip"`` is written to ``<output>.errors.jsonl`` and retried by the next run.

Prompts run concurrently (``concurrency`` at a time): their API calls overlap, and the small
models' scoring of several prompts is batched into shared forwards by the tuner's
:class:`~blackbox_proxy.local.scorer.ScoringQueue`.

Left out: what a generation does and what options are valid (the request object and the tuner),
retries of failed API calls (the hosted client), and the command-line flags (``apps.cli``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._logging import redact
from ..errors import ConfigurationError, ProxyTuningError
from ..request import OPTION_NAMES, GenerationRequest, Message
from .tasks import gather_or_cancel

logger = logging.getLogger(__name__)

ON_ERROR = ("stop", "skip")
_READ = ("id", "prompt", "messages") + OPTION_NAMES


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


@dataclass
class BatchSummary:
    """What a run did. ``skipped_done``: ids already in the output; ``bad_lines``: input lines
    skipped as malformed; ``failed``: prompts whose generation failed (``on_error="skip"``)."""

    total: int = 0
    skipped_done: int = 0
    written: int = 0
    failed: int = 0
    bad_lines: int = 0
    errors_path: str | None = None


def id_key(value: Any) -> str:
    """Ids compare by their JSON spelling: ``1`` and ``"1"`` are different ids."""
    return json.dumps(value, ensure_ascii=False)


def _parse_line(raw: str, line: int) -> BatchItem:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg.removesuffix(' at')}, column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    ident = obj.get("id", line)
    if isinstance(ident, bool) or not isinstance(ident, (str, int)) or ident == "":
        raise ValueError(f"id must be a non-empty string or an integer, got {ident!r}")
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


def read_items(path: str | os.PathLike, *, on_error: str = "stop") -> tuple[list[BatchItem], list[str]]:
    """Parse the input JSONL. Returns (items, problems); each problem names its line.

    With ``on_error="stop"`` any problem raises :class:`BatchInputError` listing them all.
    Blank lines are ignored; a repeated id is a problem on its second line.
    """
    if on_error not in ON_ERROR:
        raise ConfigurationError(f"on_error must be one of {', '.join(ON_ERROR)}; got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"the input file {path} does not exist; pass a JSONL file with one prompt per line")
    items: list[BatchItem] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8", errors="strict") as handle:
        try:
            lines = list(handle)
        except UnicodeDecodeError as exc:
            raise BatchInputError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            item = _parse_line(raw, number)
        except ValueError as exc:
            problems.append(f"{path.name} line {number}: {exc}")
            continue
        if item.key in seen:
            problems.append(f"{path.name} line {number}: id {item.id!r} repeats line {seen[item.key]}; ids must be unique")
            continue
        seen[item.key] = number
        items.append(item)
    if problems and on_error == "stop":
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise BatchInputError(f"{shown}. Fix the input, or pass --on-error skip to leave these lines out")
    return items, problems


def read_done(path: str | os.PathLike) -> set[str]:
    """Ids already in a results file, after removing a last line cut short by a crash.

    A complete line always ends with a newline (results are written whole, newline included), so
    bytes after the last newline are an unfinished write and are cut off. A broken line in the
    middle is not ours to repair: it raises.
    """
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logger.warning("%s ends with an unfinished line (%d bytes, from an interrupted run); removing it",
                       path, len(data) - end)
        with open(path, "r+b") as handle:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
        data = data[:end]
    done: set[str] = set()
    for number, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            key = id_key(obj["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigurationError(
                f"the results file {path} line {number} is not a result line; move the file away or fix that line"
            ) from None
        done.add(key)
    return done


class _Appender:
    """Appends whole lines, each flushed and fsynced before the next prompt is counted done."""

    def __init__(self, path: Path, *, mask_secrets: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.mask_secrets = mask_secrets
        self._fd: int | None = None

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        data = (redact(line) if self.mask_secrets else line).encode("utf-8")
        written = 0
        while written < len(data):
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def result_record(item: BatchItem, result: Any, *, trace: bool) -> dict[str, Any]:
    """The output line of one finished prompt."""
    full = result.to_dict()
    record: dict[str, Any] = {"id": item.id, "text": result.text, "finish_reason": result.finish_reason,
                              "usage": full["usage"]}
    for key, value in item.extra.items():
        record.setdefault(key, value)
    if trace:
        record["settings"] = full["settings"]
        record["trace"] = full["trace"]
        if full["chunks"]:
            record["chunks"] = full["chunks"]
    return record


def _progress(total: int, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="prompt", dynamic_ncols=True, disable=(not enabled) if enabled is not None else None,
                smoothing=0.1)


async def arun_batch(
    tuner: Any,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    concurrency: int = 8,
    on_error: str = "stop",
    progress: bool | None = None,
    trace: bool = False,
    **defaults: Any,
) -> BatchSummary:
    """Run every prompt of ``input_path`` not yet in ``output_path`` through ``tuner``
    (an :class:`~blackbox_proxy.tuner.AsyncProxyTuner`). ``defaults`` are
    :class:`~blackbox_proxy.request.GenerationRequest` fields (``max_tokens``, ``alpha``,
    ``strategy``...; None = the request's default); a line's own fields win.
    """
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise ConfigurationError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    unknown = set(defaults) - set(OPTION_NAMES)
    if unknown:
        raise ConfigurationError(f"unknown generation option(s) {sorted(unknown)}; use {', '.join(OPTION_NAMES)}")
    output = Path(output_path)
    if Path(input_path).resolve() == output.resolve():
        raise ConfigurationError("the output file is the input file; pass another --output")
    items, problems = read_items(input_path, on_error=on_error)
    summary = BatchSummary(total=len(items), bad_lines=len(problems))
    for problem in problems:
        logger.warning("skipped: %s", problem)
    done = read_done(output)
    todo = [item for item in items if item.key not in done]
    summary.skipped_done = len(items) - len(todo)
    if not todo:
        return summary
    await tuner.client.check()
    # Every line is checked before the first generation: nothing is paid for a run that will stop.
    checked: list[tuple[BatchItem, GenerationRequest]] = []
    for item in todo:
        try:
            request = item.request(defaults)
            tuner.check_request(request=request)
        except ConfigurationError as exc:
            message = f"{Path(input_path).name} line {item.line} (id {item.id!r}): {exc}"
            if on_error == "stop":
                raise BatchInputError(f"{message}. Fix the line, or pass --on-error skip") from None
            logger.warning("skipped: %s", message)
            summary.bad_lines += 1
            continue
        checked.append((item, request))
    appender = _Appender(output)
    # error messages are masked once more on the way to disk; results are not (ids and texts stay exact)
    errors = _Appender(output.with_name(output.name + ".errors.jsonl"), mask_secrets=True) if on_error == "skip" else None
    semaphore = asyncio.Semaphore(concurrency)
    bar = _progress(len(checked), progress)

    async def one(item: BatchItem, request: GenerationRequest) -> None:
        async with semaphore:
            try:
                result = await tuner.generate(request=request)
            except Exception as exc:  # noqa: BLE001 - with --on-error skip, any failure of one prompt
                if errors is None:
                    if isinstance(exc, ProxyTuningError):
                        raise ProxyTuningError(f"prompt {item.id!r} (line {item.line}) failed: {exc}") from exc
                    raise
                errors.write({"id": item.id, "line": item.line, "error": str(exc), "type": type(exc).__name__})
                summary.failed += 1
                summary.errors_path = str(errors.path)
                bar.set_postfix(failed=summary.failed)
            else:
                appender.write(result_record(item, result, trace=trace))
                summary.written += 1
            bar.update(1)

    tasks = [asyncio.ensure_future(one(item, request)) for item, request in checked]
    try:
        await gather_or_cancel(tasks)
    finally:
        bar.close()
        appender.close()
        if errors is not None:
            errors.close()
    return summary


def run_batch(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    tuner: dict[str, Any],
    concurrency: int = 8,
    on_error: str = "stop",
    progress: bool | None = None,
    trace: bool = False,
    **defaults: Any,
) -> BatchSummary:
    """Synchronous batch run: builds an :class:`~blackbox_proxy.tuner.AsyncProxyTuner` from the
    ``tuner`` keyword arguments, runs :func:`arun_batch` and closes it.

    Example::

        summary = run_batch("prompts.jsonl", "results.jsonl",
                            tuner=dict(base_url=URL, model="gemma", anti_expert=BASE, expert_adapter=LORA),
                            concurrency=8, max_tokens=40, alpha=1.0)
    """
    from ..tuner import AsyncProxyTuner

    read_items(input_path, on_error=on_error)  # a malformed file fails before any model loads
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise ConfigurationError(f"concurrency must be an integer >= 1, got {concurrency!r}")

    async def main() -> BatchSummary:
        async with AsyncProxyTuner(**tuner) as t:
            return await arun_batch(t, input_path, output_path, concurrency=concurrency, on_error=on_error,
                                    progress=progress, trace=trace, **defaults)

    return asyncio.run(main())
