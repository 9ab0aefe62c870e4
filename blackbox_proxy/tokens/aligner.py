"""Probabilities of hosted tokens under a small model with another tokenizer (DESIGN.md §2.2).

Everything crosses the boundary as bytes. For a small model M, a context made of the rendered
prompt plus continuation bytes s, and a hosted candidate v with bytes b:

1. *Stable boundary.* Tokenise the continuation for M and drop the last ``backoff`` tokens: the
   kept ids go in M's KV cache; the bytes after them are the pending bytes u (the dropped
   tokens, plus any incomplete UTF-8 tail).
2. *Prefix cover.* P_cover(x) = P(M's next bytes start with x) ~= the product of the canonical
   tokens of x but the last, times the summed probability of every token whose bytes start with
   the last token's bytes (one range of the sorted byte index). When x ends inside a UTF-8
   character, two disjoint readings are summed: all complete tokens, then a token that starts
   with the tail; or all but the last, then a token that starts with the last token's bytes
   plus the tail. Then P_M(b | s) ~= P_cover(u + b) / P_cover(u).
3. *Hosted-vocabulary correction.* "The next hosted token is v" excludes texts that continue
   into a longer hosted token. With the hosted vocabulary known, subtract the cover of every
   minimal hosted extension v' of v. Only extensions ending inside M's last token are
   subtracted (they are sums over the same next-token distribution, no extra forward); longer
   ones are left out, which overestimates P_M(v) slightly. With one shared tokenizer and a
   stable boundary this recovers the token probability exactly.
4. End-of-text is the probability of u's tokens followed by one of M's end tokens.

Probabilities are clamped to [PROB_FLOOR, 1]. Exact byte-level marginalisation over every
tokenisation (Phan et al. 2024) is left out: it costs a forward per alternative path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .._constants import PROB_FLOOR
from ..types import Candidate
from .vocab import Vocabulary, split_utf8


@dataclass(frozen=True)
class Term:
    """P(the small model's next tokens are ``path``) x final, where final is the mass of the
    tokens starting with ``remainder`` minus those starting with any of ``subtract`` (or the
    mass of the end tokens, for end queries)."""

    path: tuple[int, ...]
    remainder: bytes = b""
    subtract: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Query:
    """One probability: the sum of its terms (disjoint events). ``end`` makes every term's
    final the end tokens' mass; ``impossible`` marks text the model cannot express (floor)."""

    terms: tuple[Term, ...] = ()
    end: bool = False
    impossible: bool = False


@dataclass(frozen=True)
class Plan:
    """The queries of one position: the denominator P_cover(u), then one per candidate."""

    kept_ids: tuple[int, ...]
    pending: bytes
    denominator: Query | None
    queries: tuple[Query, ...]

    @property
    def paths(self) -> list[tuple[int, ...]]:
        queries = list(self.queries) + ([self.denominator] if self.denominator is not None else [])
        return [t.path for q in queries for t in q.terms if t.path]


class Aligner:
    """Turns hosted candidates into queries on one small vocabulary and reads the answers.

    Args:
        small: the small models' vocabulary (expert and anti-expert share it).
        hosted: the hosted vocabulary if known (enables the extension correction).
        backoff: tokens dropped from the end of the continuation to reach a stable boundary.
    """

    def __init__(self, small: Vocabulary, hosted: Vocabulary | None = None, *, backoff: int = 1) -> None:
        if backoff < 0:
            raise ValueError(f"backoff must be >= 0, got {backoff}")
        self.small = small
        self.hosted = hosted
        self.backoff = backoff
        self._sorted_ids = torch.tensor(small.sorted_ids, dtype=torch.long)
        self._sorted_by_device: dict[torch.device, torch.Tensor] = {}

    @property
    def description(self) -> str:
        if self.hosted is None:
            return "bytes, prefix cover (hosted vocabulary unknown: longer hosted tokens not excluded)"
        return f"bytes, prefix cover minus extensions in hosted vocabulary {self.hosted.name}"

    # ----- planning ---------------------------------------------------------------------------
    def split_context(self, continuation: bytes) -> tuple[tuple[int, ...], bytes]:
        """(kept ids, pending bytes) for a continuation (step 1)."""
        complete, tail = split_utf8(continuation)
        ids = self.small.encode_complete(complete)
        if ids is None:  # bytes the small vocabulary cannot express: keep nothing stable
            return (), continuation
        keep = max(0, len(ids) - self.backoff)
        return tuple(ids[:keep]), self.small.bytes_of(ids[keep:]) + tail

    def cover_query(self, data: bytes, extensions: Sequence[bytes] = ()) -> Query:
        """P_cover(data), minus the covers of ``data + e`` for each extension e.

        Complete text: canonical tokens but the last, then the range of the last token's bytes.
        With an incomplete UTF-8 tail, two disjoint events are summed: all complete tokens
        then a token starting with the tail, or all but the last then a token starting with
        the last token's bytes plus the tail (the character may merge into it).
        """
        complete, tail = split_utf8(data)
        ids = self.small.encode_complete(complete)
        if ids is None:
            return Query(impossible=True)
        candidates: list[tuple[tuple[int, ...], bytes]] = []
        if tail:
            candidates.append((tuple(ids), tail))
        if ids:
            candidates.append((tuple(ids[:-1]), (self.small.token_bytes[ids[-1]] or b"") + tail))
        terms = tuple(Term(path, rem, tuple(rem + e for e in extensions)) for path, rem in candidates)
        return Query(terms=terms)

    def end_query(self, pending: bytes) -> Query:
        ids = self.small.encode_bytes(pending)
        if ids is None or not self.small.end_ids:
            return Query(end=True, impossible=True)
        return Query(terms=(Term(tuple(ids)),), end=True)

    def plan(self, continuation: bytes, candidates: Sequence[Candidate]) -> Plan:
        kept, pending = self.split_context(continuation)
        denominator = self.cover_query(pending) if pending else None
        queries = []
        for cand in candidates:
            if cand.is_end:
                queries.append(self.end_query(pending))
                continue
            extensions: Sequence[bytes] = ()
            if self.hosted is not None:
                extensions = [e[len(cand.data) :] for e in self.hosted.minimal_extensions(cand.data)]
            queries.append(self.cover_query(pending + cand.data, extensions))
        return Plan(kept_ids=kept, pending=pending, denominator=denominator, queries=tuple(queries))

    # ----- evaluation -------------------------------------------------------------------------
    def evaluate(self, plan: Plan, dists: Mapping[tuple[int, ...], torch.Tensor]) -> list[float]:
        """log P_M(b | s) for every candidate of ``plan`` from the model's distributions.

        Every number the queries need (the log-probabilities along each term's path, the end
        tokens' mass, each range of the sorted byte index) is read in a few batched tensor ops
        and brought to the host in ONE transfer; the rest is arithmetic on Python floats, in the
        order of the per-term definition (``tests/test_aligner.py`` keeps that definition as the
        oracle). On a GPU that is one synchronisation per position instead of one per token read.
        """
        queries = ([plan.denominator] if plan.denominator is not None else []) + list(plan.queries)
        reads = _Reads(self.small)
        layouts = [None if q.impossible or not q.terms else [reads.term(t, q.end) for t in q.terms] for q in queries]
        points, ends, spans = reads.run(dists, self._sorted_on)

        def log_prob(layout: list[tuple[int, int, str, int, int]] | None) -> float:
            if layout is None:
                return -math.inf
            values = []
            for start, length, kind, first, count in layout:
                logp = sum(points[start:start + length])
                if kind == "end":
                    final = ends[first]
                elif kind == "span":
                    final = spans[first]
                    for j in range(first + 1, first + count):
                        final -= spans[j]
                else:
                    final = 1.0
                values.append(logp + math.log(final) if final > 0 else -math.inf)
            top = max(values)
            if top == -math.inf:
                return top
            return top + math.log(sum(math.exp(v - top) for v in values))

        logs = [log_prob(layout) for layout in layouts]
        log_denominator = logs.pop(0) if plan.denominator is not None else 0.0
        floor = math.log(PROB_FLOOR)
        out = []
        for value in logs:
            log_ratio = value - log_denominator if log_denominator > -math.inf else -math.inf
            out.append(min(0.0, max(floor, log_ratio)))
        return out

    def _sorted_on(self, device: torch.device) -> torch.Tensor:
        """The sorted byte index as an index tensor on ``device`` (made once per device)."""
        cached = self._sorted_by_device.get(device)
        if cached is None:
            cached = self._sorted_by_device[device] = self._sorted_ids.to(device)
        return cached


class _Reads:
    """The tensor reads of one plan's terms, gathered so they run as a few batched ops.

    ``term`` records what a term needs and returns its layout (start and length of its path's
    log-probabilities among the point reads, its kind, and its first read and count among the
    end or span reads); ``run`` does the reads: the point log-probabilities, each end read's
    summed end-token probability, each span read's probability mass c[hi] - c[lo] of a range
    of the sorted byte index (c the cumulative sum, in float64, of the path's probabilities in
    byte order)."""

    def __init__(self, small: Vocabulary) -> None:
        self.small = small
        self.rows: dict[tuple[int, ...], int] = {}
        self.point_rows: list[int] = []
        self.point_ids: list[int] = []
        self.end_rows: list[int] = []
        self.span_rows: list[int] = []
        self.span_ranges: list[tuple[int, int]] = []

    def _row(self, path: tuple[int, ...]) -> int:
        return self.rows.setdefault(path, len(self.rows))

    def term(self, term: Term, end: bool) -> tuple[int, int, str, int, int]:
        start = len(self.point_rows)
        for depth, token in enumerate(term.path):
            self.point_rows.append(self._row(term.path[:depth]))
            self.point_ids.append(token)
        if end:
            self.end_rows.append(self._row(term.path))
            return start, len(term.path), "end", len(self.end_rows) - 1, 1
        if not term.remainder:
            return start, len(term.path), "one", 0, 0
        first = len(self.span_rows)
        row = self._row(term.path)
        self.span_rows.append(row)
        self.span_ranges.append(self.small.prefix_range(term.remainder))
        for sub in term.subtract:
            lo, hi = self.small.prefix_range(sub)
            if hi > lo:
                self.span_rows.append(row)
                self.span_ranges.append((lo, hi))
        return start, len(term.path), "span", first, len(self.span_rows) - first

    def run(self, dists: Mapping[tuple[int, ...], torch.Tensor],
            sorted_on: Callable[[torch.device], torch.Tensor]) -> tuple[list[float], list[float], list[float]]:
        if not self.rows:
            return [], [], []
        paths = list(self.rows)  # in _row order
        device = dists[paths[0]].device
        used = sorted(set(self.span_rows))
        local = {row: i for i, row in enumerate(used)}
        # every index in one host-to-device copy, then sliced
        pieces = [self.point_rows, self.point_ids, self.end_rows, sorted(self.small.end_ids),
                  [local[r] for r in self.span_rows], [hi for _, hi in self.span_ranges],
                  [lo for lo, _ in self.span_ranges]]
        flat_index = torch.tensor([i for piece in pieces for i in piece], dtype=torch.long, device=device)
        (point_rows, point_ids, end_rows, end_ids, span_rows, his, los) = flat_index.split([len(p) for p in pieces])
        parts = []
        if self.point_rows or self.end_rows:
            table = torch.stack([dists[path] for path in paths])  # [paths, V]
            if self.point_rows:
                parts.append(table[point_rows, point_ids].double())
            if self.end_rows:
                parts.append(table[end_rows][:, end_ids].double().exp().sum(1))
        if self.span_rows:
            ordered = torch.stack([dists[paths[row]] for row in used]).index_select(1, sorted_on(device))
            cumulative = ordered.double().exp_().cumsum_(1)  # c[i + 1] of the definition
            zero = cumulative.new_zeros(())

            def c(at: torch.Tensor) -> torch.Tensor:  # c[at], with c[0] = 0
                return torch.where(at > 0, cumulative[span_rows, (at - 1).clamp_(min=0)], zero)

            parts.append(c(his) - c(los))
        flat = torch.cat(parts).tolist() if parts else []
        n_points, n_ends = len(self.point_rows), len(self.end_rows)
        return flat[:n_points], flat[n_points:n_points + n_ends], flat[n_points + n_ends:]
