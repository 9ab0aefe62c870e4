"""Evaluation: task suites x systems, side by side (``blackbox-proxy eval``).

One file per stage, in the order a run goes through them:

    tasks.py    items from JSONL or built in, prompts, scoring of generated answers
    sandbox.py  generated code run with its tests in a guarded child Python
    systems.py  hosted alone, expert alone, proxy-tuned per strategy, white-box
    scoring.py  letter choices and teacher-forced log-likelihoods from distributions
    runner.py   resumable runs: one fsynced result line per (item, system)
    stats.py    bootstrap intervals, exact McNemar, paired bootstrap (pure)
    report.py   summary.json, summary.md, summary.png

From Python::

    from blackbox_proxy.evaluation import Settings, load_task, run_eval

    task = load_task("choice", "mmlu_sample.jsonl", limit=100)
    summary, report = run_eval(task, ["hosted", "expert", "per-step"], "eval_mc",
                               tuner=dict(base_url=URL, model=NAME, expert=E, anti_expert=A, top_k=20),
                               settings=Settings(alpha=1.0), fingerprint={"task": task.name, "data": task.digest})

Names are imported on first use: importing this package loads no torch.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "EvalItem": "tasks", "Task": "tasks", "load_task": "tasks", "TASKS": "tasks",
    "Settings": "systems", "SYSTEMS": "systems",
    "run_eval": "runner", "arun_eval": "runner", "read_results": "runner",
    "build_report": "report", "write_report": "report", "markdown": "report",
    "bootstrap_ci": "stats", "mcnemar_exact": "stats", "paired_bootstrap": "stats",
    "run_program": "sandbox",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
