"""Run a generated program with its tests in a child Python, with a timeout and no network.

The child is ``python -I -B`` (isolated: no user site, no PYTHON* variables, no bytecode
written) in a fresh temporary folder, in its own process group, with an empty environment. A
small guard runs first, before the program:

- resource limits: CPU seconds, address space, file size, no core dumps;
- an audit hook (PEP 578; hooks cannot be removed once added) that refuses creating or using
  sockets, starting processes (``subprocess``, ``os.system``, ``exec*``, ``fork``, ``spawn``),
  signalling other processes, deleting or renaming files, and opening files for writing outside
  the temporary folder.

When the wall-clock timeout passes, the whole process group is killed. The outcome is
``passed`` (exit status 0), ``failed`` (the last line of stderr says why) or ``timeout``.

This guards against accidents (an infinite loop, a test that deletes files or calls out), not
against code written to escape: a determined program can get around audit hooks (ctypes, which
stays allowed because numpy needs it, or any C extension). Run untrusted code in a container or VM as well. Left out:
Windows (``resource`` and process groups are POSIX).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TIMEOUT = 10.0  # seconds of wall-clock time per program
DEFAULT_MEMORY = 2 << 30  # bytes of address space
DEFAULT_FILE_SIZE = 16 << 20  # bytes per file written
_STDERR_KEEP = 4000

# Runs in the child before the program; argv: program path, cpu seconds, memory bytes, file bytes.
GUARD = r'''
import os, resource, sys

def _guard():
    path, cpu, memory, fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    for limit, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (memory, memory)),
                         (resource.RLIMIT_FSIZE, (fsize, fsize)), (resource.RLIMIT_CORE, (0, 0))):
        try:
            resource.setrlimit(limit, value)
        except (ValueError, OSError):
            pass
    root = os.path.realpath(os.path.dirname(path)) + os.sep
    with open(path, encoding="utf-8") as handle:
        source = handle.read()
    refused = {
        "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.sendto", "socket.sendmsg", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
        "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
        "os.remove", "os.rmdir", "os.rename", "os.truncate", "shutil.rmtree", "os.chmod", "os.chown",
    }
    writing = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def hook(event, args):
        if event in refused:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in str(mode) for c in "wax+") or flags & writing:
                target = os.path.realpath(os.fsdecode(args[0]))
                if not target.startswith(root):
                    raise PermissionError(f"sandbox: writing {target} is not allowed")

    sys.addaudithook(hook)
    sys.argv = [path]
    code = compile(source, path, "exec")
    return code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}

_code, _globals = _guard()
del _guard
exec(_code, _globals)
'''


@dataclass(frozen=True)
class Outcome:
    """How one program ended: ``status`` is ``passed``, ``failed`` or ``timeout``; ``error`` the
    last line of its stderr (empty when it passed); ``stderr`` its tail; ``seconds`` wall time."""

    status: str
    error: str
    stderr: str
    seconds: float
    returncode: int | None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_program(source: str, *, timeout: float = DEFAULT_TIMEOUT, memory: int = DEFAULT_MEMORY,
                file_size: int = DEFAULT_FILE_SIZE, python: str | None = None) -> Outcome:
    """Run ``source`` as a Python program under the guard; see the module docstring.

    >>> run_program("assert 1 + 1 == 2").status
    'passed'
    >>> outcome = run_program("import socket; socket.socket()")
    >>> outcome.status, outcome.error
    ('failed', 'PermissionError: sandbox: socket.__new__ is not allowed')
    """
    if not (timeout > 0):
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    with tempfile.TemporaryDirectory(prefix="blackbox-proxy-sandbox-") as folder:
        path = Path(folder) / "program.py"
        path.write_text(source, encoding="utf-8")
        cpu = max(1, int(timeout + 1))
        command = [python or sys.executable, "-I", "-B", "-c", GUARD, str(path), str(cpu), str(memory), str(file_size)]
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": folder, "TMPDIR": folder,
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            _, err = proc.communicate()
            stderr = err.decode("utf-8", errors="replace")[-_STDERR_KEEP:]
            return Outcome("timeout", f"timed out after {timeout:g} s", stderr, time.perf_counter() - started, None)
        finally:
            if proc.poll() is None:
                _kill_group(proc)
                proc.wait()
        seconds = time.perf_counter() - started
    stderr = err.decode("utf-8", errors="replace")[-_STDERR_KEEP:]
    if proc.returncode == 0:
        return Outcome("passed", "", stderr, seconds, 0)
    if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not stderr.strip():
        return Outcome("timeout", f"CPU limit reached ({cpu} s)", stderr, seconds, proc.returncode)
    reason = _last_line(stderr) or f"exit status {proc.returncode}"
    return Outcome("failed", reason, stderr, seconds, proc.returncode)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (the child is its leader: start_new_session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
