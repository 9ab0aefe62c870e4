"""The report of an evaluation: per-system scores with 95% intervals, paired tests, files.

From the result lines of the current items (``--limit`` applies), per system:

- answers and choices: accuracy (the mean of ``correct``) with its bootstrap interval;
- loglik: bits per byte over the covered bytes (lower is better) with its interval, beside the
  coverage (reference tokens among the candidates), the token perplexity
  exp(−Σ loglik / Σ covered tokens) and the number of items covered in full. A system that
  misses tokens is scored on the easier rest: read the coverage column first.

Every pair of systems is compared on the items both answered: exact McNemar on correct/incorrect,
or a paired bootstrap of bits per byte (items both covered at least in part). Written as
``summary.json``, ``summary.md`` and ``summary.png`` (matplotlib, Agg; skipped with a warning
when matplotlib is not installed). Left out: running anything (``runner.py``).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .stats import CONFIDENCE, bootstrap_ci, mcnemar_exact, paired_bootstrap
from .tasks import Task

logger = logging.getLogger(__name__)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _interval(values: Sequence[float], seed: int) -> dict[str, Any]:
    if not values:
        return {"mean": None, "low": None, "high": None}
    mean, low, high = bootstrap_ci(values, seed=seed)
    return {"mean": mean, "low": low, "high": high}


def _system_row(kind: str, name: str, rows: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    usage = [r["usage"] for r in rows if isinstance(r.get("usage"), dict)]
    out: dict[str, Any] = {"system": name, "n": len(rows), "seconds_per_item": _mean([r.get("seconds", 0.0) for r in rows])}
    if usage:
        out["api_calls_per_item"] = _mean([u.get("api_calls", 0) for u in usage])
    if kind == "loglik":
        values = [r["bits_per_byte"] for r in rows if r.get("bits_per_byte") is not None]
        tokens, covered = sum(r["tokens"] for r in rows), sum(r["covered"] for r in rows)
        out.update(metric="bits_per_byte", **_interval(values, seed), scored=len(values),
                   coverage=covered / tokens if tokens else None,
                   full_coverage_items=sum(r["covered"] == r["tokens"] for r in rows),
                   token_perplexity=math.exp(-sum(r["loglik"] for r in rows) / covered) if covered else None)
        return out
    out.update(metric="accuracy", **_interval([float(bool(r["correct"])) for r in rows], seed))
    if kind == "choice":
        out["letter_mass"] = _mean([r.get("letter_mass", 0.0) for r in rows])
    if any("formatted" in r for r in rows):
        out["formatted"] = _mean([float(bool(r.get("formatted"))) for r in rows])
    if any("status" in r for r in rows):
        out["timeouts"] = sum(r.get("status") == "timeout" for r in rows)
    return out


def _pair(kind: str, a: str, b: str, rows_a: dict[str, dict], rows_b: dict[str, dict], seed: int) -> dict[str, Any]:
    shared = [k for k in rows_a if k in rows_b]
    if kind == "loglik":
        both = [k for k in shared if rows_a[k].get("bits_per_byte") is not None and rows_b[k].get("bits_per_byte") is not None]
        out: dict[str, Any] = {"a": a, "b": b, "n": len(both), "test": "paired bootstrap (bits per byte, b - a)"}
        if both:
            out.update(paired_bootstrap([rows_a[k]["bits_per_byte"] for k in both],
                                        [rows_b[k]["bits_per_byte"] for k in both], seed=seed))
        return out
    only_a = sum(bool(rows_a[k]["correct"]) and not rows_b[k]["correct"] for k in shared)
    only_b = sum(bool(rows_b[k]["correct"]) and not rows_a[k]["correct"] for k in shared)
    return {"a": a, "b": b, "n": len(shared), "test": "exact McNemar", "a_only": only_a, "b_only": only_b,
            "p": mcnemar_exact(only_a, only_b)}


def build_report(task: Task, records: Sequence[dict[str, Any]], *, order: Sequence[str] = (), seed: int = 0,
                 settings: dict[str, Any] | None = None, unsupported: dict[str, str] | None = None) -> dict[str, Any]:
    """The report of ``records`` (result lines) for ``task``'s items; systems in ``order`` first."""
    wanted = {json.dumps(item.id) for item in task.items}
    by_system: dict[str, dict[str, dict]] = {}
    for record in records:
        key = json.dumps(record.get("item"))
        if key in wanted:
            by_system.setdefault(record["system"], {})[key] = record
    names = [n for n in order if n in by_system] + sorted(n for n in by_system if n not in order)
    systems = [_system_row(task.kind, n, list(by_system[n].values()), seed) for n in names]
    pairs = [_pair(task.kind, a, b, by_system[a], by_system[b], seed) for a, b in itertools.combinations(names, 2)]
    return {"task": task.name, "kind": task.kind, "source": task.source, "items": len(task.items),
            "confidence": CONFIDENCE, "seed": seed, "settings": dict(settings or {}), "systems": systems,
            "pairs": pairs, "left_out": dict(unsupported or {})}


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return str(x)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: one table of systems, one of paired tests."""
    loglik = report["kind"] == "loglik"
    lines = [f"# {report['task']} ({report['kind']}): {report['items']} items", "",
             f"Source: {report['source']}. Intervals: {report['confidence']:.0%} percentile bootstrap "
             f"(seed {report['seed']}).", ""]
    if loglik:
        lines += ["| system | n | bits/byte (lower is better) | 95% CI | coverage | items fully covered | token ppl | API calls/item | s/item |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in report["systems"]:
            lines.append(f"| {s['system']} | {s['n']} | {_num(s['mean'], 4)} | [{_num(s['low'], 4)}, {_num(s['high'], 4)}] "
                         f"| {_pct(s['coverage'])} | {s['full_coverage_items']} | {_num(s['token_perplexity'], 4)} "
                         f"| {_num(s.get('api_calls_per_item'), 1)} | {_num(s['seconds_per_item'], 2)} |")
    else:
        extra = [c for c in ("formatted", "letter_mass", "timeouts") if any(c in s for s in report["systems"])]
        titles = {"formatted": "has #### line", "letter_mass": "mass on letters", "timeouts": "timeouts"}
        lines += ["| system | n | accuracy | 95% CI | " + " | ".join(titles[c] for c in extra)
                  + (" | " if extra else "") + "API calls/item | s/item |",
                  "|---|---|---|---|" + "---|" * len(extra) + "---|---|"]
        for s in report["systems"]:
            cells = [_pct(s.get(c)) if c != "timeouts" else str(s.get(c, "-")) for c in extra]
            lines.append(f"| {s['system']} | {s['n']} | {_pct(s['mean'])} | [{_pct(s['low'])}, {_pct(s['high'])}] | "
                         + " | ".join(cells) + (" | " if cells else "")
                         + f"{_num(s.get('api_calls_per_item'), 1)} | {_num(s['seconds_per_item'], 2)} |")
    if report["pairs"]:
        lines += ["", "Paired tests (items both systems answered):", ""]
        if loglik:
            lines += ["| A | B | n | mean B − A (bits/byte) | 95% CI | p (paired bootstrap) |", "|---|---|---|---|---|---|"]
            lines += [f"| {p['a']} | {p['b']} | {p['n']} | {_num(p.get('diff'), 4)} | "
                      f"[{_num(p.get('low'), 4)}, {_num(p.get('high'), 4)}] | {_num(p.get('p'), 3)} |" for p in report["pairs"]]
        else:
            lines += ["| A | B | n | only A right | only B right | p (exact McNemar) |", "|---|---|---|---|---|---|"]
            lines += [f"| {p['a']} | {p['b']} | {p['n']} | {p['a_only']} | {p['b_only']} | {_num(p['p'], 3)} |"
                      for p in report["pairs"]]
    for name, reason in report.get("left_out", {}).items():
        lines.append(f"\n{name} left out: {reason}.")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """One bar per system with its interval; None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed, so no plot was drawn; `pip install matplotlib` adds it")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in report["systems"] if s["mean"] is not None]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * max(1, len(rows)), 3.6), dpi=110)
    means = [s["mean"] for s in rows]
    errors = [[s["mean"] - s["low"] for s in rows], [s["high"] - s["mean"] for s in rows]]
    ax.bar(range(len(rows)), means, yerr=errors, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(rows)), [s["system"] for s in rows], rotation=20)
    loglik = report["kind"] == "loglik"
    ax.set_ylabel("bits per byte (lower is better)" if loglik else "accuracy")
    if not loglik:
        ax.set_ylim(0, 1)
    ax.set_title(f"{report['task']}: {report['items']} items, {report['confidence']:.0%} bootstrap CI", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """``summary.json``, ``summary.md`` and ``summary.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "summary.json", out / "summary.md"]
    paths[0].write_text(json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(report), encoding="utf-8")
    png = plot(report, out / "summary.png")
    return paths + ([png] if png else [])
