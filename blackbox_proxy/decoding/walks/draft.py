"""One draft walked whole or as it streams in: greedy, or the candidates-only sampled rule.

The greedy walk (:func:`~blackbox_proxy.maths.rejection.walk_greedy`) keeps the API's greedy
drafts while each is the tuned argmax over its position's candidates; the sampled walk
(:func:`~blackbox_proxy.maths.rejection.walk_sampled`) accepts drafts with min(1, w/Z), Z's tail
bounded from the candidates alone, and replaces the first rejected draft by a residual draw.

Both decide position by position, so a chunk can be walked on the positions that have arrived
while the host still generates the rest (:mod:`blackbox_proxy.hosts.streaming`): :meth:`DraftWalk.take`
gets the positions so far after each streamed event (in the round's worker thread), scores the new
ones in one batched forward per model, walks them with the same rules and the same generator, and
answers True at the first rejection (or at a position a chunk cannot walk); the client then closes
the stream. :meth:`DraftWalk.observe` walks what came after the last ``take``. Given the same drafts
and scores the outcome is the whole chunk's, draw for draw (``tests/test_streamed.py``): a whole
chunk is one ``take`` of all its positions.

A streamed chunk call asks up to ``MAX_CHUNK`` tokens (or the fixed ``chunk``): the stream is
closed at the first rejection, so a long chunk costs no wait, only the few tokens the host
generates before it notices the close.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ...maths.rejection import walk_greedy, walk_sampled
from ...types import HostedRequest, HostedResult
from ..prefix import Prefix
from . import ChunkWalk, WalkContext, context_full, rows, score_draft, unwalkable


class DraftWalk:
    """One draft, greedy or candidates-only, walked whole or fed as the chunk streams in."""

    probing = False
    tail_off = None

    def __init__(self, ctx: WalkContext, prefix: Prefix) -> None:
        self.ctx = ctx
        self.streamed = False  # fed by take() while the chunk streamed in
        self.before = prefix  # the prefix before the next new position
        self.walk: ChunkWalk | None = None
        self.seen = 0  # positions of the answer looked at
        self.over = False  # a rejection, or a position the walk cannot take
        self.seconds = 0.0  # scoring done so far

    def take(self, result: HostedResult) -> bool:
        """Walk the positions of a streamed ``result`` not walked yet; True: the walk is over."""
        self.streamed = True
        return self._take(result)

    def _take(self, result: HostedResult) -> bool:
        if self.walk is None:
            self.walk = ChunkWalk(result, 0.0)
        if self.over:
            return True
        started = time.perf_counter()
        walk, fresh = self.walk, []
        for pos in result.positions[self.seen:]:
            self.seen += 1
            reason = unwalkable(pos)
            if reason is not None:
                walk.notes.append(reason)
                walk.unresolved = pos.end_unresolved
                self.over = True
                break
            fresh.append(pos)
        if fresh:
            self._walk_fresh(fresh)
        self.seconds += time.perf_counter() - started
        return self.over

    def _walk_fresh(self, fresh: list) -> None:
        ctx, walk = self.ctx, self.walk
        items, offsets = score_draft(ctx, self.before, fresh)
        if context_full(walk, len(items), len(fresh)):
            self.over, fresh = True, fresh[: len(items)]
            if not fresh:
                return
        self.before = items[-1][0].extend(fresh[-1].sampled)
        scored, allowed, notes = rows(ctx, items, offsets, [p.sampled for p in fresh])
        walk.alignment = offsets[0].alignment
        walk.notes += notes
        decided = (walk_greedy(scored, ctx.alpha, allowed) if ctx.greedy
                   else walk_sampled(scored, ctx.alpha, ctx.generator, allowed))
        offset = len(walk.usable)
        walk.usable += fresh
        walk.items += items
        walk.rows += scored
        walk.allowed += allowed
        walk.probs += decided.accept_probs
        walk.log_z += decided.log_z
        walk.tails += decided.tail
        walk.notes += [f"(from position {offset}) {note}" if self.streamed else note for note in decided.notes]
        walk.accepted += decided.accepted
        if decided.rejected_at is not None:
            walk.rejected_at = offset + decided.rejected_at
            if decided.replacement is not None:
                walk.replacement = fresh[decided.rejected_at].candidates[decided.replacement]
            self.over = True

    def observe(self, results: Sequence[HostedResult], api_seconds: float) -> ChunkWalk:
        """The whole answer: walk what came after the last :meth:`take`; the chunk is walked."""
        overlapped = self.seconds
        self._take(results[0])
        walk = self.walk
        walk.result, walk.api_seconds = results[0], api_seconds
        walk.unresolved = walk.unresolved and walk.rejected_at is None
        walk.scoring, walk.overlapped = self.seconds - overlapped, overlapped
        return walk

    def request(self) -> HostedRequest:
        raise RuntimeError("a draft walk never pauses")
