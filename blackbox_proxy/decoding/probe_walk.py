"""Tail probes inside a single-draft speculative walk (the maths: :mod:`blackbox_proxy.maths.tail`).

Position by position, Z is bounded without a call, a draft is kept without a call when the
bounds decide it, and otherwise the walk pauses for a tail probe: n one-token draws with the
candidates banned and the expert's likely tail tilted up, which estimates Z and supplies the
tail's share of the residual. ``SpeculativeDecoder.request`` then returns the probe and
``observe`` takes its answer. Where no probe can be asked, a position takes the candidates-only
rule (:func:`~blackbox_proxy.maths.rejection.step_sampled`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .._constants import PROB_FLOOR
from ..maths import tail as tails
from ..maths.rejection import accept_probability, step_sampled
from ..types import Candidate, ChunkTrace, HostedRequest, HostedResult, Usage
from .base import is_utf8
from .chunks import TOP1_TOLERANCE, ChunkWalk


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


class TailProbes:
    """The tail-probe walk, mixed into :class:`~blackbox_proxy.decoding.speculative.SpeculativeDecoder`
    (it uses the decoder's params, generator, scoring and ``_finish``)."""

    def _probes_possible(self, chunk: ChunkWalk) -> bool:
        return (self.tail_off is None and self.params.tail_calls > 0 and self.logit_bias_cap > 0
                and chunk.full is not None)

    # ----- the walk with tail probes ---------------------------------------------------------------
    def _advance(self, chunk: ChunkWalk) -> ChunkTrace | None:
        """Walk from ``chunk.accepted`` until the chunk ends, a draft is rejected, or a position
        needs a probe (then pause: :meth:`request` asks it)."""
        started = time.perf_counter()
        while chunk.accepted < len(chunk.rows) and chunk.rejected_at is None:
            t = chunk.accepted
            u = float(torch.rand((), generator=self.generator, dtype=torch.float64))
            tail = self._tail_at(chunk, t)
            if tail is None:  # no probe can be asked here: the candidates-only rule at this position
                self._candidates_only(chunk, t, u)
                continue
            view = tail.view
            if view.settled:
                self._decide(chunk, tail, u, view.log_z(), None,
                             f"settled: Z in [{view.z_c:.4g}, {view.z_c + view.bound:.4g}], no probe")
            elif u < accept_probability(tail.log_w_draft, view.log_z_hi):
                # every Z the bounds allow accepts this draft: no call (the same draw as probe-first)
                self._record(chunk, accept_probability(tail.log_w_draft, view.log_z()), view.log_z(),
                             f"kept without a probe (Z in [{view.z_c:.4g}, {view.z_c + view.bound:.4g}])")
                chunk.accepted += 1
            else:  # pause here: request() asks the probe
                size, (full_e, full_a) = tail.log_w.numel(), chunk.full[t]
                tail.plan = tails.plan_probe([chunk.usable[t].candidates[i].token_id for i in tail.c_index],
                                             tail.log_w, full_e.double()[:size], full_a.double()[:size],
                                             cap=self.logit_bias_cap, draws=self.params.tail_draws)
                tail.u, chunk.paused, self._walking = u, tail, chunk
                chunk.scoring += time.perf_counter() - started
                return None
        chunk.scoring += time.perf_counter() - started
        return self._finish(chunk)

    def _tail_at(self, chunk: ChunkWalk, t: int) -> Tail | None:
        """Position t's tail, or None when no probe can be asked there (a candidate without a
        hosted id, more candidates than ``logit_bias`` entries, or a text prompt whose prefix ends
        inside a character)."""
        row, (before, _, cands) = chunk.rows[t], chunk.items[t]
        if (not self.token_prompts and not is_utf8(before)) or min(self.params.top_k, len(cands)) > self.logit_bias_cap:
            return None
        full_e, full_a = chunk.full[t]
        size = min(self.aligner.small.size, full_e.numel())
        log_w = tails.log_weights(full_e[:size], full_a[:size], self.params.alpha, math.log(PROB_FLOOR),
                                  [i for i in self.aligner.small.end_ids if i < size])
        cand_log_w = self.params.alpha * row.delta
        found = tails.position_view(row.hosted_logprobs, cand_log_w, [c.token_id for c in cands], row.draft,
                                    self.params.top_k, log_w, exhaustive=not chunk.usable[t].dropped)
        return Tail(found[0], found[1], log_w, float(cand_log_w[row.draft])) if found else None

    def _probe_request(self, chunk: ChunkWalk) -> HostedRequest:
        tail = chunk.paused
        before, ids, _ = chunk.items[chunk.accepted]
        n = max(1, min(tail.plan.draws - len(tail.drawn), self.max_choices))
        seed = int(torch.randint(0, 2**31 - 1, (), generator=self.generator))
        request = self._request(max_tokens=1, temperature=1.0, seed=seed, after=(before, ids))
        return dataclasses.replace(request, n=n, top_k=1, logit_bias=tail.plan.logit_bias())

    def _observe_probe(self, results: Sequence[HostedResult], api_seconds: float) -> ChunkTrace | None:
        chunk, tail = self._walking, self._walking.paused
        self._count_call(results[0], api_seconds)  # one call: n choices share one answer's usage
        self.usage = self.usage + Usage(tail_calls=1)
        tail.calls += 1
        chunk.tail_calls += 1
        started, t, lost = time.perf_counter(), chunk.accepted, 0
        cands, banned = chunk.usable[t].candidates, set(tail.plan.banned)
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
            chunk.notes.append(f"position {t}: {lost} probe draw(s) without a usable token were left out")
        self._walking, chunk.paused = None, None
        if self.tail_off is not None:
            chunk.notes.append(f"position {t}: tail probes stopped: {self.tail_off}; candidates-only rule")
            self._candidates_only(chunk, t, tail.u)
            chunk.scoring += time.perf_counter() - started
            return self._advance(chunk)
        if len(tail.drawn) < tail.plan.draws and tail.calls < self.params.tail_calls:
            chunk.paused, self._walking = tail, chunk  # the host caps choices per call: ask again
            return None
        ids = torch.tensor([c.token_id for c in tail.drawn], dtype=torch.long)
        estimate = tails.tail_estimate(tail.plan, ids, torch.tensor([c.logprob for c in tail.drawn], dtype=torch.float64),
                                       tail.log_w[ids], tail.view.tail_mass)
        if estimate is None:
            chunk.notes.append(f"position {t}: the probe returned no usable draw; candidates-only rule")
            self._candidates_only(chunk, t, tail.u)
        else:
            self._decide(chunk, tail, tail.u, tail.view.log_z(estimate.z_tail), estimate, estimate.how)
        chunk.scoring += time.perf_counter() - started
        return self._advance(chunk)

    def _decide(self, chunk: ChunkWalk, tail: Tail, u: float, log_z: float, estimate: tails.TailEstimate | None,
                how: str) -> None:
        """Keep the draft when u < min(1, w/Z^); else draw its replacement over C and the
        probe's tail entries (:func:`~blackbox_proxy.maths.tail.replacement`)."""
        a = accept_probability(tail.log_w_draft, log_z)
        self._record(chunk, a, log_z, how)
        if u < a:
            chunk.accepted += 1
            return
        t = chunk.rejected_at = chunk.accepted
        before, _, cands = chunk.items[t]
        by_id = {c.token_id: c for c in tail.drawn}
        entries = [cands[i] for i in tail.c_index] + ([by_id[i] for i in estimate.ids.tolist()] if estimate else [])
        allowed = None
        if not self.token_prompts:
            allowed = torch.tensor([c.is_end or is_utf8(before + c.data) for c in entries])
            if not bool(allowed.any()):
                chunk.notes.append(f"position {t}: rejected, and no candidate ends on a whole UTF-8 character (text prompt)")
                return
        row = chunk.rows[t]
        probs = tails.replacement(row.hosted_logprobs[tail.c_index], self.params.alpha * row.delta[tail.c_index],
                                  estimate, log_z, allowed)
        chunk.replacement = entries[int(torch.multinomial(probs.float(), 1, generator=self.generator))]

    def _candidates_only(self, chunk: ChunkWalk, t: int, u: float) -> None:
        step = step_sampled(chunk.rows[t], self.params.alpha, u, self.generator, chunk.allowed[t])
        self._record(chunk, step.accept_prob, step.log_z, step.tail)
        if step.note:
            chunk.notes.append(f"position {t}: {step.note}")
        if step.accepted:
            chunk.accepted += 1
            return
        chunk.rejected_at = t
        if step.replacement is not None:
            chunk.replacement = chunk.usable[t].candidates[step.replacement]

    @staticmethod
    def _record(chunk: ChunkWalk, accept_prob: float, log_z: float, how: str) -> None:
        chunk.probs.append(accept_prob)
        chunk.log_z.append(log_z)
        chunk.tails.append(how)
