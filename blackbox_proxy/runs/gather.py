"""Running several generations at once where the first failure cancels the rest (batch runs, eval, the tuned server)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def gather_or_cancel(tasks: Iterable[asyncio.Future]) -> None:
    """Wait for all; at the first failure cancel the rest and re-raise it (no more paid calls
    for work whose sibling already failed)."""
    tasks = list(tasks)
    try:
        for finished in asyncio.as_completed(tasks):
            await finished
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
