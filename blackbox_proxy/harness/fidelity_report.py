"""The fidelity report (:mod:`.fidelity`) as files: ``fidelity.json``, ``fidelity.md`` and plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Fidelity: {report.get('preset', 'custom')}", "",
             f"{report.get('description', '')}", "",
             "| k | per-step TV | per-step KL | top-1 agreement | greedy top-1 with the tail | greedy tail calls "
             "| floor TV | per-step TV / floor | speculative TV | tail calls per token | speculative TV, candidates only |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    def num(x: float) -> str:
        return f"{x:.4f}" if x >= 1e-3 or x == 0 else f"{x:.1e}"

    for k, row in report["per_k"].items():
        ratio = row.get("per_step_tv_over_floor")
        lines.append(f"| {k} | {num(row['per_step_tv'])} | {num(row['per_step_kl'])} | {row['top1_agreement']:.2%} | "
                     f"{row.get('greedy_top1_agreement', row['top1_agreement']):.2%} | "
                     f"{row.get('greedy_tail_calls', 0.0):.3f} | {num(row['floor_tv'])} | {'-' if ratio is None else f'{ratio:.3f}'} | "
                     f"{num(row['speculative_tv'])} | {row.get('tail_calls_per_token', 0.0):.3f} | "
                     f"{num(row.get('speculative_old_tv', row['speculative_tv']))} |")
    lines.append("")
    lines.append(f"{report['positions']} positions over {report.get('prompts', '?')} prompts.")
    probes = report.get("tail_probes")
    if probes:
        lines.append(f"Speculative with tail probes: {probes['draws']} draws per probe (one call), logit_bias "
                     f"cap {probes['logit_bias_cap']}; TV averaged over {probes['samples']} simulated probes per "
                     "position (Monte Carlo noise only adds to it). Tail calls per token: the probability that a "
                     "position asks a probe. Candidates only: what hosts without logit_bias get.")
    if probes:
        lines.append("Greedy top-1 with the tail: the argmax per-step and greedy speculative take, the tail probe "
                     "(one call where a token outside the top-k may beat the candidates' argmax) simulated exactly "
                     "under the same logit_bias cap; greedy tail calls: the share of positions that ask one.")
    if "alignment" in report:
        al = report["alignment"]
        lines.append(f"Alignment alone ({al['candidates']} candidates that tokenise back to themselves, canonical "
                     f"contexts): |aligned P − token P| mean {al['mean_abs_prob_error']:.2e}, "
                     f"p99 {al['p99_abs_prob_error']:.2e}, max {al['max_abs_prob_error']:.2e}.")
    if "hosted_mass_outside_reference" in report:
        lines.append(f"Hosted probability mass outside the reference candidates, mean per position: "
                     f"{report['hosted_mass_outside_reference']:.4f}.")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """One PNG per metric vs k, the floor drawn on the TV plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(report["per_k"])
    xs = range(len(keys))
    rows = [report["per_k"][k] for k in keys]
    paths = []
    for metric, title in (("tv", "total variation vs exact"), ("per_step_kl", "KL(per-step || exact)"),
                          ("top1_agreement", "top-1 agreement with exact")):
        fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
        if metric == "tv":
            ax.plot(xs, [r["per_step_tv"] for r in rows], "o-", label="per-step")
            ax.plot(xs, [r["speculative_tv"] for r in rows], "s-", label="speculative (tail probes)")
            ax.plot(xs, [r.get("speculative_old_tv", r["speculative_tv"]) for r in rows], "^:",
                    label="speculative (candidates only)")
            ax.plot(xs, [r["floor_tv"] for r in rows], "k--", label="floor (mass outside top-k)")
            ax.set_yscale("symlog", linthresh=1e-3)
            name = "fidelity_tv.png"
        else:
            ax.plot(xs, [r[metric] for r in rows], "o-")
            name = f"fidelity_{metric}.png"
        ax.set_xticks(list(xs), keys)
        ax.set_xlabel("k (candidates per position)")
        ax.set_title(f"{report.get('preset', '')}: {title}", fontsize=10)
        ax.grid(alpha=0.3)
        if metric == "tv":
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """``fidelity.json``, ``fidelity.md`` and the PNGs in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(_strict_json(report), indent=1, allow_nan=False) + "\n")
    (out / "fidelity.md").write_text(markdown(report))
    return [out / "fidelity.json", out / "fidelity.md", *plot(report, out)]


def _strict_json(value: Any) -> Any:
    """The report with non-finite numbers (an infinite KL) as strings: JSON has no Infinity."""
    if isinstance(value, dict):
        return {str(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
