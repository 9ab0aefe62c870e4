"""A speculative chunk walked while it streams in (:mod:`blackbox_proxy.hosts.streaming`).

The walk of a chunk (``speculative.py``) decides position by position: the greedy walk compares
each draft with the tuned argmax, the sampled walk draws one uniform per position and, at the
first rejection, the residual draw. So it can run on the positions that have arrived while the
host still generates the rest: :meth:`StreamedWalk.take` gets the positions so far after each
streamed event (in the round's worker thread), scores the new ones in one batched forward per
model, walks them with the same rules and the same generator, and answers True at the first
rejection (or at a position a chunk cannot walk); the client then closes the stream.
:meth:`StreamedWalk.finish_streamed` (from ``observe``) walks what came after the last
``take`` and ends the chunk as a whole chunk ends. Given the same drafts and scores, the output
is the whole-chunk walk's, draw for draw (``tests/test_streamed.py`` checks it).

Streamed: single-draft chunk calls of the greedy walk and of the candidates-only sampled walk,
on a client whose host streams logprobs. Not streamed: multi-draft chunks (trees) and walks that
may pause for a tail probe (same tokenizer, ``tail_calls`` >= 1): their chunks are asked whole.
A streamed chunk call asks up to ``MAX_CHUNK`` tokens (or the fixed ``chunk``): the stream is
closed at the first rejection, so a long chunk costs no wait, only the few tokens the host
generates before it notices the close.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..maths.rejection import PositionScore, walk_greedy, walk_sampled
from ..types import Candidate, ChunkTrace, HostedPosition, HostedResult, Usage
from .chunks import ChunkWalk


@dataclass
class StreamState:
    """The walk of one streamed chunk so far."""

    before: bytes  # the continuation before the next new position
    ids: list[int] | None  # and its hosted ids (None: unknown)
    usable: list[HostedPosition] = field(default_factory=list)
    items: list = field(default_factory=list)
    rows: list[PositionScore] = field(default_factory=list)
    allowed: list = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    log_z: list[float] = field(default_factory=list)
    tails: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    accepted: int = 0
    rejected_at: int | None = None
    replacement: Candidate | None = None
    seen: int = 0  # positions of the answer looked at
    over: bool = False  # the walk has ended: a rejection, or a position it cannot walk
    unresolved: bool = False
    alignment: str = ""
    seconds: float = 0.0  # scoring done while the stream was open


class StreamedWalk:
    """The streamed walk of :class:`~blackbox_proxy.decoding.speculative.SpeculativeDecoder`."""

    _streaming: StreamState | None = None

    def take(self, result: HostedResult) -> bool:
        """Walk the positions of ``result`` not walked yet; True: the walk is over (close the stream)."""
        state = self._streaming
        if state is None:
            ids = list(self.hosted_ids) if self.hosted_ids is not None else None
            state = self._streaming = StreamState(self.continuation, ids)
        if state.over:
            return True
        started = time.perf_counter()
        fresh = []
        for pos in result.positions[state.seen:]:
            state.seen += 1
            reason = self._unwalkable(pos)
            if reason is not None:
                state.notes.append(reason)
                state.unresolved = pos.end_unresolved
                state.over = True
                break
            fresh.append(pos)
        if fresh:
            self._walk_fresh(state, fresh)
        state.seconds += time.perf_counter() - started
        return state.over

    def _walk_fresh(self, state: StreamState, fresh: list[HostedPosition]) -> None:
        items = []
        for pos in fresh:
            items.append((state.before, list(state.ids) if state.ids is not None else None, pos.candidates))
            state.before += pos.sampled.data
            if state.ids is not None:
                state.ids = state.ids + [pos.sampled.token_id] if pos.sampled.token_id is not None else None
        scored, state.alignment = self._score_positions(items)
        rows, allowed, notes = self._rows(scored, items, fresh)
        state.notes += notes
        walk = (walk_greedy(rows, self.params.alpha, allowed) if self.greedy
                else walk_sampled(rows, self.params.alpha, self.generator, allowed))
        offset = len(state.usable)
        state.usable += fresh
        state.items += items
        state.rows += rows
        state.allowed += allowed
        state.probs += walk.accept_probs
        state.log_z += walk.log_z
        state.tails += walk.tail
        state.notes += [f"(from position {offset}) {note}" for note in walk.notes]
        state.accepted += walk.accepted
        if walk.rejected_at is not None:
            state.rejected_at = offset + walk.rejected_at
            if walk.replacement is not None:
                state.replacement = fresh[walk.rejected_at].candidates[walk.replacement]
            state.over = True

    def finish_streamed(self, result: HostedResult, api_seconds: float) -> ChunkTrace | None:
        """End a streamed chunk: walk what arrived after the last :meth:`take`, then finish it like
        a whole chunk. A stream whose first position could not be walked goes to the whole-chunk
        walk (which asks that position alone or chooses there like per-step)."""
        state = self._streaming
        overlapped = state.seconds
        self.take(result)
        self._streaming = None
        if not state.usable:
            return self._walk(result, api_seconds)
        chunk = ChunkWalk(result, api_seconds, state.usable, state.items, state.rows, state.allowed, None,
                          state.alignment, state.unresolved and state.rejected_at is None, state.notes,
                          scoring=state.seconds - overlapped, probs=state.probs, log_z=state.log_z,
                          tails=state.tails, accepted=state.accepted, rejected_at=state.rejected_at,
                          replacement=state.replacement)
        self.usage = self.usage + Usage(overlapped_seconds=overlapped)
        return self._finish(chunk)
