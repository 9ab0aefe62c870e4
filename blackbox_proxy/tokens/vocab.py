"""Exact bytes of every token of a tokenizer, and byte-level indexes over them.

The hosted model and the small models talk in bytes, never in ids (DESIGN.md §2.2), so each
tokenizer is turned into a :class:`Vocabulary`: the exact byte string of every id (``None`` for
special tokens), which ids end a text, a sorted byte index that answers "which tokens start with
these bytes" as one contiguous range, and an encoder from bytes to canonical ids.

Bytes come from the tokenizer's own piece alphabet, never from ``decode([id])`` (which turns a
piece of a multi-byte character into U+FFFD and may add or strip spaces):
- byte-level BPE (GPT-2, SmolLM2, Llama-3, Qwen): pieces are written in GPT-2's byte-to-unicode
  alphabet; we invert it;
- SentencePiece style (Gemma, Llama-2, Mistral): '▁' is a space and ``<0xNN>`` a raw byte;
- tiktoken: ``decode_single_token_bytes``.
Left out: building a vocabulary from a tokenizer (``loaders.py``: Hugging Face, tiktoken, the
hosted model's tokenizer by name).
"""

from __future__ import annotations

import bisect
import codecs
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..errors import ConfigurationError

logger = logging.getLogger(__name__)

def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items (token ids, characters) ``a`` and ``b`` share.

    >>> common_prefix([1, 2, 3], [1, 2, 4, 5]), common_prefix("abc", "xbc")
    (2, 0)
    """
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_utf8(data: bytes) -> tuple[bytes, bytes]:
    """Split ``data`` into what is complete and an incomplete UTF-8 sequence at its very end, as
    Python's UTF-8 decoder sees them (a byte that can never begin a character, such as 0xF5, is
    invalid at once, not pending).

    Only a character cut off by the end of ``data`` is a tail (more bytes may complete it);
    invalid bytes elsewhere stay in the complete part (see :meth:`Vocabulary.encode_bytes`).

    >>> split_utf8("é".encode()[:1])
    (b'', b'\\xc3')
    >>> split_utf8(b"ab\\xe2\\x82")
    (b'ab', b'\\xe2\\x82')
    >>> split_utf8(b"a\\xff b"), split_utf8(b"a\\xf5")
    ((b'a\\xff b', b''), (b'a\\xf5', b''))
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(data[-4:], final=False)  # a pending sequence is at most 3 bytes long
    pending = decoder.getstate()[0]
    return (data[: len(data) - len(pending)], pending) if pending else (data, b"")


RANGE_CACHE = 1 << 16  # prefix ranges kept per vocabulary (the remainders of recent positions)


