"""How long to wait before retrying a call: shared by the hosted clients (``hosts/retry.py``) and
the vLLM scorer's connection (``local/vllm_client.py``), so both back off alike. The numbers
are in ``_constants.py``."""

from __future__ import annotations

import random
from collections.abc import Callable

from . import _constants as C


def server_delay(header: Callable[[str], str | None]) -> float | None:
    """The server's ``retry-after-ms`` or ``retry-after`` (seconds), capped at ``MAX_RETRY_AFTER``;
    None when it sent neither (or an HTTP date).

    >>> server_delay({"retry-after": "2"}.get), server_delay({}.get)
    (2.0, None)
    """
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = header(name)
        if value:
            try:
                return min(C.MAX_RETRY_AFTER, max(0.0, float(value) * scale))
            except ValueError:
                pass  # an HTTP date: fall back to backoff
    return None


def backoff(attempt: int, rng: random.Random) -> float:
    """Jittered exponential backoff before retry ``attempt`` (1, 2, ...): ``INITIAL_RETRY_DELAY``
    doubling up to ``MAX_RETRY_DELAY``, +- ``RETRY_JITTER``."""
    base = min(C.MAX_RETRY_DELAY, C.INITIAL_RETRY_DELAY * 2 ** (attempt - 1))
    return base * (1 + C.RETRY_JITTER * (2 * rng.random() - 1))
