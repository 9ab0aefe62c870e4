"""An optional response cache: identical hosted API requests are not paid for twice.

A SQLite file maps a request (base URL, endpoint and the JSON body sent; never the API key) to
the JSON answer. Only complete answers are stored, and never a secret in them: a host that
echoes the request's ``Authorization`` header or the key in a successful body has the key
(every secret registered with :func:`~blackbox_proxy._logging.register_secret`), any bearer
token, and the value of any field named like a key replaced by ``***`` before the row is written. WAL journaling and a busy timeout make it safe
for several processes and threads writing at once; a write that loses a race for the same key
keeps the first answer.

What it leaves out: expiry and size limits (delete the file to start over). A sampled request
(temperature > 0) with no seed is stored too: asking it again replays the stored draw, which is
what a resumed run wants.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from .._logging import redact
from ..errors import ConfigurationError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_TABLE = "responses"
MASK = "***"
# "Bearer <token>" as a header value (case-insensitive scheme, a token of 8+ token characters)
_BEARER = re.compile(r"(?i)\b(bearer)(\s+)[A-Za-z0-9\-._~+/]{8,}=*")
# field names whose value is a credential wherever they appear in a body
# (not "token": every logprob entry has one)
_SECRET_FIELDS = re.compile(r"(?i)^(authorization|proxy-authorization|x-api-key|api[-_]?key|openai[-_]api[-_]key|"
                            r"access[-_]token|bearer[-_]token)$")


def scrub(body: str) -> str:
    """``body`` (a JSON answer) without credentials: registered secrets, bearer tokens and the
    values of fields named like keys become ``***``. Returned unchanged (same text) when it
    holds none, so ordinary answers are stored verbatim.

    >>> scrub('{"id": "x", "echo": {"Authorization": "Bearer sk-abcdef123456"}}')
    '{"id": "x", "echo": {"Authorization": "***"}}'
    >>> scrub('{"text": "the bearer of bad news"}')
    '{"text": "the bearer of bad news"}'
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return _BEARER.sub(rf"\1\2{MASK}", redact(body))
    changed = [False]

    def clean(value: Any, key: str | None = None) -> Any:
        if isinstance(value, str):
            if key is not None and _SECRET_FIELDS.match(key) and value:
                out = MASK
            else:
                out = _BEARER.sub(rf"\1\2{MASK}", redact(value))
            changed[0] |= out != value
            return out
        if isinstance(value, dict):
            return {k: clean(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    cleaned = clean(data)
    return json.dumps(cleaned, ensure_ascii=False) if changed[0] else body


class ResponseCache:
    """A SQLite cache of hosted API answers, keyed by a hash of the request without secrets.

    Example::

        >>> import tempfile, os
        >>> cache = ResponseCache(os.path.join(tempfile.mkdtemp(), "cache.sqlite"))
        >>> key = cache.key("http://127.0.0.1:8000/v1", "completions", {"model": "m", "prompt": "Hi"})
        >>> cache.get(key) is None
        True
        >>> cache.put(key, '{"id": "cmpl-1"}')
        >>> cache.get(key)
        '{"id": "cmpl-1"}'
        >>> cache.close()
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = 60.0) -> None:
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise ConfigurationError(f"the cache path {self.path} is a folder; pass a file name such as {self.path / 'cache.sqlite'}")
        if not self.path.parent.is_dir():
            raise ConfigurationError(f"the cache's folder {self.path.parent} does not exist; create it or pick another --cache path")
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {_TABLE} (key TEXT PRIMARY KEY, body TEXT NOT NULL, created REAL NOT NULL)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            (version,) = self._db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                raise ConfigurationError(
                    f"the response cache {self.path} stayed locked by another process for {timeout:g} s; retry, or "
                    "pass another --cache path"
                ) from None
            raise ConfigurationError(
                f"{self.path} is not a usable response cache ({exc}); pass another --cache path or delete the file"
            ) from None
        except sqlite3.DatabaseError as exc:
            raise ConfigurationError(
                f"{self.path} is not a usable response cache ({exc}); pass another --cache path or delete the file"
            ) from None
        if version != str(SCHEMA_VERSION):
            raise ConfigurationError(
                f"{self.path} is a response cache of another version ({version}); delete it or pass another --cache path"
            )

    @staticmethod
    def key(base_url: str, endpoint: str, request: dict[str, Any]) -> str:
        """SHA-256 of the canonical JSON of what is sent (the API key travels in a header and is
        not part of it)."""
        blob = json.dumps(
            {"v": SCHEMA_VERSION, "base_url": base_url, "endpoint": endpoint, "request": request},
            sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str,
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute(f"SELECT body FROM {_TABLE} WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, body: str) -> None:
        """Store an answer, credentials scrubbed (see :func:`scrub`); a write that fails (the file
        locked too long, a full disk) is logged, not raised: the answer is already paid for and
        the generation goes on."""
        body = scrub(body)
        try:
            with self._lock:
                self._db.execute(f"INSERT OR IGNORE INTO {_TABLE} VALUES (?, ?, ?)", (key, body, time.time()))
        except (sqlite3.Error, UnicodeEncodeError) as exc:  # e.g. a lone surrogate in the answer
            logger.warning("could not store an answer in the response cache %s (%s)", self.path, exc)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM {_TABLE}").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r})"