def _upper_bound(prefix: bytes) -> bytes | None:
    """Smallest byte string greater than every string that starts with ``prefix``."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class Vocabulary:
    """The byte view of one tokenizer.

    Args:
        token_bytes: for each id, its exact bytes, or ``None`` for special/unused ids.
        encode: text -> canonical ids (no special tokens added).
        end_ids: ids that end a text (EOS, end-of-turn).
        special_text: id -> literal text of special tokens (how APIs print them).
        name: for messages.

    Example::

        >>> v = Vocabulary([b"a", b"b", b"ab", None], encode=lambda s: [0] * len(s),
        ...                end_ids=[3], special_text={3: "</s>"})
        >>> [v.token_bytes[i] for i in v.prefix_ids(b"a")]
        [b'a', b'ab']
    """

    def __init__(
        self,
        token_bytes: Sequence[bytes | None],
        *,
        encode: Callable[[str], list[int]],
        end_ids: Iterable[int] = (),
        special_text: dict[int, str] | None = None,
        name: str = "tokenizer",
        prompt_prefix_ids: Sequence[int] = (),
    ) -> None:
        self.token_bytes: tuple[bytes | None, ...] = tuple(token_bytes)
        self.size = len(self.token_bytes)
        self.name = name
        self._encode = encode
        # Ids a server puts before an encoded text prompt (e.g. <bos>).
        self.prompt_prefix_ids: tuple[int, ...] = tuple(prompt_prefix_ids)
        self.special_text: dict[int, str] = dict(special_text or {})
        self.end_ids: frozenset[int] = frozenset(int(i) for i in end_ids if 0 <= int(i) < self.size)
        entries = sorted((b, i) for i, b in enumerate(self.token_bytes) if b)
        self._sorted_bytes: list[bytes] = [b for b, _ in entries]
        self.sorted_ids: tuple[int, ...] = tuple(i for _, i in entries)
        self._unique_sorted: list[bytes] = sorted(set(self._sorted_bytes))
        by_bytes: dict[bytes, list[int]] = {}
        for b, i in entries:
            by_bytes.setdefault(b, []).append(i)
        self._by_bytes = {b: tuple(ids) for b, ids in by_bytes.items()}
        self._by_text = {t: i for i, t in self.special_text.items()}
        self.max_token_bytes = max((len(b) for b in self._sorted_bytes), default=1)
        self.unique_bytes = all(len(ids) == 1 for ids in self._by_bytes.values())
        self._byte_tokens = {b[0]: ids[0] for b, ids in self._by_bytes.items() if len(b) == 1}
        self._roundtrip_warned = False
        self._extensions: dict[bytes, tuple[bytes, ...]] = {}
        # messages -> prompt text with this tokenizer's chat template, when it has one (HF loaders)
        self.render_chat: Callable[[list[dict[str, str]]], str] | None = None
        self._canonical: dict[bytes, int] = {}
        self._ranges: dict[bytes, tuple[int, int]] = {}  # prefix_range's answers (bounded)

    # ----- lookups -------------------------------------------------------------------------
    @functools.cached_property
    def textless_ids(self) -> tuple[int, ...]:
        """Ids without text that do not end a text (special and unused ids): never appended."""
        return tuple(i for i, b in enumerate(self.token_bytes) if b is None and i not in self.end_ids)

    def ids_for_bytes(self, data: bytes) -> tuple[int, ...]:
        """All ids whose bytes are exactly ``data`` (empty if none)."""
        return self._by_bytes.get(data, ())

    def id_for_special(self, text: str) -> int | None:
        return self._by_text.get(text)

    def is_end_text(self, text: str) -> bool:
        i = self._by_text.get(text)
        return i in self.end_ids if i is not None else False

    def prefix_range(self, prefix: bytes) -> tuple[int, int]:
        """Positions ``[lo, hi)`` in :attr:`sorted_ids` of every token starting with ``prefix``."""
        known = self._ranges.get(prefix)
        if known is not None:
            return known
        lo = bisect.bisect_left(self._sorted_bytes, prefix)
        upper = _upper_bound(prefix)
        hi = len(self._sorted_bytes) if upper is None else bisect.bisect_left(self._sorted_bytes, upper, lo)
        if len(self._ranges) >= RANGE_CACHE:
            self._ranges.clear()
        self._ranges[prefix] = (lo, hi)
        return lo, hi

    def prefix_ids(self, prefix: bytes) -> tuple[int, ...]:
        lo, hi = self.prefix_range(prefix)
        return self.sorted_ids[lo:hi]

    def minimal_extensions(self, data: bytes) -> tuple[bytes, ...]:
        """Byte strings of the tokens that strictly extend ``data`` with no token in between.

        "No token in between": no other token t with data < t < extension (as prefixes). The
        events "the text starts with e" for these e are disjoint, and together they cover every
        longer token that starts with ``data`` (DESIGN.md §2.2 step 3).
        """
        cached = self._extensions.get(data)
        if cached is not None:
            return cached
        sorted_bytes = self._unique_sorted
        lo = bisect.bisect_left(sorted_bytes, data)
        upper = _upper_bound(data)
        hi = len(sorted_bytes) if upper is None else bisect.bisect_left(sorted_bytes, upper, lo)
        out: list[bytes] = []
        i = lo
        while i < hi:
            token = sorted_bytes[i]
            if token == data:
                i += 1
                continue
            out.append(token)
            skip = _upper_bound(token)
            i = hi if skip is None else bisect.bisect_left(sorted_bytes, skip, i + 1, hi)
        result = self._extensions[data] = tuple(out)  # at most one entry per byte string asked
        return result

    # ----- encoding ------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        """Canonical ids of ``text``; falls back to greedy longest match if the tokenizer
        does not reproduce the exact bytes (e.g. it normalises text or adds a dummy prefix)."""
        if not text:
            return []
        ids = list(self._encode(text))
        data = text.encode("utf-8")
        if b"".join(self.token_bytes[i] or b"\x00\x00" for i in ids) == data:
            return ids
        if not self._roundtrip_warned:
            logger.warning(
                "%s does not reproduce the exact bytes of encoded text; using greedy longest-match "
                "tokenisation for alignment",
                self.name,
            )
            self._roundtrip_warned = True
        greedy = self.greedy_tokens(data)
        if greedy is None:
            raise ConfigurationError(f"{self.name} cannot represent the text {text[:40]!r} as tokens")
        return greedy

    def greedy_tokens(self, data: bytes) -> list[int] | None:
        """Longest-match segmentation of ``data`` into tokens (``None`` if impossible)."""
        ids: list[int] = []
        pos = 0
        while pos < len(data):
            for length in range(min(self.max_token_bytes, len(data) - pos), 0, -1):
                found = self._by_bytes.get(data[pos : pos + length])
                if found:
                    ids.append(found[0])
                    pos += length
                    break
            else:
                return None
        return ids

    def byte_token(self, byte: int) -> int | None:
        """The single-byte token for ``byte`` (byte-level BPE, ``<0xNN>`` pieces), if any."""
        return self._byte_tokens.get(byte)

    def encode_complete(self, data: bytes) -> list[int] | None:
        """Ids for bytes that hold no incomplete tail: canonical ids for each valid UTF-8 run,
        single-byte tokens for invalid bytes. ``None`` if a byte has no token."""
        ids: list[int] = []
        pos = 0
        while pos < len(data):
            try:
                ids += self.encode_text(data[pos:].decode("utf-8"))
                break
            except UnicodeDecodeError as exc:
                if exc.start:
                    ids += self.encode_text(data[pos : pos + exc.start].decode("utf-8"))
                for byte in data[pos + exc.start : pos + exc.end]:
                    token = self.byte_token(byte)
                    if token is None:
                        return None
                    ids.append(token)
                pos += exc.end
        return ids

    def encode_bytes(self, data: bytes) -> list[int] | None:
        """Ids whose bytes concatenate to ``data`` exactly (an incomplete tail as byte tokens).
        ``None`` if some byte has no token."""
        complete, tail = split_utf8(data)
        ids = self.encode_complete(complete)
        if ids is None:
            return None
        for byte in tail:
            token = self.byte_token(byte)
            if token is None:
                return None
            ids.append(token)
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """Ids a server would give a text prompt: its prefix ids (e.g. <bos>), then the
        tokenizer's own encoding (no round-trip fallback: this is what the model saw in training)."""
        return list(self.prompt_prefix_ids) + list(self._encode(text))

    def canonical_id(self, data: bytes) -> int | None:
        """The id a text with these bytes is encoded to when several ids share them (e.g. a
        byte-fallback ``<0x0A>`` beside a literal newline piece); the only id otherwise."""
        ids = self.ids_for_bytes(data)
        if len(ids) <= 1:
            return ids[0] if ids else None
        if data in self._canonical:
            return self._canonical[data]
        try:
            encoded = self._encode(data.decode("utf-8"))
        except UnicodeDecodeError:
            encoded = []
        choice = encoded[0] if len(encoded) == 1 and encoded[0] in ids else ids[0]
        self._canonical[data] = choice
        return choice

    def same_as(self, other: "Vocabulary") -> bool:
        """True when both map every id to the same bytes (the same-tokenizer fast path)."""
        return self.size == other.size and self.token_bytes == other.token_bytes

    def bytes_of(self, ids: Iterable[int]) -> bytes:
        return b"".join(self.token_bytes[i] or b"" for i in ids)
