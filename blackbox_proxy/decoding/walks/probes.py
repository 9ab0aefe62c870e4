"""One sampled draft walked with tail probes (the maths: :mod:`blackbox_proxy.maths.tail`).

Position by position, Z is bounded without a call, a draft is kept without a call when the
bounds decide it, and otherwise the walk pauses for a *tail probe*: n one-token draws with the
candidates banned and the expert's likely tail tilted up, which estimates Z and supplies the
tail's share of the residual. The decoder then asks :meth:`ProbeWalk.request` and hands its
answer to :meth:`ProbeWalk.observe`. Where no probe can be asked (across tokenizers, a candidate
without a hosted id, more candidates than ``logit_bias`` entries, a text prompt inside a
character), a position takes the candidates-only rule
(:func:`~blackbox_proxy.maths.rejection.step_sampled`), which is the draft walk's, draw for draw.

A host that draws a banned token, or whose probe reports another top logprob than the chunk
(it biases the logprobs it returns), switches probes off for the generation (``tail_off``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..._constants import PROB_FLOOR
from ...maths import tail as tails
from ...maths.rejection import accept_probability, step_sampled
from ...types import Candidate, HostedRequest, HostedResult
from ..prefix import Prefix, is_utf8
from . import (ChunkWalk, WalkContext, context_full, full_distributions, record, rows, score_draft, unwalkable,
               walkable)

TOP1_TOLERANCE = 0.1  # nats: a probe's top-1 logprob must be the chunk's (the host returns unbiased logprobs)


@dataclass
class Tail:
    """One position's tail: candidate indices forming C, the bounds, every id's log w ``[V]``,
    and, once asked, the probe's plan, the draft's uniform ``u`` and the draws so far."""

    c_index: list[int]
    view: tails.TailView
    log_w: torch.Tensor
    log_w_draft: float
    u: float = 0.0
    plan: tails.ProbePlan | None = None
    calls: int = 0
    drawn: list[Candidate] = field(default_factory=list)


class ProbeWalk:
    """A sampled single-draft walk that may pause for tail probes. See the module docstring."""

    tail_off: str | None = None

    def __init__(self, ctx: WalkContext, prefix: Prefix) -> None:
        self.ctx, self.prefix = ctx, prefix
        self.walk: ChunkWalk | None = None
        self.paused: Tail | None = None

    @property
    def probing(self) -> bool:
        return self.paused is not None

    def take(self, result: HostedResult) -> bool:
        return False  # asked whole: a walk that may pause is not streamed

    def observe(self, results: Sequence[HostedResult], api_seconds: float) -> ChunkWalk | None:
        if self.paused is not None:
            return self._observe_probe(results)
        started = time.perf_counter()
        usable, stop = walkable(results[0])
        walk = self.walk = ChunkWalk(results[0], api_seconds, usable=usable)
        if stop is not None:
            walk.notes.append(unwalkable(stop))
            walk.unresolved = stop.end_unresolved
        walk.items, offsets = score_draft(self.ctx, self.prefix, usable)
        if context_full(walk, len(walk.items), len(usable)):
            del usable[len(walk.items):]
            if not usable:
                return walk
        walk.rows, walk.allowed, notes = rows(self.ctx, walk.items, offsets, [p.sampled for p in usable])
        walk.notes += notes
        walk.alignment, walk.full = offsets[0].alignment, full_distributions(offsets)
        walk.scoring += time.perf_counter() - started
        return self._advance()

    # ----- the walk ----------------------------------------------------------------------------------
    def _advance(self) -> ChunkWalk | None:
        """Walk from ``walk.accepted`` until the chunk ends, a draft is rejected, or a position
        needs a probe (then pause: :meth:`request` asks it)."""
        started, walk, ctx = time.perf_counter(), self.walk, self.ctx
        while walk.accepted < len(walk.rows) and walk.rejected_at is None:
            t = walk.accepted
            u = float(torch.rand((), generator=ctx.generator, dtype=torch.float64))
            tail = self._tail_at(t)
            if tail is None:  # no probe can be asked here: the candidates-only rule at this position
                self._candidates_only(t, u)
                continue
            view = tail.view
            if view.settled:
                self._decide(tail, u, view.log_z(), None,
                             f"settled: Z in [{view.z_c:.4g}, {view.z_c + view.bound:.4g}], no probe")
            elif u < accept_probability(tail.log_w_draft, view.log_z_hi):
                # every Z the bounds allow accepts this draft: no call (the same draw as probe-first)
                record(walk, accept_probability(tail.log_w_draft, view.log_z()), view.log_z(),
                       f"kept without a probe (Z in [{view.z_c:.4g}, {view.z_c + view.bound:.4g}])")
                walk.accepted += 1
            else:  # pause here: request() asks the probe
                size, (full_e, full_a) = tail.log_w.numel(), walk.full[t]
                tail.plan = tails.plan_probe([walk.usable[t].candidates[i].token_id for i in tail.c_index],
                                             tail.log_w, full_e.double()[:size], full_a.double()[:size],
                                             cap=ctx.host.logit_bias_cap, draws=ctx.tail_draws)
                tail.u, self.paused = u, tail
                walk.scoring += time.perf_counter() - started
                return None
        walk.scoring += time.perf_counter() - started
        return walk

    def _tail_at(self, t: int) -> Tail | None:
        """Position t's tail, or None when no probe can be asked there (no whole distributions, a
        candidate without a hosted id, more candidates than ``logit_bias`` entries, or a text
        prompt whose prefix ends inside a character)."""
        walk, ctx = self.walk, self.ctx
        if walk.full is None:
            return None
        row, (before, cands) = walk.rows[t], walk.items[t]
        if (not ctx.prompt.by_ids(before) and not is_utf8(before.data)) or min(ctx.host.top_k, len(cands)) \
                > ctx.host.logit_bias_cap:
            return None
        full_e, full_a = walk.full[t]
        vocab = ctx.scoring.vocab
        size = min(vocab.size, full_e.numel())
        log_w = tails.log_weights(full_e[:size], full_a[:size], ctx.alpha, math.log(PROB_FLOOR),
                                  [i for i in vocab.end_ids if i < size])
        cand_log_w = ctx.alpha * row.delta
        found = tails.position_view(row.hosted_logprobs, cand_log_w, [c.token_id for c in cands], row.draft,
                                    ctx.host.top_k, log_w, exhaustive=not walk.usable[t].dropped)
        return Tail(found[0], found[1], log_w, float(cand_log_w[row.draft])) if found else None

    def request(self) -> HostedRequest:
        """The paused position's probe: n one-token draws with C banned and the tail tilted."""
        tail, ctx = self.paused, self.ctx
        before, _ = self.walk.items[self.walk.accepted]
        n = max(1, min(tail.plan.draws - len(tail.drawn), ctx.host.max_choices))
        seed = int(torch.randint(0, 2**31 - 1, (), generator=ctx.generator))
        return ctx.prompt.request(before, ctx.host, max_tokens=1, temperature=1.0, seed=seed, n=n, top_k=1,
                                  logit_bias=tail.plan.logit_bias())

    def _observe_probe(self, results: Sequence[HostedResult]) -> ChunkWalk | None:
        walk, tail = self.walk, self.paused
        tail.calls += 1
        walk.tail_calls += 1
        started, t, lost = time.perf_counter(), walk.accepted, 0
        cands, banned = walk.usable[t].candidates, set(tail.plan.banned)
        for result in results:
            pos = result.positions[0] if result.positions else None
            drawn = pos.sampled if pos is not None else None
            if drawn is None or drawn.token_id is None or drawn.token_id >= tail.log_w.numel():
                lost += 1  # the end hidden, or a token without text or id: its draw is lost
                continue
            if drawn.token_id in banned:
                self.tail_off = "the host drew a banned token (it does not honour logit_bias)"
                break
            top = pos.candidates[0] if pos.candidates else None
            if top is None or abs(top.logprob - cands[0].logprob) > TOP1_TOLERANCE:
                self.tail_off = "the probe's top logprob is not the chunk's (the host returns biased logprobs)"
                break
            tail.drawn.append(drawn)
        if lost:
            walk.notes.append(f"position {t}: {lost} probe draw(s) without a usable token were left out")
        self.paused = None
        if self.tail_off is not None:
            walk.untrusted_calls += 1
            walk.notes.append(f"position {t}: tail probes stopped: {self.tail_off}; candidates-only rule")
            self._candidates_only(t, tail.u)
            walk.scoring += time.perf_counter() - started
            return self._advance()
        if len(tail.drawn) < tail.plan.draws and tail.calls < self.ctx.params.tail_calls:
            self.paused = tail  # the host caps choices per call: ask again
            return None
        ids = torch.tensor([c.token_id for c in tail.drawn], dtype=torch.long)
        estimate = tails.tail_estimate(tail.plan, ids, torch.tensor([c.logprob for c in tail.drawn], dtype=torch.float64),
                                       tail.log_w[ids], tail.view.tail_mass)
        if estimate is None:
            walk.notes.append(f"position {t}: the probe returned no usable draw; candidates-only rule")
            self._candidates_only(t, tail.u)
        else:
            self._decide(tail, tail.u, tail.view.log_z(estimate.z_tail), estimate, estimate.how)
        walk.scoring += time.perf_counter() - started
        return self._advance()

    def _decide(self, tail: Tail, u: float, log_z: float, estimate: tails.TailEstimate | None, how: str) -> None:
        """Keep the draft when u < min(1, w/Z^); else draw its replacement over C and the
        probe's tail entries (:func:`~blackbox_proxy.maths.tail.replacement`)."""
        walk, ctx = self.walk, self.ctx
        a = accept_probability(tail.log_w_draft, log_z)
        record(walk, a, log_z, how)
        if u < a:
            walk.accepted += 1
            return
        t = walk.rejected_at = walk.accepted
        before, cands = walk.items[t]
        by_id = {c.token_id: c for c in tail.drawn}
        entries = [cands[i] for i in tail.c_index] + ([by_id[i] for i in estimate.ids.tolist()] if estimate else [])
        allowed = ctx.prompt.allowed(before, entries)
        if allowed is not None and not bool(allowed.any()):
            walk.notes.append(f"position {t}: rejected, and no candidate ends on a whole UTF-8 character (text prompt)")
            return
        row = walk.rows[t]
        probs = tails.replacement(row.hosted_logprobs[tail.c_index], ctx.alpha * row.delta[tail.c_index],
                                  estimate, log_z, allowed)
        walk.replacement = entries[int(torch.multinomial(probs.float(), 1, generator=ctx.generator))]

    def _candidates_only(self, t: int, u: float) -> None:
        walk = self.walk
        step = step_sampled(walk.rows[t], self.ctx.alpha, u, self.ctx.generator, walk.allowed[t])
        record(walk, step.accept_prob, step.log_z, step.tail)
        if step.note:
            walk.notes.append(f"position {t}: {step.note}")
        if step.accepted:
            walk.accepted += 1
            return
        walk.rejected_at = t
        if step.replacement is not None:
            walk.replacement = walk.usable[t].candidates[step.replacement]
