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
from ...maths.tree import NodeScore, NodeStep, node_greedy, node_sampled
from ...types import Candidate, HostedPosition, HostedRequest, HostedResult
from .. import tail
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
    """The n drafts of one call walked as a tree. See the module docstring. A greedy walk where
    the tail can be checked (:mod:`~blackbox_proxy.decoding.tail`) takes each node's argmax over
    every token it knows (the top-k and the drafted ones) and pauses for a tail probe where a
    token outside them may be better."""

    tail_off: str | None = None  # set when a probe's answer showed the host ignores logit_bias

    def __init__(self, ctx: WalkContext, prefix: Prefix, stats: TreeStats) -> None:
        self.ctx, self.prefix, self.stats = ctx, prefix, stats
        self.asking: tuple | None = None  # (the tail check, the node, its children) while a probe is out
        self.fulls: list = []  # the whole distributions along the path (for a tail token's trace entry)

    @property
    def probing(self) -> bool:
        return self.asking is not None

    def take(self, result: HostedResult) -> bool:
        return False  # several choices are asked whole

    def request(self) -> HostedRequest:
        """The paused node's tail probe."""
        return self.asking[0].request(self.ctx.prompt, self.ctx.host)

    def observe(self, results: Sequence[HostedResult], api_seconds: float) -> ChunkWalk | None:
        if self.asking is not None:
            return self._settle(results)
        started, ctx = time.perf_counter(), self.ctx
        self.results, self.drafts = results, [walkable(r) for r in results]
        self.nodes: dict[tuple, _Node] = {}
        self.keys: list[list[tuple]] = []  # per draft, the node key at each depth
        for j, (positions, _) in enumerate(self.drafts):
            key: tuple = ()
            self.keys.append([])
            for depth, (before, pos) in enumerate(zip(self.prefix.along(p.sampled for p in positions), positions)):
                node = self.nodes.get(key)
                if node is None:
                    node = self.nodes[key] = _Node(depth, before, dropped=pos.dropped)
                node.add(pos)
                node.members.append(j)
                node.top = max(node.top, ctx.host.top_k - pos.dropped)
                node.dropped = min(node.dropped, pos.dropped)
                self.keys[j].append(key)
                key = key + (_key(pos.sampled),)
        for node in self.nodes.values():  # candidates by logprob, as the API lists them
            node.candidates.sort(key=lambda c: -c.logprob)
            node.index = {_key(c): i for i, c in enumerate(node.candidates)}
        self.walk, self.key = ChunkWalk(results[0], api_seconds), ()
        self.walk.scoring += time.perf_counter() - started
        return self._go()

    def _go(self) -> ChunkWalk | None:
        """Walk down from ``self.key`` until a rejection, the end of the drafts, or a pause."""
        started, walk = time.perf_counter(), self.walk
        while self.key in self.nodes:
            node = self.nodes[self.key]
            if node.score is None:
                walk.alignment = self._score_along(node)
            children = [self.drafts[j][0][node.depth].sampled for j in node.members]
            step = self._verify(node, children)
            if step is None:  # paused: request() asks the tail probe
                walk.scoring += time.perf_counter() - started
                return None
            if not self._record(node, children, step):
                break
            self.key = self.key + (_key(walk.usable[-1].sampled),)
        path = walk.usable
        if walk.rejected_at is None and self.key not in self.nodes and path and not path[-1].sampled.is_end:
            _leaf(walk, self.results, self.drafts, self.key)
        if all(f is not None for f in self.fulls):
            walk.full = self.fulls
        walk.scoring += time.perf_counter() - started
        return walk

    def _scored(self, node: _Node, children: list[Candidate]) -> NodeScore:
        e = torch.tensor(node.score.expert, dtype=torch.float64)
        a = torch.tensor(node.score.anti_expert, dtype=torch.float64)
        hosted = torch.tensor([c.logprob for c in node.candidates], dtype=torch.float64)
        return NodeScore(hosted, e - a, e, a, tuple(node.index[_key(c)] for c in children))

    def _tail_checked(self, node: _Node) -> bool:
        host = self.ctx.host
        return self.ctx.greedy and host.logit_bias_cap > 0 and node.score.full is not None and self.tail_off is None

    def _verify(self, node: _Node, children: list[Candidate]) -> NodeStep | None:
        """The node's decision (None: paused for a tail probe)."""
        ctx, scored = self.ctx, self._scored(node, children)
        mask = ctx.prompt.allowed(node.before, node.candidates)
        if not ctx.greedy:
            uniforms = [float(torch.rand((), generator=ctx.generator, dtype=torch.float64)) for _ in children]
            return node_sampled(scored, ctx.alpha, uniforms, ctx.generator, mask)
        if not self._tail_checked(node):
            return node_greedy(scored, ctx.alpha, torch.arange(len(node.candidates)) < node.top, mask)
        step = node_greedy(scored, ctx.alpha, torch.ones(len(node.candidates), dtype=torch.bool), mask)
        if step.accepted is None and step.replacement is None:
            return step  # no candidate can be carried (text prompt)
        best = scored.children[step.accepted] if step.accepted is not None else step.replacement
        asking = tail.check(node.before, node.candidates, node.score, mask, best, host=ctx.host, prompt=ctx.prompt,
                            vocab=ctx.scoring.vocab, alpha=ctx.alpha, exhaustive=not node.dropped, top=node.top)
        if asking is None:
            return step
        self.asking = (asking, node, children, step)
        return None

    def _settle(self, results: Sequence[HostedResult]) -> ChunkWalk | None:
        """A node's tail probe answered: keep the child that is the argmax, else replace it."""
        (asking, node, children, step), self.asking = self.asking, None
        self.walk.tail_calls += 1
        token, note = asking.decide(results, self.ctx.scoring.vocab)
        untrusted = asking.distrust(results)
        if untrusted is not None:
            self.walk.untrusted_calls += 1
            self.tail_off = untrusted
        self.walk.notes.append(f"position {node.depth}: {note}")
        if token is not None:  # a tail token: every child is rejected, the token replaces them
            step = NodeStep(None, None, (0.0,) * len(children), step.log_z, step.tail)
        if not self._record(node, children, step, token):
            return self._go_end()
        self.key = self.key + (_key(self.walk.usable[-1].sampled),)
        return self._go()

    def _go_end(self) -> ChunkWalk:
        if all(f is not None for f in self.fulls):
            self.walk.full = self.fulls
        return self.walk

    def _record(self, node: _Node, children: list[Candidate], step: NodeStep, tail_token: Candidate | None = None
                ) -> bool:
        """Record a node's decision on the walk; True when a child was accepted and the walk goes on."""
        ctx, stats, walk = self.ctx, self.stats, self.walk
        scored = self._scored(node, children)
        stats.nodes += 1
        stats.first_accepted += step.accepted == 0
        walk.probs.append(step.accept_probs[-1] if step.accept_probs else 0.0)
        walk.log_z.append(step.log_z)
        walk.tails.append(step.tail if len(children) == 1 else f"{step.tail}; {len(children)} drafts here")
        if step.note:
            walk.notes.append(f"position {node.depth}: {step.note}")
        # the path's positions as a one-draft walk has them (the trace's steps are read from these)
        taken = children[step.accepted] if step.accepted is not None else children[0]
        walk.rows.append(PositionScore(scored.hosted_logprobs, scored.delta, scored.lp_e, scored.lp_a,
                                       node.index[_key(taken)]))
        walk.items.append((node.before, node.candidates))
        mask = ctx.prompt.allowed(node.before, node.candidates)
        # greedy chooses among the API's top-k (as per-step); a drafted token outside it that is
        # chosen is added to the trace by the decoder, as a tail token is
        top = torch.arange(len(node.candidates)) < node.top
        walk.allowed.append((top if mask is None else top & mask) if ctx.greedy else mask)
        walk.usable.append(HostedPosition(candidates=tuple(node.candidates), sampled=taken, dropped=node.dropped))
        self.fulls.append(node.score.full)
        if step.accepted is None:
            walk.rejected_at = node.depth
            if tail_token is not None:
                walk.replacement = tail_token
            elif step.replacement is not None:
                walk.replacement = node.candidates[step.replacement]
            return False
        walk.accepted += 1
        return not taken.is_end

    def _score_along(self, node: _Node) -> str:
        """Score ``node`` and the unscored nodes below it along its first draft, in one batch."""
        j = node.members[0]
        batch = [self.nodes[k] for k in self.keys[j][node.depth:] if self.nodes[k].score is None]
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
