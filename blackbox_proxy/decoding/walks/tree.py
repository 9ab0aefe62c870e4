"""Several drafts from one call, walked as a token tree (maths: :mod:`blackbox_proxy.maths.tree`).

One call with ``n`` choices bills the prompt once and returns n i.i.d. continuations, each with
top-k logprobs at every position. Drafts sharing a prefix share tree nodes; a node's candidates
C are the union of its drafts' top-k and drawn tokens (the same distribution, so the same
logprobs). The walk starts at the root and, at each node, verifies the drafts passing through it
(its *children*) by multi-round rejection (:func:`~blackbox_proxy.maths.tree.node_sampled`) or,
greedy, keeps the child that is the proxy-tuned argmax over the top-k
(:func:`~blackbox_proxy.maths.tree.node_greedy`). An accepted child moves the walk down; at a
node where every child is rejected the walk ends with the replacement drawn there. The walked
path becomes an ordinary :class:`~.ChunkWalk` and ends like a single-draft chunk.

Scoring is lazy: a node is scored when the walk reaches it, together with the rest of the first
draft through it (one batched forward per model along that draft), so a walk that follows one
draft costs what a single-draft chunk costs, plus one batch at each switch of draft.

How many drafts (:func:`choose_drafts`): within [1, cap], from the acceptance rate of first
children seen so far, a: the fewest n with (1 - a)^n <= ``MISS_TARGET`` (a node left without an
accepted child ends the chunk). Greedy decoding draws its drafts at temperature 1 too (a greedy
call's n choices would all be the same text); their tokens are only proposals there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ...maths.rejection import PositionScore
from ...maths.tree import NodeScore, node_greedy, node_sampled
from ...types import Candidate, HostedPosition, HostedRequest, HostedResult
from ..prefix import Prefix
from ..scoring import Offsets
from . import ChunkWalk, WalkContext, walkable

DEFAULT_MAX_DRAFTS = 4  # drafts per call when the user sets no cap
MISS_TARGET = 0.1  # aim: a node has no accepted child at most this often (independent rounds)
PRIOR_FIRST, PRIOR_NODES = 3.0, 4.0  # prior on a first child's acceptance: 3 in 4


def choose_drafts(first_accepted: int, nodes: int, cap: int) -> int:
    """Drafts for the next call: the fewest n in [1, cap] with (1 - a)^n <= ``MISS_TARGET``, a
    the first-child acceptance rate seen (with a prior of 3 in 4).

    >>> choose_drafts(0, 0, 4), choose_drafts(10, 40, 4), choose_drafts(95, 100, 4), choose_drafts(10, 40, 2)
    (2, 4, 1, 2)
    """
    rate = (first_accepted + PRIOR_FIRST) / (nodes + PRIOR_NODES)
    if rate >= 1.0 - MISS_TARGET:
        return 1
    need = math.ceil(math.log(MISS_TARGET) / math.log(max(1e-9, 1.0 - rate)))
    return max(1, min(cap, need))


def _key(c: Candidate) -> tuple:
    return (c.token_id, c.data, c.is_end)


@dataclass
class _Node:
    depth: int
    before: Prefix
    candidates: list[Candidate] = field(default_factory=list)
    index: dict[tuple, int] = field(default_factory=dict)
    members: list[int] = field(default_factory=list)  # drafts with a usable position here
    top: int = 0  # the API's top-k entries: the first ``top`` candidates by logprob
    dropped: int = 0  # entries the API listed here that could not be used (HostedPosition.dropped)
    score: Offsets | None = None

    def add(self, pos: HostedPosition) -> None:
        for c in pos.candidates:
            if _key(c) not in self.index:
                self.index[_key(c)] = len(self.candidates)
                self.candidates.append(c)


@dataclass
class TreeStats:
    """What the walks saw, for :func:`choose_drafts` and the usage counts."""

    nodes: int = 0
    first_accepted: int = 0


class TreeWalk:
    """The n drafts of one call walked as a tree. See the module docstring."""

    probing = False
    tail_off = None

    def __init__(self, ctx: WalkContext, prefix: Prefix, stats: TreeStats) -> None:
        self.ctx, self.prefix, self.stats = ctx, prefix, stats

    def take(self, result: HostedResult) -> bool:
        return False  # several choices are asked whole

    def request(self) -> HostedRequest:
        raise RuntimeError("a tree walk never pauses")

    def observe(self, results: Sequence[HostedResult], api_seconds: float) -> ChunkWalk:
        started, ctx = time.perf_counter(), self.ctx
        drafts = [walkable(r) for r in results]
        nodes: dict[tuple, _Node] = {}
        keys: list[list[tuple]] = []  # per draft, the node key at each depth
        for j, (positions, _) in enumerate(drafts):
            key: tuple = ()
            keys.append([])
            for depth, (before, pos) in enumerate(zip(self.prefix.along(p.sampled for p in positions), positions)):
                node = nodes.get(key)
                if node is None:
                    node = nodes[key] = _Node(depth, before, dropped=pos.dropped)
                node.add(pos)
                node.members.append(j)
                node.top = max(node.top, ctx.host.top_k - pos.dropped)
                node.dropped = min(node.dropped, pos.dropped)
                keys[j].append(key)
                key = key + (_key(pos.sampled),)
        for node in nodes.values():  # candidates by logprob, as the API lists them
            node.candidates.sort(key=lambda c: -c.logprob)
            node.index = {_key(c): i for i, c in enumerate(node.candidates)}
        walk = ChunkWalk(results[0], api_seconds)
        key = ()
        while key in nodes:
            node = nodes[key]
            if node.score is None:
                walk.alignment = self._score_along(nodes, keys, node)
            if not self._step(walk, node, [drafts[j][0][node.depth].sampled for j in node.members]):
                break
            key = key + (_key(walk.usable[-1].sampled),)
        path = walk.usable
        if walk.rejected_at is None and key not in nodes and path and not path[-1].sampled.is_end:
            _leaf(walk, results, drafts, key)
        walk.scoring += time.perf_counter() - started
        return walk

    def _step(self, walk: ChunkWalk, node: _Node, children: list[Candidate]) -> bool:
        """Verify ``node``'s children; True when one was accepted and the walk goes on below it."""
        ctx, stats = self.ctx, self.stats
        e = torch.tensor(node.score.expert, dtype=torch.float64)
        a = torch.tensor(node.score.anti_expert, dtype=torch.float64)
        hosted = torch.tensor([c.logprob for c in node.candidates], dtype=torch.float64)
        scored = NodeScore(hosted, e - a, e, a, tuple(node.index[_key(c)] for c in children))
        mask = ctx.prompt.allowed(node.before, node.candidates)
        if ctx.greedy:
            top = torch.arange(len(node.candidates)) < node.top
            step = node_greedy(scored, ctx.alpha, top, mask)
        else:
            uniforms = [float(torch.rand((), generator=ctx.generator, dtype=torch.float64)) for _ in children]
            step = node_sampled(scored, ctx.alpha, uniforms, ctx.generator, mask)
        stats.nodes += 1
        stats.first_accepted += step.accepted == 0
        walk.probs.append(step.accept_probs[-1] if step.accept_probs else 0.0)
        walk.log_z.append(step.log_z)
        walk.tails.append(step.tail if len(children) == 1 else f"{step.tail}; {len(children)} drafts here")
        if step.note:
            walk.notes.append(f"position {node.depth}: {step.note}")
        # the path's positions as a one-draft walk has them (the trace's steps are read from these)
        taken = children[step.accepted] if step.accepted is not None else children[0]
        walk.rows.append(PositionScore(hosted, e - a, e, a, node.index[_key(taken)]))
        walk.items.append((node.before, node.candidates))
        # greedy chooses among the API's top-k alone (as per-step); drafts outside it are not candidates there
        walk.allowed.append((top if mask is None else top & mask) if ctx.greedy else mask)
        walk.usable.append(HostedPosition(candidates=tuple(node.candidates), sampled=taken, dropped=node.dropped))
        if step.accepted is None:
            walk.rejected_at = node.depth
            if step.replacement is not None:
                walk.replacement = node.candidates[step.replacement]
            return False
        walk.accepted += 1
        return not taken.is_end

    def _score_along(self, nodes: dict[tuple, _Node], keys: list[list[tuple]], node: _Node) -> str:
        """Score ``node`` and the unscored nodes below it along its first draft, in one batch."""
        j = node.members[0]
        batch = [nodes[k] for k in keys[j][node.depth:] if nodes[k].score is None]
        scored = self.ctx.scoring.score([(n.before, n.candidates) for n in batch])
        for n, s in zip(batch, scored):
            n.score = s
        return scored[0].alignment


def _leaf(walk: ChunkWalk, results: Sequence[HostedResult], drafts, key: tuple) -> None:
    """The walk accepted every token of the drafts that reached ``key``: why those drafts ended
    decides what comes next. A draft cut at a possible end makes the next position be asked alone
    (``unresolved``); one the API stopped without reporting its end is re-asked with the end
    banned (the decoder reads ``result``: finish "stop" with as many positions as were walked)."""
    depth = len(key)
    ended = [j for j, (positions, _) in enumerate(drafts)
             if len(positions) == depth and tuple(_key(p.sampled) for p in positions) == key]
    walk.unresolved = any(drafts[j][1] is not None and drafts[j][1].end_unresolved for j in ended)
    hidden = [j for j in ended if drafts[j][1] is None and results[j].finish_reason == "stop"]
    first = results[hidden[0] if hidden else 0]
    positions = tuple(walk.usable) if hidden and not walk.unresolved else ()
    walk.result = HostedResult(first.text, positions, "stop" if positions else "length", first.usage)
