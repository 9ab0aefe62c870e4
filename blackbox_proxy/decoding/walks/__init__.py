"""Ways to walk a speculative chunk call's drafts, each one small object behind one interface.

The speculative decoder (:mod:`..speculative`) asks the host for a chunk of drafts and hands the
answer to a :class:`ChunkWalker` made for that call; the walker decides, position by position,
which drafts the tuned distribution keeps (the maths: :mod:`blackbox_proxy.maths.rejection`,
``tail`` and ``tree``), and returns a finished :class:`ChunkWalk`, which the decoder appends.

The walkers:

- :class:`~.draft.DraftWalk`: one draft, greedy or the candidates-only sampled rule, asked whole
  or streamed (walked as it arrives: ``take`` after each event, True closes the stream);
- :class:`~.greedy.GreedyWalk`: one draft, greedy, pausing for greedy's tail probe where a
  token outside the top-k may be the argmax (:mod:`blackbox_proxy.decoding.tail`);
- :class:`~.probes.ProbeWalk`: one draft, sampled, pausing for *tail probes* where the bounds
  on Z do not decide a position (same tokenizer, a host whose ``logit_bias`` biases the draw only);
- :class:`~.tree.TreeWalk`: several drafts from one call (``n`` choices), walked as a token tree.

The interface (:class:`ChunkWalker`): ``take(result)`` for streamed snapshots; ``observe(results,
api_seconds)`` with the call's whole answer, returning the :class:`ChunkWalk` or None when the
walk paused for another call; then ``request()`` is that call, and ``probing`` says a paused walk
waits for a tail probe. What every walker shares is here: :class:`WalkContext` (what a walk reads
of its generation), :func:`unwalkable`, :func:`rows` (the scored positions of one draft) and the
chunk length (:func:`adaptive_chunk`).

Left out: appending, traces and usage (the decoder), the maths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ...errors import ContextLimitError
from ...maths.rejection import PositionScore
from ...request import GenerationRequest
from ...types import Candidate, HostCapabilities, HostedPosition, HostedRequest, HostedResult
from ..prefix import HostedPrompt, Prefix
from ..scoring import Offsets, Scoring

MAX_STALLED_CHUNKS = 8  # chunks in a row that add nothing before giving up
# Adaptive chunk length: bounds, and the prior on the acceptance rate (3 of 4 drafts accepted).
MIN_CHUNK, MAX_CHUNK = 4, 32
PRIOR_ACCEPTED, PRIOR_DRAFTS = 3.0, 4.0


def adaptive_chunk(accepted: int, examined: int) -> int:
    """Twice the expected run of accepted drafts, 2 / (1 - a), for the acceptance rate a seen so
    far (with a prior of 3 in 4), within [4, 32]. With independent acceptances, a chunk of N
    yields (1 - a^N) / (1 - a) tokens per call, which is within a factor (1 - a^N) of the most
    any chunk can give; at N = 2 / (1 - a) that factor is above 0.86 for any a, while the drafts
    drawn past the first rejection (paid for, then discarded) stay bounded.

    >>> adaptive_chunk(0, 0), adaptive_chunk(90, 100), adaptive_chunk(0, 100)
    (8, 19, 4)
    """
    rate = (accepted + PRIOR_ACCEPTED) / (examined + PRIOR_DRAFTS)
    return max(MIN_CHUNK, min(MAX_CHUNK, math.ceil(2.0 / max(1e-6, 1.0 - rate))))


@dataclass(frozen=True)
class WalkContext:
    """What a walk reads of its generation: the options, the host, the scoring, the prompt (to
    build follow-up requests), the generation's random generator, and the draws per tail probe."""

    params: GenerationRequest
    host: HostCapabilities
    scoring: Scoring
    prompt: HostedPrompt
    generator: torch.Generator
    tail_draws: int

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0

    @property
    def alpha(self) -> float:
        return self.params.alpha


@dataclass
class ChunkWalk:
    """A chunk being walked and its outcome: the positions walked (``usable``: one draft's, or the
    path a tree walk took), each one's prefix and candidates (``items``), scores (``rows``) and the
    candidates a text prompt can end on (``allowed``); ``full``: the small models' whole
    distributions per position (one tokenizer), else None; then what was decided: acceptance
    probabilities, normalisers and how each tail was weighted, how many drafts were ``accepted``,
    where the first was rejected and its ``replacement``. ``unresolved``: the walk stopped at an
    entry that may be the end of text (the next position is asked alone). ``tail_calls``: tail
    probes asked while walking it."""

    result: HostedResult
    api_seconds: float
    usable: list[HostedPosition] = field(default_factory=list)
    items: list[tuple[Prefix, Sequence[Candidate]]] = field(default_factory=list)
    rows: list[PositionScore] = field(default_factory=list)
    allowed: list[torch.Tensor | None] = field(default_factory=list)
    full: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    alignment: str = ""
    unresolved: bool = False
    notes: list[str] = field(default_factory=list)
    scoring: float = 0.0
    probs: list[float] = field(default_factory=list)
    log_z: list[float] = field(default_factory=list)
    tails: list[str] = field(default_factory=list)
    accepted: int = 0
    rejected_at: int | None = None
    replacement: Candidate | None = None
    tail_calls: int = 0
    untrusted_calls: int = 0  # tail probes whose answers showed the host does not honour logit_bias
    overlapped: float = 0.0  # scoring done while the chunk still streamed in
    context_full: bool = False  # a small model's context ends inside this chunk (:func:`context_full`)


