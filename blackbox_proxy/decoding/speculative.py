"""The speculative strategy: one API call per chunk of drafts, walked by rejection (DESIGN.md §2.3).

The API draws a chunk of N tokens at temperature 1, top_p 1 (so the drafts follow the hosted
p_L), with top-k logprobs at every position. The walk accepts drafts with min(1, w/Z) and
replaces the first rejected one by a residual draw (Leviathan et al. 2023, Alg. 1; the terms
draft, accepted, residual draw, tail and tail probe are defined in
:mod:`blackbox_proxy.maths.rejection`). The next call starts from the new prefix. Because the
drafts are the hosted model's own samples, accepted tokens can lie outside the top-k. At
temperature 0 the API's greedy chunk is kept up to the first position whose proxy-tuned argmax
over C differs (:func:`~blackbox_proxy.maths.rejection.walk_greedy`; equal to per-step greedy).

Two sampled walks:

- *with tail probes* (same tokenizer, a host whose ``logit_bias`` biases only the draw,
  ``tail_calls`` >= 1): position by position, Z is bounded without a call, a draft is kept
  without a call when the bounds decide it, and otherwise the walk pauses for a tail probe
  (:mod:`blackbox_proxy.maths.tail`: n one-token draws with the candidates banned and the
  expert's likely tail tilted up) that estimates Z and supplies the tail's share of the
  residual. ``request`` then returns the probe and ``observe`` takes its answer. Probe calls are
  counted in ``usage.api_calls`` and ``usage.tail_calls`` and in each chunk's trace;
- *candidates only* (:func:`~blackbox_proxy.maths.rejection.walk_sampled`): everywhere else,
  and at any position where a probe cannot be asked or was answered wrongly.

What this module adds to the maths: the requests (seeded from the decoder's generator), scoring
every walked position in one batched forward per model, cutting a chunk where a draft is
unknown or may be the end of text (that position is then asked alone), keeping text prompts on
whole UTF-8 characters, the end the API hides, and the chunk length, which adapts to the
acceptance rate (:func:`adaptive_chunk`).

Left out: temperatures other than 0 or 1 and top_p < 1 (they would need normalisers over the
unseen tail of p_L^(1/T); refused rather than approximated silently: use the per-step strategy).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .._constants import PROB_FLOOR
from ..errors import HostedResponseError
from ..maths import tail as tails
from ..maths.rejection import PositionScore, accept_probability, step_sampled, walk_greedy, walk_sampled
from ..types import Candidate, ChunkTrace, HostedPosition, HostedRequest, HostedResult, Usage
from .base import DecoderBase, is_utf8

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
class _Tail:
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


@dataclass
class _Chunk:
    """A chunk being walked; the walk may pause at a position (``paused``) for a tail probe."""

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
    paused: _Tail | None = None
    tail_calls: int = 0


class SpeculativeDecoder(DecoderBase):
    """Speculative proxy tuning: one API call per chunk of drafts. See the module docstring.

    ``params.temperature`` must be 1 (sampling) or 0 (greedy); ``params.chunk`` fixes the chunk
    length, else it adapts to the acceptance rate (:func:`adaptive_chunk`); ``params.tail_calls``
    bounds the tail-probe calls per position (0: candidates only) and ``params.tail_draws`` the
    draws per probe. Probes need ``logit_bias_cap`` > 0 (set from the hosted client).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.chunk = self.params.chunk or adaptive_chunk(0, 0)
        self.chunks: list[ChunkTrace] = []
        self.greedy = self.params.temperature == 0
        self._stalled = 0  # chunks in a row that added nothing
        self._one_step = False  # ask the next position alone (a possible end inside a chunk)
        self._walking: _Chunk | None = None  # a chunk paused for a tail probe
        self.tail_off: str | None = None  # why tail probes stopped for this generation

    def request(self) -> HostedRequest:
        if self._walking is not None:
            return self._probe_request(self._walking)
        if self._end_hidden or self._one_step:
            return self._request(max_tokens=1, temperature=0.0)
        n = max(1, min(self.chunk, self.params.max_tokens - self.generated))
        if self.greedy:
            return self._request(max_tokens=n, temperature=0.0)
        seed = int(torch.randint(0, 2**31 - 1, (), generator=self.generator))
        return self._request(max_tokens=n, temperature=1.0, seed=seed)

    def observe(self, results: Sequence[HostedResult], api_seconds: float) -> ChunkTrace | None:
        if self._walking is not None:
            return self._observe_probe(results, api_seconds)
        result = results[0]
        self._count_call(result, api_seconds)
        if self._end_hidden:
            # The previous chunk ended where the API hid the end; this answer has that position
            # again, with the end among the candidates: choose there like per-step.
            self._end_hidden = False
            if not result.positions:
                self.finish_reason = "stop"
                return None
            notes = ["the API ended without logprobs; re-asked that position with the end banned from its draw"]
            self._choose_per_step(result.positions[0], api_seconds, notes, 0.0 if self.greedy else 1.0, 1.0)
            return None
        if self._one_step:
            # one position asked alone (see _walk): choose there like per-step
            self._one_step = False
            if not result.positions:
                self._ended_without_logprobs()
                return None
            notes = ["a top entry that may be the end of text; this position was asked alone"]
            self._choose_per_step(result.positions[0], api_seconds, notes, 0.0 if self.greedy else 1.0, 1.0)
            return None
        if not result.positions:
            self._ended_without_logprobs()
            return None
        return self._walk(result, api_seconds)

    # ----- one chunk ----------------------------------------------------------------------------
    def _walk(self, result: HostedResult, api_seconds: float) -> ChunkTrace | None:
        started = time.perf_counter()
        notes: list[str] = []
        positions = list(result.positions)
        # Only positions whose draft is known (and among the candidates) can be walked.
        usable = []
        unresolved = False
        for pos in positions:
            if pos.end_unresolved:
                # an entry that may be the end is not resolved inside a chunk; the position is
                # asked alone, where the client resolves it
                notes.append("a top entry that may be the end of text; the chunk was cut there")
                unresolved = True
                break
            if pos.sampled is None or not pos.candidates or not any(
                c is pos.sampled or c == pos.sampled for c in pos.candidates
            ):
                notes.append("the API did not report a drawn token's logprob; the chunk was cut there")
                break
            usable.append(pos)
        if not usable and unresolved:
            self._one_step = True
            return None
        if not usable and positions[0].candidates and positions[0].sampled is None:  # a draw with no text
            notes.append("the draw at this position has no text (a special token); chosen like per-step")
            self._choose_per_step(positions[0], api_seconds, notes, 0.0 if self.greedy else 1.0, 1.0)
            return None
        if not usable:
            raise HostedResponseError(
                "the hosted API returned a chunk without the drawn tokens' logprobs; speculative decoding "
                "needs them (use --strategy per-step with this host)"
            )
        items = []
        before = self.continuation
        ids = list(self.hosted_ids) if self.hosted_ids is not None else None
        for pos in usable:
            items.append((before, list(ids) if ids is not None else None, pos.candidates))
            before += pos.sampled.data
            if ids is not None:
                ids = ids + [pos.sampled.token_id] if pos.sampled.token_id is not None else None
        scored, alignment = self._score_positions(items)
        rows = []
        allowed = []
        for (lp_e, lp_a), (cont, _, cands), pos in zip(scored, items, usable):
            e = torch.tensor(lp_e, dtype=torch.float64)
            a = torch.tensor(lp_a, dtype=torch.float64)
            draft = next((i for i, c in enumerate(cands) if c is pos.sampled), None)
            rows.append(PositionScore(torch.tensor([c.logprob for c in cands], dtype=torch.float64), e - a, e, a,
                                      draft if draft is not None else cands.index(pos.sampled)))
            allowed.append(None if self.token_prompts else
                           torch.tensor([c.is_end or is_utf8(cont + c.data) for c in cands]))
        silent = sum(v == -math.inf for lp_e, _ in scored for v in lp_e)
        if silent:
            notes.append(f"{silent} candidate(s) the small models cannot say excluded (no evidence: both at the floor)")
        chunk = _Chunk(result, api_seconds, usable, items, rows, allowed, self.full_scores, alignment, unresolved, notes)
        if self.greedy or not self._probes_possible(chunk):
            walk = (walk_greedy(rows, self.params.alpha, allowed) if self.greedy
                    else walk_sampled(rows, self.params.alpha, self.generator, allowed))
            chunk.notes += list(walk.notes)
            chunk.probs, chunk.log_z, chunk.tails = list(walk.accept_probs), list(walk.log_z), list(walk.tail)
            chunk.accepted, chunk.rejected_at = walk.accepted, walk.rejected_at
            if walk.rejected_at is not None and walk.replacement is not None:
                chunk.replacement = usable[walk.rejected_at].candidates[walk.replacement]
            chunk.scoring += time.perf_counter() - started
            return self._finish(chunk)
        chunk.scoring += time.perf_counter() - started
        return self._advance(chunk)

    def _probes_possible(self, chunk: _Chunk) -> bool:
        return (self.tail_off is None and self.params.tail_calls > 0 and self.logit_bias_cap > 0
                and chunk.full is not None)

    # ----- the walk with tail probes ---------------------------------------------------------------
    def _advance(self, chunk: _Chunk) -> ChunkTrace | None:
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

    def _tail_at(self, chunk: _Chunk, t: int) -> _Tail | None:
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
        return _Tail(found[0], found[1], log_w, float(cand_log_w[row.draft])) if found else None

    def _probe_request(self, chunk: _Chunk) -> HostedRequest:
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

    def _decide(self, chunk: _Chunk, tail: _Tail, u: float, log_z: float, estimate: tails.TailEstimate | None,
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

    def _candidates_only(self, chunk: _Chunk, t: int, u: float) -> None:
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
    def _record(chunk: _Chunk, accept_prob: float, log_z: float, how: str) -> None:
        chunk.probs.append(accept_prob)
        chunk.log_z.append(log_z)
        chunk.tails.append(how)

    # ----- the end of a chunk ------------------------------------------------------------------
    def _finish(self, chunk: _Chunk) -> ChunkTrace:
        started = time.perf_counter()
        notes, usable = chunk.notes, chunk.usable
        chosen: list[Candidate] = [pos.sampled for pos in usable[: chunk.accepted]]
        if chunk.replacement is not None:
            chosen.append(chunk.replacement)
        if not self.token_prompts:
            chosen, cut = self._cut_to_characters(chosen)
            if cut:
                notes.append(f"{cut} token(s) cut to end the chunk on a whole UTF-8 character (text prompt)")
        examined = chunk.accepted + (1 if chunk.rejected_at is not None else 0)
        before_generated = self.generated
        for cand in chosen:
            if self.done:
                break
            self._append(cand)
        scoring = chunk.scoring + time.perf_counter() - started
        self.usage = self.usage + Usage(draft_tokens=examined, accepted_drafts=chunk.accepted, scoring_seconds=scoring,
                                        generated_tokens=self.generated - before_generated)
        if not chosen and not self.done:
            notes.append("nothing from this chunk could be kept; the next call starts from the same prefix")
            self._stalled += 1
            if self._stalled >= MAX_STALLED_CHUNKS:
                raise HostedResponseError(
                    f"{self._stalled} chunks in a row ended inside a UTF-8 character, which a text prompt cannot "
                    "carry; pass --hosted-tokenizer so the client can send token-id prompts"
                )
        else:
            self._stalled = 0
        if not self.done and chunk.rejected_at is None and chunk.unresolved:
            self._one_step = True
        if (not self.done and chunk.rejected_at is None and chunk.result.finish_reason == "stop"
                and len(usable) == len(chunk.result.positions)):
            # The API stopped after the last draft without reporting that position (OpenAI hides
            # the end token): ask that position again with the end banned from its draw.
            if not self._ended_without_logprobs():
                notes.append("the API ended the text; no logprobs for the end to tune it")
        self._adapt()
        trace = ChunkTrace(
            index=len(self.chunks),
            drawn=tuple(pos.sampled.text for pos in usable),
            accept_probs=tuple(chunk.probs),
            accepted=chunk.accepted,
            rejected_at=chunk.rejected_at,
            replacement=chunk.replacement.text if chunk.replacement is not None else None,
            log_z=tuple(chunk.log_z),
            tail=tuple(chunk.tails),
            alignment=chunk.alignment,
            api_seconds=chunk.api_seconds,
            scoring_seconds=scoring,
            notes=tuple(notes),
            tail_calls=chunk.tail_calls,
        )
        self.chunks.append(trace)
        return trace

    def _cut_to_characters(self, chosen: list[Candidate]) -> tuple[list[Candidate], int]:
        """Text prompts cannot hold half a character: keep the longest run ending on a whole one."""
        for keep in range(len(chosen), -1, -1):
            data = self.continuation + b"".join(c.data for c in chosen[:keep])
            if is_utf8(data):
                return chosen[:keep], len(chosen) - keep
        return [], len(chosen)

    def _adapt(self) -> None:
        if not self.params.chunk:
            self.chunk = adaptive_chunk(self.usage.accepted_drafts, self.usage.draft_tokens)

    def result(self):
        base = super().result()
        return type(base)(text=base.text, finish_reason=base.finish_reason, usage=base.usage, trace=base.trace,
                          settings=base.settings, chunks=tuple(self.chunks))
