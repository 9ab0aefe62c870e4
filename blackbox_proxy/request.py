"""What a generation is asked to do, validated once for every front end.

Today this module holds the helpers that every front end shares (stop strings); the validated
generation request object grows here.
"""

from __future__ import annotations

from collections.abc import Iterable


def cut_at_stop(text: str, stops: Iterable[str]) -> str | None:
    """``text`` cut before the earliest stop string it contains, or None when it holds none.

    >>> cut_at_stop("12 + 7 = 19\\nQuestion", ["\\nQuestion", "#"])
    '12 + 7 = 19'
    >>> cut_at_stop("no stop here", ["\\n"]) is None
    True
    """
    hits = [text.find(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else None
