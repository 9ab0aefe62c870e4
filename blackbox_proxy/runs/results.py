"""The results file of a long run: one strict JSON line per finished item, written whole and
fsynced, the file locked for the run and checked before the first paid call (``ResultsFile``),
and read back on resume (``read_done``). Used by ``blackbox-proxy batch`` (:mod:`blackbox_proxy.apps.batch`) and
``blackbox-proxy eval`` (:mod:`blackbox_proxy.evaluation.runner`).

Left out: what a line holds (the callers), and the input side (:mod:`blackbox_proxy.apps.batch`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import stat
from pathlib import Path
from typing import Any

from .._logging import redact
from ..errors import ConfigurationError

logger = logging.getLogger(__name__)

MIN_FREE_BYTES = 1 << 20  # less free space than this under the output: refused before any paid call


class BatchOutputError(ConfigurationError):
    """The results file cannot be opened, locked, read as results or written."""



def id_key(value: Any) -> str:
    """Ids compare by their JSON spelling: ``1`` and ``"1"`` are different ids."""
    return json.dumps(value, ensure_ascii=False)


RESULT_KEYS = ("id", "text", "finish_reason")  # what every results line has (an input line has none of the last two)


def whole_lines(path: Path) -> list[str]:
    """The lines of a results file (none if it does not exist), after cutting off bytes after the
    last newline: a line is written whole with its newline, so those are an interrupted write."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logger.warning("%s ends with an unfinished line (%d bytes, from an interrupted run); removing it",
                       path, len(data) - end)
        with open(path, "r+b") as handle:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
    return data[:end].decode("utf-8", errors="replace").splitlines()


def read_done(path: str | os.PathLike) -> set[str]:
    """Ids already in a results file, after removing a last line cut short by a crash.

    A complete line always ends with a newline (results are written whole, newline included), so
    bytes after the last newline are an unfinished write and are cut off. A line in the middle
    that is not a result (broken JSON, or an input line: no ``text``/``finish_reason``) is not
    ours to repair: it raises.
    """
    path = Path(path)
    done: set[str] = set()
    for number, raw in enumerate(whole_lines(path), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            key = id_key(obj["id"])
            result = all(k in obj for k in RESULT_KEYS)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError):
            obj, result = None, False
        if not result:
            looks = " (it looks like an input line: is this a copy of the input?)" if isinstance(obj, dict) and (
                "prompt" in obj or "messages" in obj) else ""
            raise BatchOutputError(
                f"the results file {path} line {number} is not a result line{looks}; pass another --output, or move "
                "the file away"
            )
        done.add(key)
    return done


def json_line(record: Any) -> str:
    """``record`` as one line of strict JSON: numbers that are not finite (a ``-inf`` logprob)
    become ``null``; text that UTF-8 cannot hold (a lone surrogate) is written as a ``\\u``
    escape rather than failing. Ends with a newline.

    >>> json_line({"id": "é", "logprob": float("-inf")})
    '{"id": "é", "logprob": null}\\n'
    >>> json_line({"id": "\\ud800"})
    '{"id": "\\\\ud800"}\\n'
    """
    clean = finite_json(record)
    line = json.dumps(clean, ensure_ascii=False, allow_nan=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(clean, ensure_ascii=True, allow_nan=False)
    return line + "\n"


def finite_json(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by None (JSON has no inf/nan);
    dicts, lists and tuples are copied, anything else returned as is."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


class ResultsFile:
    """The output of one run: opened, locked and checked before the first paid call, then
    appended to line by line. Context manager.

    Each line is written whole, then fsynced before the prompt counts as done; a write that fails
    is undone (the file cut back to its last whole line) and raises :class:`BatchOutputError`.
    The lock (``flock``, released when the file is closed, also by a crash) keeps a second run
    off the same file. A file this run created and never wrote to is removed on close.

    ``errors=True`` opens ``<output>.errors.jsonl`` instead: emptied on open (it holds the
    latest run's failures only), not locked (the results file's lock covers it), messages
    masked once more on the way to disk.
    """

    def __init__(self, path: str | os.PathLike, *, errors: bool = False, flag: str = "--output",
                 run: str = "batch run") -> None:
        self.path = Path(path)
        self.flag, self.run = flag, run  # how errors name the option that chose the file, and the run
        self.errors = errors
        self.errors_path = self.path.with_name(self.path.name + ".errors.jsonl")
        self.what = "errors file" if errors else "results file"
        self.written = 0
        self._fd: int | None = None
        self._created = False

    def open(self) -> "ResultsFile":
        path = self.path
        if path.is_dir():
            raise BatchOutputError(f"the output {path} is a folder; pass a file name, e.g. {self.flag} "
                                   f"{path / 'results.jsonl'}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BatchOutputError(f"cannot create the folder {path.parent} for the results ({exc.strerror}); "
                                   f"pass another {self.flag}") from None
        self._created = self.errors or not path.exists()
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if self.errors else 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise BatchOutputError(f"cannot open the {self.what} {path} for writing ({exc.strerror}); fix its "
                                   f"permissions or pass another {self.flag}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BatchOutputError(f"the output {path} is not a regular file; pass a file name with {self.flag}")
            if not self.errors:
                self._lock(fd)
            space = os.fstatvfs(fd)
            if space.f_blocks == 0:  # /proc, /sys: files that are not stored anywhere
                raise BatchOutputError(f"the output {path} is on a file system that stores no files (such as /proc "
                                       f"or /sys); pass a file on a disk with {self.flag}")
            if space.f_bavail * space.f_frsize < MIN_FREE_BYTES:
                raise BatchOutputError(f"the disk holding {path} is full; free some space or pass another {self.flag}")
        except BaseException:
            self._close(fd)
            raise
        self._fd = fd
        return self

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._created = False  # another run's file
            raise BatchOutputError(f"the results file {self.path} is in use by another {self.run}; wait for it to "
                                   f"finish, or pass another {self.flag}") from None
        except OSError as exc:  # e.g. a network file system without locks
            logger.warning("cannot lock %s (%s); make sure no other run writes to it", self.path, exc.strerror)

    def read_done(self) -> set[str]:
        """The ids already in the file (see :func:`read_done`); call with the file open (locked)."""
        return read_done(self.path)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one strict JSON line, flushed to disk."""
        if self._fd is None:
            raise RuntimeError(f"the {self.what} is not open")
        line = json_line(record)
        data = (redact(line) if self.errors else line).encode("utf-8")
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, start)  # no half line left behind
            except OSError:
                pass  # the next run removes a torn last line
            raise BatchOutputError(
                f"cannot write to {self.path} ({exc.strerror}) after {self.written} line(s) this run; what was "
                "written is kept: free space (or fix the file) and run the same command again to finish the rest"
            ) from None
        self.written += 1

    def _close(self, fd: int) -> None:
        try:
            if self._created and os.fstat(fd).st_size == 0:
                self.path.unlink(missing_ok=True)  # removed while still locked: no other run saw it
        except OSError:
            pass
        os.close(fd)  # releases the lock

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._close(fd)

    def __enter__(self) -> "ResultsFile":
        return self.open() if self._fd is None else self

    def __exit__(self, *exc: Any) -> None:
        self.close()
