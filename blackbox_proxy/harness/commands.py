"""The harness's commands of ``blackbox-proxy``: ``demo`` (real models on loopback, no API key)
and ``compare`` (fidelity of black-box vs exact proxy tuning). ``blackbox_proxy/__main__.py`` adds
them to the product's commands (:mod:`blackbox_proxy.apps.cli`); the product never imports them.

Nothing heavy at import time: the models, torch and the servers load inside the command.
"""

from __future__ import annotations

import click

from ..apps.cli_options import PORT, generation_options, setup_logging
from ..request import GenerationRequest


@click.command()
@click.option("--preset", type=click.Choice(["same-tokenizer", "same-tokenizer-chat", "cross-tokenizer"]),
              default="same-tokenizer",
              show_default=True, help="which embedded setup to measure")
@click.option("--prompts", type=click.IntRange(min=1), default=8, show_default=True, help="held-out problems")
@generation_options("max_tokens", "alpha", max_tokens=dict(default=24))
@click.option("--k-ref", type=click.IntRange(min=2), default=100, show_default=True,
              help="cross-tokenizer: the k whose pipeline output is the reference")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="fidelity", show_default=True,
              help="folder for fidelity.json, fidelity.md and the PNG plots")
@click.option("--no-progress", is_flag=True)
@click.option("-v", "--verbose", count=True)
def compare(preset: str, prompts: int, max_tokens: int, alpha: float, k_ref: int, out_dir: str, no_progress: bool,
            verbose: int) -> None:
    """Measure black-box proxy tuning against exact (white-box) proxy tuning, per position.

    For k in 1, 2, 5, 10, 20 and all: total variation, KL and top-1 agreement of the per-step
    distribution, greedy's top-1 agreement with its tail probe and the calls that costs, the
    floor (mass outside the top-k), and the TV of what the speculative strategy draws. Writes
    OUT/fidelity.json, OUT/fidelity.md and PNG plots.
    """
    setup_logging(verbose)
    from .fidelity import run_preset
    from .fidelity_report import write_report

    GenerationRequest.check_defaults(alpha=alpha, max_tokens=max_tokens)
    report = run_preset(preset, prompts=prompts, max_tokens=max_tokens, alpha=alpha, k_ref=k_ref,
                        progress=False if no_progress else None)
    paths = write_report(report, out_dir)
    from .fidelity_report import markdown

    click.echo(markdown(report))
    click.echo("wrote " + ", ".join(str(p) for p in paths), err=True)


@click.command()
@click.option("--prompts", type=click.IntRange(min=1), default=3, show_default=True, help="held-out problems to show")
@generation_options("max_tokens", "alpha", max_tokens=dict(default=40))
@click.option("--top-k", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--port", type=PORT, default=None, help="port for the hosted stand-in (default: a free one)")
@click.option("-v", "--verbose", count=True)
def demo(prompts: int, max_tokens: int, alpha: float, top_k: int, port: int | None, verbose: int) -> None:
    """Proxy-tune a real hosted model on loopback, no API key: Gemma-3-270M (base) steered by
    SmolLM2-135M-Instruct with and without an arithmetic LoRA adapter.

    Prepares the models on first run (about 2 minutes), then prints hosted alone, expert alone
    and proxy-tuned answers side by side.
    """
    setup_logging(verbose)
    GenerationRequest.check_defaults(alpha=alpha, max_tokens=max_tokens)
    from .demo import check_installed, run_demo

    check_installed()
    run_demo(prompts=prompts, max_tokens=max_tokens, alpha=alpha, port=port, top_k=top_k, echo=click.echo)
