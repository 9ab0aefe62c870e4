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
when asked. Lines are strict JSON: a number that is not finite (a ``-inf`` logprob in a trace)
is written as ``null``. Running the same command again skips the ids already in the output (a
line cut short by a crash is removed first) and finishes the rest: no prompt lost, none
answered twice.

Before the first paid call the output is opened, locked for the whole run (a second run on the
same file is refused, not run twice) and checked: a file that is not results of this input (a
copy of the input, say) is refused. A write that fails later (a full disk) stops the run with a
one-line error; every result written so far is kept, whole, for the next run to skip.

Every line is checked before the first API call, all of them: malformed lines (bad JSON, text
that is not valid Unicode, options out of range) are reported together with their line numbers
and either stop the run (``on_error="stop"``, the default) or are skipped (``"skip"``). A prompt
whose generation fails (after the hosted client's retries) stops the run, or with ``"skip"`` is
written to ``<output>.errors.jsonl`` and retried by the next run. That file holds the failures
of the latest run only: it is replaced when a run starts generating, and removed when a run
ends without failures.

Prompts run concurrently (``concurrency`` at a time): their API calls overlap, and the small
models' scoring of several prompts is batched into shared forwards by the tuner's
:class:`~blackbox_proxy.local.scorer.ScoringQueue`.

Left out: what a generation does and what options are valid (the request object and the tuner),
retries of failed API calls (the hosted client), and the command-line flags (``apps.cli``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError, ProxyTuningError
from ..request import OPTION_NAMES, GenerationRequest, brief_repr
from ..runs.results import (BatchOutputError, ResultsFile, finite_json, id_key, json_line,  # noqa: F401 - re-exported
                      read_done)
from ..runs.gather import gather_or_cancel
from ..runs.inputs import ON_ERROR, BatchInputError, BatchItem, joined, read_items, read_lines  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

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


def _check_run(concurrency: Any, on_error: str, defaults: dict[str, Any]) -> None:
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise ConfigurationError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    if on_error not in ON_ERROR:
        raise ConfigurationError(f"on_error must be one of {', '.join(ON_ERROR)}; got {on_error!r}")
    unknown = set(defaults) - set(OPTION_NAMES)
    if unknown:
        raise ConfigurationError(f"unknown generation option(s) {sorted(unknown)}; use {', '.join(OPTION_NAMES)}")
    GenerationRequest.check_defaults(**defaults)  # the run's own values, once, with the request's messages


@dataclass
class _Plan:
    """What a run will do, checked without a model: the prompts left, each with its request,
    and the results file, open and locked."""

    todo: list[tuple[BatchItem, GenerationRequest]]
    results: ResultsFile
    summary: BatchSummary


def _plan(input_path: str | os.PathLike, output_path: str | os.PathLike, *, on_error: str,
          defaults: dict[str, Any]) -> _Plan:
    """Every line read and merged with the run's ``defaults``, the output opened, locked and read.
    With ``on_error="stop"`` every problem of the lines left to do is raised at once."""
    source, output = Path(input_path), Path(output_path)
    same = source.resolve() == output.resolve()
    if not same and source.exists() and output.exists():
        same = os.path.samefile(source, output)
    if same:
        raise ConfigurationError("the output file is the input file; pass another --output")
    items, problems = read_lines(source)
    requests: dict[str, GenerationRequest] = {}
    merge_problems: dict[str, tuple[int, str]] = {}
    for item in items:
        try:
            requests[item.key] = item.request(defaults)
        except ConfigurationError as exc:
            merge_problems[item.key] = (item.line, f"{source.name} line {item.line} (id {brief_repr(item.id)}): {exc}")
    results = ResultsFile(output).open()
    try:
        done = results.read_done()
        keys = {item.key for item in items}
        if done and not done & keys:
            raise BatchOutputError(f"the results file {output} holds results of another input (none of its {len(done)} "
                                   f"ids is in {source.name}); pass another --output")
        if done - keys:
            logger.warning("%s holds %d id(s) that are not in %s", output, len(done - keys), source.name)
        left = [item for item in items if item.key not in done]
        bad = sorted(problems + [merge_problems[item.key] for item in left if item.key in merge_problems])
        messages = [message for _, message in bad]
        if messages and on_error == "stop":
            raise BatchInputError(joined(messages, "Fix the input, or pass --on-error skip to leave these lines out"))
        for message in messages:
            logger.warning("skipped: %s", message)
        summary = BatchSummary(total=len(items), skipped_done=len(items) - len(left), bad_lines=len(messages))
        todo = [(item, requests[item.key]) for item in left if item.key in requests]
    except BaseException:
        results.close()
        raise
    return _Plan(todo, results, summary)


def _forget(path: Path) -> None:
    """Remove a stale errors file (it described an earlier run)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise BatchOutputError(f"cannot remove the stale errors file {path} ({exc.strerror}); remove it by hand") from None


async def _run(tuner: Any, plan: _Plan, source: str, *, concurrency: int, on_error: str, progress: bool | None,
               trace: bool) -> BatchSummary:
    summary, results = plan.summary, plan.results
    if not plan.todo:
        _forget(results.errors_path)  # nothing left to do: nothing failed
        return summary
    await tuner.client.check()
    # Every line left is checked against the tuner before the first generation: nothing is paid
    # for a run that will stop.
    checked: list[tuple[BatchItem, GenerationRequest]] = []
    bad: list[str] = []
    for item, request in plan.todo:
        try:
            tuner.check_request(request=request)
        except ConfigurationError as exc:
            bad.append(f"{source} line {item.line} (id {brief_repr(item.id)}): {exc}")
            continue
        checked.append((item, request))
    if bad and on_error == "stop":
        raise BatchInputError(joined(bad, "Fix these lines, or pass --on-error skip"))
    for message in bad:
        logger.warning("skipped: %s", message)
    summary.bad_lines += len(bad)
    if on_error == "skip":
        errors: ResultsFile | None = ResultsFile(results.errors_path, errors=True).open()
    else:
        _forget(results.errors_path)
        errors = None
    semaphore = asyncio.Semaphore(concurrency)
    bar = _progress(len(checked), progress)

    async def one(item: BatchItem, request: GenerationRequest) -> None:
        async with semaphore:
            try:
                result = await tuner.generate(request=request)
            except Exception as exc:  # noqa: BLE001 - with --on-error skip, any failure of one prompt
                if errors is None:
                    if isinstance(exc, ProxyTuningError):
                        raise ProxyTuningError(f"prompt {brief_repr(item.id)} (line {item.line}) failed: {exc}") from exc
                    raise
                errors.write({"id": item.id, "line": item.line, "error": str(exc), "type": type(exc).__name__})
                summary.failed += 1
                summary.errors_path = str(errors.path)
                bar.set_postfix(failed=summary.failed)
            else:
                results.write(result_record(item, result, trace=trace))
                summary.written += 1
            bar.update(1)

    tasks = [asyncio.ensure_future(one(item, request)) for item, request in checked]
    try:
        await gather_or_cancel(tasks)
    finally:
        bar.close()
        if errors is not None:
            errors.close()
    return summary


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
    _check_run(concurrency, on_error, defaults)
    plan = _plan(input_path, output_path, on_error=on_error, defaults=defaults)
    try:
        return await _run(tuner, plan, Path(input_path).name, concurrency=concurrency, on_error=on_error,
                          progress=progress, trace=trace)
    finally:
        plan.results.close()


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
    """Synchronous batch run: checks the input and opens (locks) the output, then builds an
    :class:`~blackbox_proxy.tuner.AsyncProxyTuner` from the ``tuner`` keyword arguments, runs
    the prompts left and closes it. A bad line, a busy or unwritable output fails before any
    model loads.

    Example::

        summary = run_batch("prompts.jsonl", "results.jsonl",
                            tuner=dict(base_url=URL, model="gemma", anti_expert=BASE, expert_adapter=LORA),
                            concurrency=8, max_tokens=40, alpha=1.0)
    """
    from ..tuner import AsyncProxyTuner

    _check_run(concurrency, on_error, defaults)
    plan = _plan(input_path, output_path, on_error=on_error, defaults=defaults)

    async def main() -> BatchSummary:
        async with AsyncProxyTuner(**tuner) as t:
            return await _run(t, plan, Path(input_path).name, concurrency=concurrency, on_error=on_error,
                              progress=progress, trace=trace)

    try:
        return asyncio.run(main())
    finally:
        plan.results.close()