class ChunkWalker(Protocol):
    """One chunk call's walk. See the module docstring."""

    probing: bool  # paused: ``request()`` is a tail probe the walk waits for
    tail_off: str | None  # why tail probes stopped for this generation (None: they did not)

    def take(self, result: HostedResult) -> bool:
        """A streamed chunk's positions so far; True: the walk is over (close the stream)."""

    def observe(self, results: Sequence[HostedResult], api_seconds: float) -> ChunkWalk | None:
        """The call's whole answer; the finished walk, or None when it paused for ``request()``."""

    def request(self) -> HostedRequest:
        """The call a paused walk waits for."""


def unwalkable(pos: HostedPosition) -> str | None:
    """Why a chunk walk stops before ``pos`` (the position is then asked anew), or None."""
    if pos.end_unresolved:
        # an entry that may be the end is not resolved inside a chunk; the position is asked
        # alone, where the client resolves it
        return "a top entry that may be the end of text; the chunk was cut there"
    if pos.sampled is None or not pos.candidates or not any(
        c is pos.sampled or c == pos.sampled for c in pos.candidates
    ):
        return "the API did not report a drawn token's logprob; the chunk was cut there"
    return None


def walkable(result: HostedResult) -> tuple[list[HostedPosition], HostedPosition | None]:
    """A draft's positions up to the first one a walk cannot take, and that one (None: all can)."""
    out: list[HostedPosition] = []
    for pos in result.positions:
        if unwalkable(pos) is not None:
            return out, pos
        out.append(pos)
    return out, None


def rows(ctx: WalkContext, items: Sequence[tuple[Prefix, Sequence[Candidate]]], offsets: Sequence[Offsets],
         drafts: Sequence[Candidate]) -> tuple[list[PositionScore], list[torch.Tensor | None], list[str]]:
    """The scored positions of one draft (``drafts[t]``: the token drawn at position t), the
    candidates a text prompt can end on at each, and a note on candidates excluded for want of
    evidence."""
    out, allowed = [], []
    for off, (prefix, cands), drawn in zip(offsets, items, drafts):
        e = torch.tensor(off.expert, dtype=torch.float64)
        a = torch.tensor(off.anti_expert, dtype=torch.float64)
        draft = next((i for i, c in enumerate(cands) if c is drawn), None)
        out.append(PositionScore(torch.tensor([c.logprob for c in cands], dtype=torch.float64), e - a, e, a,
                                 draft if draft is not None else list(cands).index(drawn)))
        allowed.append(ctx.prompt.allowed(prefix, cands))
    silent = sum(v == -math.inf for off in offsets for v in off.expert)
    notes = ([f"{silent} candidate(s) the small models cannot say excluded (no evidence: both at the floor)"]
             if silent else [])
    return out, allowed, notes


def score_draft(ctx: WalkContext, prefix: Prefix, positions: Sequence[HostedPosition]) -> tuple[
        list[tuple[Prefix, Sequence[Candidate]]], list[Offsets]]:
    """Each position's (prefix, candidates) along a draft from ``prefix``, and their offsets, in one
    batched forward per model.

    Near a small model's context limit only the first positions may fit: then only those are
    returned (fewer items than ``positions``, none when not even the first fits), and the walk
    ends there with the context full (:func:`context_full`). The longest run that fits is
    searched by halving; a run that does not fit is refused before any forward, so the search
    costs one forward per run that fits (at most log2 of the chunk, once per generation)."""
    items = [(before, pos.candidates) for before, pos in zip(prefix.along(p.sampled for p in positions), positions)]
    try:
        return items, ctx.scoring.score(items)
    except ContextLimitError:
        pass
    fits, over, offsets = 0, len(items), []
    while over - fits > 1:
        middle = (fits + over) // 2
        try:
            offsets, fits = ctx.scoring.score(items[:middle]), middle
        except ContextLimitError:
            over = middle
    if len(offsets) != fits:  # the last run tried that fits was a shorter one
        offsets = ctx.scoring.score(items[:fits]) if fits else []
    return items[:fits], offsets


def context_full(walk: ChunkWalk, scored: int, asked: int) -> bool:
    """After :func:`score_draft` scored ``scored`` of ``asked`` positions: when some did not fit,
    say so on ``walk`` (the decoder ends the generation after them, ``finish_reason`` length)."""
    if scored == asked:
        return False
    walk.context_full = True
    walk.notes.append(f"a small model's context holds {scored} more position(s) of the {asked} asked; the "
                      "generation ends after them (finish_reason length)")
    return True


def full_distributions(offsets: Sequence[Offsets]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The small models' whole distributions at every position, when scoring kept them."""
    if not offsets or any(o.full is None for o in offsets):
        return None
    return [o.full for o in offsets]


def record(walk: ChunkWalk, accept_prob: float, log_z: float, how: str) -> None:
    """One decided position's acceptance probability, normaliser and tail weighting."""
    walk.probs.append(accept_prob)
    walk.log_z.append(log_z)
    walk.tails.append(how)


__all__ = ["MAX_CHUNK", "MAX_STALLED_CHUNKS", "ChunkWalk", "ChunkWalker", "WalkContext", "adaptive_chunk",
           "context_full", "full_distributions", "record", "rows", "score_draft", "unwalkable", "walkable"]
