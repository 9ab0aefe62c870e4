"""Resumable evaluation runs: every (item, system) answered once, even across crashes.

``OUT/results.jsonl`` gets one line per (item, system) the moment its result exists, through the
batch runner's :class:`~blackbox_proxy.runs.results.ResultsFile` (locked against a second run,
each line written whole and fsynced); the line's ``id`` is ``[system, item id]``. Running the
same command again cuts a last line left unfinished by a crash and answers only the rest.
``OUT/run.json`` pins the settings a result depends on (task and data, alpha, top-k, models...):
once results exist, a rerun with other settings is refused instead of mixing two runs in one
file; systems and ``--limit`` may change between runs (adding a system or more items is resuming
too).

Systems run one after another, each with its own progress bar; an API-bound system's items run
``concurrency`` at a time (their API calls overlap and the tuner shares the small models'
forwards), a local system's one at a time. Before the first item runs, every item of every system
is checked (prompt lengths, options), so nothing is paid for a run that would stop.

Left out: what a system does (``systems.py``), statistics and files of the report (``report.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runs.results import ResultsFile, id_key, whole_lines
from ..runs.gather import gather_or_cancel
from ..errors import ConfigurationError, ProxyTuningError
from .systems import Settings, System, open_systems
from .tasks import EvalItem, Task

logger = logging.getLogger(__name__)
RESULTS = "results.jsonl"
RUN = "run.json"


def result_key(system: str, item_id: Any) -> str:
    """The resumption key of one (item, system): the JSON spelling of the line's ``id``."""
    return id_key([system, item_id])


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every result line of ``path``, after removing a last line cut short by a crash (a whole
    line always ends with its newline). A broken line in the middle is not ours to repair: it
    raises."""
    path = Path(path)
    records = []
    for number, raw in enumerate(whole_lines(path), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            record["system"], record["item"]  # noqa: B018 - what every result line has
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigurationError(f"{path} line {number} is not an evaluation result; move the file away or "
                                     "pass another --out") from None
        records.append(record)
    return records


def pin_settings(out_dir: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
    """Write ``OUT/run.json``, or refuse when it holds a run with other settings and results (a
    run that stopped before its first result, say at a wrong model name, may be run again fixed)."""
    path = Path(out_dir) / RUN
    if path.exists() and read_results(Path(out_dir) / RESULTS):
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise ConfigurationError(f"{path} is not JSON; move the folder away or pass another --out") from None
        changed = sorted(k for k in set(before) | set(fingerprint) if before.get(k) != fingerprint.get(k))
        if changed:
            shown = ", ".join(f"{k} {before.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed[:4])
            raise ConfigurationError(f"{Path(out_dir)} holds a run with other settings ({shown}); pass another --out, "
                                     "or the same settings to resume it")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class RunSummary:
    """What a run did, per system: results written now, already there, and systems left out."""

    written: dict[str, int] = field(default_factory=dict)
    already_done: dict[str, int] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)


async def evaluate(system: System, task: Task, item: EvalItem, max_tokens: int) -> dict[str, Any]:
    """One item's result from one system (scored, for generated answers)."""
    if task.kind == "choice":
        return await system.choice(item)
    if task.kind == "loglik":
        return await system.loglik(item)
    answer = await system.generate(item, task, max_tokens)
    assert task.score is not None
    scores = await asyncio.to_thread(task.score, item, answer["output"])
    extra = {"answer": item.answer} if item.answer is not None else {}
    return {**scores, **extra, **answer}


def _progress(total: int, done: int, name: str, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=name, unit="item", dynamic_ncols=True, smoothing=0.1,
                disable=(not enabled) if enabled is not None else None)


async def arun_eval(task: Task, systems: Sequence[System], out_dir: str | os.PathLike, *, max_tokens: int,
                    concurrency: int = 8, progress: bool | None = None) -> RunSummary:
    """Answer every (item, system) of ``task`` not yet in ``OUT/results.jsonl``."""
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise ConfigurationError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    path = Path(out_dir) / RESULTS
    log = ResultsFile(path, flag="--out", run="eval run").open()  # locked: a second run on the folder is refused
    done = {result_key(r["system"], r["item"]) for r in read_results(path)}
    summary = RunSummary()
    try:
        plan: list[tuple[System, list[EvalItem]]] = []
        for system in systems:  # every item of every system checked before the first one runs
            reason = system.unsupported(task.kind)
            if reason:
                logger.warning("%s left out of the %s task: %s", system.name, task.name, reason)
                summary.unsupported[system.name] = reason
                continue
            todo = [item for item in task.items if result_key(system.name, item.id) not in done]
            summary.already_done[system.name] = len(task.items) - len(todo)
            summary.written[system.name] = 0
            for item in todo:
                try:
                    system.check(item, task, max_tokens)
                except ConfigurationError as exc:
                    raise ConfigurationError(f"item {item.id!r}, system {system.name}: {exc}") from None
            plan.append((system, todo))
        for system, todo in plan:
            if todo:
                await _run_system(system, task, todo, log, summary, max_tokens=max_tokens,
                                  concurrency=concurrency if system.api else 1, progress=progress)
    finally:
        log.close()
    return summary


async def _run_system(system: System, task: Task, todo: Sequence[EvalItem], log: ResultsFile, summary: RunSummary, *,
                      max_tokens: int, concurrency: int, progress: bool | None) -> None:
    semaphore = asyncio.Semaphore(concurrency)
    bar = _progress(len(task.items), len(task.items) - len(todo), system.name, progress)

    async def one(item: EvalItem) -> None:
        async with semaphore:
            started = time.perf_counter()
            try:
                result = await evaluate(system, task, item, max_tokens)
            except ProxyTuningError as exc:
                raise ProxyTuningError(f"item {item.id!r}, system {system.name}: {exc} (what was written is kept: "
                                       "run the same command again to resume)") from exc
            log.write({"id": [system.name, item.id], "item": item.id, "system": system.name, **result,
                       "seconds": round(time.perf_counter() - started, 3)})
            summary.written[system.name] += 1
            bar.update(1)

    try:
        await gather_or_cancel([asyncio.ensure_future(one(item)) for item in todo])
    finally:
        bar.close()


def run_eval(task: Task, systems: Sequence[str], out_dir: str | os.PathLike, *, tuner: dict[str, Any],
             settings: Settings, fingerprint: dict[str, Any], base: str | None = None, max_tokens: int | None = None,
             concurrency: int = 8, progress: bool | None = None, seed: int = 0) -> tuple[RunSummary, dict[str, Any]]:
    """Run (or resume) an evaluation and write its report; returns the summary and the report.

    Example::

        task = load_task("gsm", "gsm.jsonl", limit=50)
        summary, report = run_eval(task, ["hosted", "expert", "per-step"], "eval_gsm",
                                   tuner=dict(base_url=URL, model="gemma", expert=E, anti_expert=A),
                                   settings=Settings(alpha=1.0), fingerprint={"task": "gsm"})
    """
    from .report import build_report, write_report

    pin_settings(out_dir, fingerprint)  # before any model loads

    async def main() -> RunSummary:
        async with open_systems(systems, tuner=tuner, settings=settings, base=base) as loaded:
            return await arun_eval(task, loaded, out_dir, max_tokens=max_tokens or task.max_tokens,
                                   concurrency=concurrency, progress=progress)

    summary = asyncio.run(main())
    report = build_report(task, read_results(Path(out_dir) / RESULTS), order=systems, seed=seed,
                          settings=fingerprint, unsupported=summary.unsupported)
    write_report(report, out_dir)
    return summary, report
