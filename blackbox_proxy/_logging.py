"""Keep secrets out of logs: every log record (any logger) has registered secrets masked."""

from __future__ import annotations

import logging
import threading

_SECRETS: set[str] = set()
MIN_SECRET_LENGTH = 8
PLACEHOLDERS = frozenset({"no-key", "EMPTY", "empty", "none", "None", "dummy", "unused", "sk-no-key-required"})
_LOCK = threading.Lock()
_installed = False


def _mask(text: str) -> str:
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    return text


def _install() -> None:
    global _installed
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if _SECRETS:
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a bad format string is the caller's problem
                return record
            masked = _mask(message)
            if masked != message:
                record.msg, record.args = masked, None
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


def register_secret(secret: str | None) -> None:
    """Mask ``secret`` as ``***`` in every log record from now on (this library, SDK, HTTP)."""
    if not secret or len(secret) < MIN_SECRET_LENGTH or secret in PLACEHOLDERS:
        return  # masking a short word or a placeholder everywhere would garble logs and results
    with _LOCK:
        _SECRETS.add(secret)
        if not _installed:
            _install()


def redact(text: str) -> str:
    """``text`` with every registered secret masked (for messages and traces)."""
    return _mask(text) if _SECRETS else text
