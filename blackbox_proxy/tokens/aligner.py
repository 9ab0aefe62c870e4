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
from collections.abc import Mapping, Sequence
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
        """log P_M(b | s) for every candidate of ``plan`` from the model's distributions."""
        cumsums: dict[tuple[int, ...], torch.Tensor] = {}
        ends = sorted(self.small.end_ids)

        def cumsum(path: tuple[int, ...]) -> torch.Tensor:
            if path not in cumsums:
                probs = dists[path].double().exp().cpu()
                # Index 0 of the result is 0 so a range [lo, hi) sums to c[hi] - c[lo].
                ordered = probs[self._sorted_ids]
                cumsums[path] = torch.cat([ordered.new_zeros(1), ordered.cumsum(0)])
            return cumsums[path]

        def log_term(term: Term, end: bool) -> float:
            logp = sum(float(dists[term.path[:depth]][token]) for depth, token in enumerate(term.path))
            if end:
                final = float(dists[term.path][ends].double().exp().sum())
            elif term.remainder:
                c = cumsum(term.path)
                lo, hi = self.small.prefix_range(term.remainder)
                final = float(c[hi] - c[lo])
                for sub in term.subtract:
                    s_lo, s_hi = self.small.prefix_range(sub)
                    if s_hi > s_lo:
                        final -= float(c[s_hi] - c[s_lo])
            else:
                final = 1.0
            return logp + math.log(final) if final > 0 else -math.inf

        def log_prob(query: Query) -> float:
            if query.impossible or not query.terms:
                return -math.inf
            values = [log_term(t, query.end) for t in query.terms]
            top = max(values)
            if top == -math.inf:
                return top
            return top + math.log(sum(math.exp(v - top) for v in values))

        log_denominator = log_prob(plan.denominator) if plan.denominator is not None else 0.0
        floor = math.log(PROB_FLOOR)
        out = []
        for query in plan.queries:
            log_ratio = log_prob(query) - log_denominator if log_denominator > -math.inf else -math.inf
            out.append(min(0.0, max(floor, log_ratio)))
        return out
