"""One greedy draft walked over the whole vocabulary: the tail checked where it may hold the argmax.

The greedy walk keeps the API's greedy drafts while each is the tuned argmax; over the top-k
alone (:class:`~.draft.DraftWalk`) a token the expert wants but the hosted model ranks below k
is never the argmax. Here each position first asks :func:`~blackbox_proxy.decoding.tail.check`
whether a tail token may beat the candidates' argmax c*: where none may (the usual case, no
call), the position is decided as the draft walk decides it; where one may, the walk pauses for
the tail probe (:meth:`GreedyWalk.request`), whose answer gives the exact argmax: the draft is
kept if it is that argmax, else it is replaced by c* or by the tail token, and the walk ends.

Streamed chunks are walked as they arrive, as the draft walk does, and closed at a rejection; a
position that needs a probe waits for the chunk call to end (its draft may be kept, and the rest
with it), so a streamed chunk is walked as the whole one is.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ...maths.rejection import walk_greedy
from ...types import HostedRequest, HostedResult
from .. import tail
from ..prefix import Prefix
from . import ChunkWalk, WalkContext, context_full, full_distributions, rows, score_draft, unwalkable


class GreedyWalk:
    """A greedy single-draft walk that checks the tail (see the module docstring)."""

    tail_off: str | None = None  # set when a probe's answer showed the host ignores logit_bias

    def __init__(self, ctx: WalkContext, prefix: Prefix) -> None:
        self.ctx = ctx
        self.before = prefix  # the prefix before the next new position
        self.walk: ChunkWalk | None = None
        self.offsets: list = []  # each walked position's offsets (whole distributions for the tail)
        self.seen = 0  # positions of the answer looked at
        self.over = False  # a rejection, or a position the walk cannot take
        self.asking: tail.TailCheck | None = None  # the position waiting for its tail probe
        self.streamed = False
        self.seconds = 0.0

    @property
    def probing(self) -> bool:
        return self.asking is not None and self._chunk_done

    _chunk_done = False

    def take(self, result: HostedResult) -> bool:
        """Walk the positions of a streamed ``result`` not walked yet; True: close the stream."""
        self.streamed = True
        return self._take(result)

    def _take(self, result: HostedResult) -> bool:
        if self.walk is None:
            self.walk = ChunkWalk(result, 0.0)
        if self.over:
            return True
        started, walk, fresh = time.perf_counter(), self.walk, []
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
            items, offsets = score_draft(self.ctx, self.before, fresh)
            if context_full(walk, len(items), len(fresh)):
                self.over, fresh = True, fresh[: len(items)]
        if fresh:
            self.before = items[-1][0].extend(fresh[-1].sampled)
            scored, allowed, notes = rows(self.ctx, items, offsets, [p.sampled for p in fresh])
            walk.alignment = offsets[0].alignment
            walk.notes += notes
            walk.usable += fresh
            walk.items += items
            walk.rows += scored
            walk.allowed += allowed
            self.offsets += offsets
            self._advance()
        self.seconds += time.perf_counter() - started
        return self.over

    def _advance(self) -> None:
        """Decide the positions scored and not decided yet, up to a rejection or a pause."""
        walk, ctx = self.walk, self.ctx
        while self.asking is None and walk.rejected_at is None and len(walk.probs) < len(walk.rows):
            t = len(walk.probs)
            decided = walk_greedy([walk.rows[t]], ctx.alpha, [walk.allowed[t]])
            if decided.notes:
                walk.notes += [note.replace("position 0", f"position {t}") for note in decided.notes]
            if decided.rejected_at is not None and decided.replacement is None:  # no candidate can be carried
                self._reject(t, None)
                return
            (prefix, cands), best = walk.items[t], (walk.rows[t].draft if decided.rejected_at is None
                                                     else decided.replacement)
            asking = None if self.tail_off is not None else tail.check(
                prefix, cands, self.offsets[t], walk.allowed[t], best, host=ctx.host, prompt=ctx.prompt,
                vocab=ctx.scoring.vocab, alpha=ctx.alpha, exhaustive=not walk.usable[t].dropped)
            if asking is not None:  # the rest of the chunk is still read: the probe may keep this draft
                self.asking = asking
                return
            if decided.rejected_at is None:
                walk.probs.append(1.0)
                walk.accepted += 1
            else:
                self._reject(t, cands[decided.replacement])

    def _reject(self, t: int, replacement) -> None:
        walk = self.walk
        walk.probs.append(0.0)
        walk.rejected_at, walk.replacement = t, replacement
        self.over = True

    def observe(self, results: Sequence[HostedResult], api_seconds: float) -> ChunkWalk | None:
        if self._chunk_done:  # the tail probe's answer
            return self._settle(results)
        overlapped = self.seconds
        self._take(results[0])
        walk = self.walk
        walk.result, walk.api_seconds = results[0], api_seconds
        walk.scoring, walk.overlapped = self.seconds - overlapped, overlapped
        walk.full = full_distributions(self.offsets)
        self._chunk_done = True
        return None if self.asking is not None else self._end()

    def request(self) -> HostedRequest:
        """The paused position's tail probe."""
        return self.asking.request(self.ctx.prompt, self.ctx.host)

    def _settle(self, results: Sequence[HostedResult]) -> ChunkWalk | None:
        started, walk, asking = time.perf_counter(), self.walk, self.asking
        self.asking = None
        walk.tail_calls += 1
        t = len(walk.probs)
        token, note = asking.decide(results, self.ctx.scoring.vocab)
        untrusted = asking.distrust(results)
        if untrusted is not None:
            walk.untrusted_calls += 1
            self.tail_off = untrusted
        walk.notes.append(f"position {t}: {note}")
        c_star = asking.candidates[asking.best]
        if token is None and asking.best == walk.rows[t].draft:
            walk.probs.append(1.0)
            walk.accepted += 1
            self._advance()  # the positions read past this one
        else:
            self._reject(t, token if token is not None else c_star)
        walk.scoring += time.perf_counter() - started
        return None if self.asking is not None else self._end()

    def _end(self) -> ChunkWalk:
        walk = self.walk
        walk.unresolved = walk.unresolved and walk.rejected_at is None
        return walk
