"""The recording a replay host answers from (:mod:`.replay`): answers keyed by request, in a file.

A JSON-lines file, one answer per line, keyed by method, path and the canonical JSON of the
request body (sorted keys, ``stream``/``stream_options`` left out, so a streamed request is
answered from the non-streamed recording). Headers, the API key among them, are never stored.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError

logger = logging.getLogger(__name__)

STREAM_FIELDS = frozenset({"stream", "stream_options"})


def canonical_body(raw: bytes) -> Any:
    """A request body as the recording keys it: its JSON without the streaming fields, the raw
    text when it is not JSON, None when empty."""
    if not raw:
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
    return {k: v for k, v in body.items() if k not in STREAM_FIELDS} if isinstance(body, dict) else body


def request_key(method: str, path: str, body: Any) -> str:
    """The recording's key of a request.

    >>> request_key("POST", "/v1/completions", {"prompt": "Hi", "model": "m"})
    'POST /v1/completions {"model":"m","prompt":"Hi"}'
    """
    return f"{method.upper()} {path} " + json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Answer:
    """One recorded answer: HTTP status, content type and the exact body text."""

    status: int
    content_type: str
    body: str


class Recording:
    """Recorded answers in a JSON-lines file; each line holds ``method``, ``path``, ``request``
    (the canonical body), ``status``, ``content_type`` and ``body``. The first answer to a key
    is kept. A torn last line (a recording stopped mid-write) is dropped with a warning; any
    other unreadable line is an error."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise ConfigurationError(f"the recording {self.path} is a folder; pass a file such as "
                                     f"{self.path / 'answers.jsonl'}")
        self._answers: dict[str, Answer] = {}
        self._lock = threading.Lock()
        self._torn_at: int | None = None  # where a torn last line starts: cut before the next append
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        lines = self.path.read_bytes().split(b"\n")
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        offset = 0
        for number, line in enumerate(lines):
            line_start, offset = offset, offset + len(line) + 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = request_key(row["method"], row["path"], row["request"])
                answer = Answer(int(row["status"]), str(row["content_type"]), str(row["body"]))
            except (ValueError, KeyError, TypeError):
                if number == last:
                    logger.warning("%s: dropped a torn last line (a recording stopped mid-write)", self.path)
                    self._torn_at = line_start
                    continue
                raise ConfigurationError(f"{self.path} line {number + 1} is not a recorded answer; delete the file "
                                         "(or that line) and record again") from None
            self._answers.setdefault(key, answer)

    def get(self, key: str) -> Answer | None:
        with self._lock:
            return self._answers.get(key)

    def add(self, method: str, path: str, request: Any, answer: Answer) -> None:
        """Store ``answer`` (appended to the file) unless the key already has one."""
        key = request_key(method, path, request)
        row = {"method": method.upper(), "path": path, "request": request, "status": answer.status,
               "content_type": answer.content_type, "body": answer.body}
        with self._lock:
            if key in self._answers:
                return
            self._answers[key] = answer
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._torn_at is not None:
                with self.path.open("r+b") as out:
                    out.truncate(self._torn_at)
                self._torn_at = None
            with self.path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")

    def __len__(self) -> int:
        with self._lock:
            return len(self._answers)

    def __repr__(self) -> str:
        return f"Recording({str(self.path)!r}, {len(self)} answers)"
