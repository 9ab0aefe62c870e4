"""What a speculative chunk walk holds, and how long the next chunk is (shared by the
single-draft walk in ``speculative.py``, its tail probes in ``probe_walk.py`` and the multi-draft
tree walk in ``multidraft.py``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..maths.rejection import PositionScore
from ..types import Candidate, HostedPosition, HostedResult

MAX_STALLED_CHUNKS = 8  # chunks in a row that add nothing before giving up
# Adaptive chunk length: bounds, and the prior on the acceptance rate (3 of 4 drafts accepted).
MIN_CHUNK, MAX_CHUNK = 4, 32
PRIOR_ACCEPTED, PRIOR_DRAFTS = 3.0, 4.0
TOP1_TOLERANCE = 0.1  # nats: a probe's top-1 logprob must be the chunk's (the host returns unbiased logprobs)


def adaptive_chunk(accepted: int, examined: int) -> int:
    """Twice the expected run of accepted drafts, 2 / (1 - a), for the acceptance rate a seen so
    far (with a prior of 3 in 4), within [4, 32]. With independent acceptances, a chunk of N
    yields (1 - a^N) / (1 - a) tokens per call, which is within a factor (1 - a^N) of the most
    any chunk can give; at N = 2 / (1 - a) that factor is above 0.86 for any a, while the drafts
    drawn past the first rejection (paid for, then discarded) stay bounded."""
    rate = (accepted + PRIOR_ACCEPTED) / (examined + PRIOR_DRAFTS)
    return max(MIN_CHUNK, min(MAX_CHUNK, math.ceil(2.0 / max(1e-6, 1.0 - rate))))


@dataclass
class ChunkWalk:
    """A chunk being walked: the positions that can be walked (``usable``: one draft's, or the
    path a multi-draft tree walk took), what was decided so far, and the outcome. The walk may
    pause at a position (``paused``) for a tail probe."""

    result: HostedResult
    api_seconds: float
    usable: list[HostedPosition]
    items: list[tuple[bytes, list[int] | None, Sequence[Candidate]]]
    rows: list[PositionScore]
    allowed: list[torch.Tensor | None]
    full: list[tuple[torch.Tensor, torch.Tensor]] | None
    alignment: str
    unresolved: bool
    notes: list[str]
    scoring: float = 0.0
    probs: list[float] = field(default_factory=list)
    log_z: list[float] = field(default_factory=list)
    tails: list[str] = field(default_factory=list)
    accepted: int = 0
    rejected_at: int | None = None
    replacement: Candidate | None = None
    paused: Any = None  # a probe_walk.Tail while the walk waits for a tail probe
    tail_calls: int = 0
