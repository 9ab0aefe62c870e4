"""Speculative (rejection-style) resampling over API-drawn chunks (DESIGN.md §2.3).

Speculative sampling (Leviathan et al. 2023, Alg. 1; Chen et al. 2023) with the hosted model as
the draft and the proxy-tuned distribution as the target. At a position with candidates C (the
API's top-k plus the drawn token), hosted probabilities p_L and offsets delta:

    w(v) = exp(alpha * delta(v))                       (tilt of the target over the draft)
    Z    = sum_{v in C} p_L(v) w(v) + (1 - sum_{v in C} p_L(v)) * w_tail
    p~(v) = p_L(v) w(v) / Z                            (the proxy-tuned target)

Terms, used throughout:
- *draft*: the token the API drew at a chunk position (temperature 1, top_p 1, so it follows
  p_L, which is also the draft distribution q);
- *accepted*: a draft y kept with probability min(1, p~(y)/q(y)) = min(1, w(y)/Z);
- *residual draw*: at the first rejection, a token drawn from the residual
  ∝ p_L(v) max(0, w(v)/Z - 1) over the known candidates; the chunk ends there and the next API
  call starts from the new prefix. There is no "bonus" token after a fully accepted chunk (the
  API gave no distribution past its last position); the next call continues.

Because the draft is the hosted model's own sample, accepted tokens can lie outside the top-k:
the result approximates *full-distribution* proxy tuning, not its top-k renormalisation.

The tail estimate w_tail: the hosted probability outside C (1 - sum p_L over C) is known, but
not how it splits, so not its offsets. The estimate treats "some token outside C" as one event
and proxy-tunes it like any other: its probability under each small model is 1 - sum_{v in C}
P_M(v), so w_tail = ((1 - P_E(C)) / (1 - P_A(C)))^alpha. This is the exact weight of the tail
if the hosted model splits its tail like the anti-expert does, and 1 when the expert and
anti-expert agree on how likely "none of these" is. When either small model puts more than 99%
of its mass on C the ratio is noise (two tiny numbers), so w_tail = 1 then. With k = the whole
vocabulary the tail is empty and Z is exact. The trace records which estimate each position used.

Greedy variant: the API's greedy chunk is accepted up to the first position whose proxy-tuned
argmax over C differs; that argmax replaces it and the chunk ends (equal to per-step greedy).

Temperature other than 0 or 1, or top_p < 1, would need normalisers over the unseen tail of
p_L^(1/T); they are refused rather than approximated silently (use the per-step strategy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import DecoderBase, _is_utf8
from ..errors import HostedResponseError
from ..types import Candidate, ChunkTrace, HostedRequest, HostedResult, Usage

# A small model's mass outside C must be at least this for its tail ratio to be trusted.
MIN_TAIL_MASS = 0.01
# Adaptive chunk length: bounds, and the prior on the acceptance rate (3 of 4 drafts accepted).
MAX_STALLED_CHUNKS = 8  # chunks in a row that add nothing before giving up
MIN_CHUNK, MAX_CHUNK = 4, 32
PRIOR_ACCEPTED, PRIOR_DRAFTS = 3.0, 4.0


def adaptive_chunk(accepted: int, examined: int) -> int:
    """Twice the expected run of accepted drafts, 2 / (1 - a), for the acceptance rate a seen so
    far (with a prior of 3 in 4), within [4, 32]. With independent acceptances, a chunk of N
    yields (1 - a^N) / (1 - a) tokens per call, which is within a factor (1 - a^N) of the most
    any chunk can give; at N = 2 / (1 - a) that factor is above 0.86 for any a, while the drafts
    drawn past the first rejection (paid for, then discarded) stay bounded."""
    rate = (accepted + PRIOR_ACCEPTED) / (examined + PRIOR_DRAFTS)
    return max(MIN_CHUNK, min(MAX_CHUNK, math.ceil(2.0 / max(1e-6, 1.0 - rate))))


def tail_log_weight(lp_e: torch.Tensor, lp_a: torch.Tensor, alpha: float) -> tuple[float, str]:
    """(log w_tail, how it was estimated) from the small models' logprobs of the candidates."""
    rest_e = 1.0 - float(lp_e.double().exp().sum())
    rest_a = 1.0 - float(lp_a.double().exp().sum())
    if rest_e < MIN_TAIL_MASS or rest_a < MIN_TAIL_MASS:
        return 0.0, "w_tail=1 (small models put >99% on the candidates)"
    value = alpha * (math.log(rest_e) - math.log(rest_a))
    return value, f"w_tail={math.exp(value):.3g} (small models' mass outside the candidates)"


def log_normaliser(hosted_logprobs: torch.Tensor, log_w: torch.Tensor, tail_log_w: float) -> float:
    """log Z = log( sum_C p_L w + (1 - sum_C p_L) w_tail ), shapes ``[C]``."""
    terms = hosted_logprobs.double() + log_w.double()
    covered = float(hosted_logprobs.double().exp().sum())
    if covered < 1.0 - 1e-12:
        tail = torch.tensor([math.log(1.0 - covered) + tail_log_w], dtype=torch.float64)
        terms = torch.cat([terms, tail])
    return float(torch.logsumexp(terms, 0))


def accept_probability(log_w_y: float, log_z: float) -> float:
    """min(1, p~(y)/q(y)) = min(1, w(y)/Z) (Leviathan et al. 2023, Alg. 1).

    Infinite weights (a small model gave probability 0): w(y) = 0 is never accepted; with
    w(y) = +inf the target lives on the +inf-weight tokens, so y is accepted.
    """
    if log_w_y == math.inf:
        return 1.0
    if log_w_y == -math.inf or log_z == math.inf:
        return 0.0
    return min(1.0, math.exp(min(0.0, log_w_y - log_z)))


def residual_distribution(hosted_logprobs: torch.Tensor, log_w: torch.Tensor, log_z: float,
                          allowed: torch.Tensor | None = None) -> torch.Tensor | None:
    """∝ p_L(v) max(0, w(v)/Z - 1) over the candidates (``allowed`` masks some out), shape
    ``[C]``; None when it has no mass (all candidates are over-represented by the draft)."""
    if log_z == math.inf:  # the target lives on the +inf-weight candidates, in p_L's proportions
        excess = (log_w.double() == math.inf).double()
    else:
        excess = torch.clamp((log_w.double() - log_z).exp() - 1.0, min=0.0)
    mass = hosted_logprobs.double().exp() * excess
    if allowed is not None:
        mass = torch.where(allowed, mass, torch.zeros_like(mass))
    total = float(mass.sum())
    return mass / total if total > 0 else None


@dataclass(frozen=True)
class PositionScore:
    """One chunk position ready to walk: candidates' hosted logprobs and offsets, the draft."""

    hosted_logprobs: torch.Tensor  # [C]
    delta: torch.Tensor  # [C]
    lp_e: torch.Tensor  # [C]
    lp_a: torch.Tensor  # [C]
    draft: int  # index of the drawn token in the candidates


@dataclass(frozen=True)
class Walk:
    accepted: int
    rejected_at: int | None
    replacement: int | None  # candidate index at ``rejected_at``
    accept_probs: tuple[float, ...]
    log_z: tuple[float, ...]
    tail: tuple[str, ...]
    notes: tuple[str, ...]


def walk_sampled(positions: Sequence[PositionScore], alpha: float, generator: torch.Generator,
                 allowed: Sequence[torch.Tensor | None] | None = None) -> Walk:
    """Accept drafts in order with probability min(1, w/Z); at the first rejection draw the
    residual and stop. ``allowed[t]`` optionally restricts the residual draw at position t."""
    probs: list[float] = []
    log_zs: list[float] = []
    tails: list[str] = []
    notes: list[str] = []
    for t, pos in enumerate(positions):
        log_w = alpha * pos.delta.double()
        tail_w, how = tail_log_weight(pos.lp_e, pos.lp_a, alpha)
        log_z = log_normaliser(pos.hosted_logprobs, log_w, tail_w)
        a = accept_probability(float(log_w[pos.draft]), log_z)
        probs.append(a)
        log_zs.append(log_z)
        tails.append(how)
        if float(torch.rand((), generator=generator, dtype=torch.float64)) < a:
            continue
        mask = allowed[t] if allowed is not None else None
        if mask is not None and not bool(mask.any()):
            # A text prompt cannot end here (no candidate completes a UTF-8 character): stop at
            # the rejection without a replacement; the caller cuts back to a whole character.
            notes.append(f"position {t}: rejected, and no candidate ends on a whole UTF-8 character (text prompt)")
            return Walk(t, t, None, tuple(probs), tuple(log_zs), tuple(tails), tuple(notes))
        residual = residual_distribution(pos.hosted_logprobs, log_w, log_z, mask)
        if residual is None:
            # Every known candidate already has at least its target mass: the missing mass is in
            # the unseen tail. Fall back to the tuned distribution renormalised over C.
            notes.append(f"position {t}: empty residual over the candidates; drew from the renormalised target")
            target = (pos.hosted_logprobs.double() + log_w).softmax(0)
            if mask is not None:
                target = torch.where(mask, target, torch.zeros_like(target))
            total = float(target.sum())
            residual = target / total if total > 0 and math.isfinite(total) else (
                mask.double() if mask is not None else torch.ones_like(target)) / float(
                mask.sum() if mask is not None else len(target))
        index = int(torch.multinomial(residual.float(), 1, generator=generator))
        return Walk(t, t, index, tuple(probs), tuple(log_zs), tuple(tails), tuple(notes))
    return Walk(len(positions), None, None, tuple(probs), tuple(log_zs), tuple(tails), tuple(notes))


def walk_greedy(positions: Sequence[PositionScore], alpha: float,
                allowed: Sequence[torch.Tensor | None] | None = None) -> Walk:
    """Accept the API's greedy drafts while they are the proxy-tuned argmax over C; the
    replacement at the first mismatch is the argmax over the ``allowed`` candidates (those a
    text prompt can end on), or none when no candidate is allowed there."""
    for t, pos in enumerate(positions):
        scores = pos.hosted_logprobs.double() + alpha * pos.delta.double()
        if int(torch.argmax(scores)) == pos.draft:
            continue
        mask = allowed[t] if allowed is not None else None
        if mask is not None:
            if not bool(mask.any()):
                return Walk(t, t, None, (1.0,) * t + (0.0,), (), (), (
                    f"position {t}: rejected, and no candidate ends on a whole UTF-8 character (text prompt)",))
            scores = torch.where(mask, scores, torch.full_like(scores, -math.inf))
        return Walk(t, t, int(torch.argmax(scores)), (1.0,) * t + (0.0,), (), (), ())
    return Walk(len(positions), None, None, (1.0,) * len(positions), (), (), ())


class SpeculativeDecoder(DecoderBase):
    """Speculative proxy tuning: one API call per chunk of drafts. See the module docstring.

    ``params.temperature`` must be 1 (sampling) or 0 (greedy); ``params.chunk`` fixes the chunk
    length, else it adapts to the acceptance rate (:func:`adaptive_chunk`).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.chunk = self.params.chunk or adaptive_chunk(0, 0)
        self.chunks: list[ChunkTrace] = []
        self.greedy = self.params.temperature == 0
        self._stalled = 0  # chunks in a row that added nothing
        self._one_step = False  # ask the next position alone (a possible end inside a chunk)

    def request(self) -> HostedRequest:
        if self._end_hidden or self._one_step:
            return self._request(max_tokens=1, temperature=0.0)
        n = max(1, min(self.chunk, self.params.max_tokens - self.generated))
        if self.greedy:
            return self._request(max_tokens=n, temperature=0.0)
        seed = int(torch.randint(0, 2**31 - 1, (), generator=self.generator))
        return self._request(max_tokens=n, temperature=1.0, seed=seed)

    def observe(self, results: Sequence[HostedResult], api_seconds: float) -> ChunkTrace | None:
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
                           torch.tensor([c.is_end or _is_utf8(cont + c.data) for c in cands]))
        alpha = self.params.alpha
        if self.greedy:
            walk = walk_greedy(rows, alpha, allowed)
        else:
            walk = walk_sampled(rows, alpha, self.generator, allowed)
        notes += list(walk.notes)
        chosen: list[Candidate] = [pos.sampled for pos in usable[: walk.accepted]]
        replacement = None
        if walk.rejected_at is not None and walk.replacement is not None:
            replacement = usable[walk.rejected_at].candidates[walk.replacement]
            chosen.append(replacement)
        if not self.token_prompts:
            chosen, cut = self._cut_to_characters(chosen)
            if cut:
                notes.append(f"{cut} token(s) cut to end the chunk on a whole UTF-8 character (text prompt)")
        examined = walk.accepted + (1 if walk.rejected_at is not None else 0)
        self.usage = self.usage + Usage(draft_tokens=examined, accepted_drafts=walk.accepted,
                                        scoring_seconds=time.perf_counter() - started)
        before_generated = self.generated
        for cand in chosen:
            if self.done:
                break
            self._append(cand)
        self.usage = self.usage + Usage(generated_tokens=self.generated - before_generated)
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
        if not self.done and walk.rejected_at is None and unresolved:
            self._one_step = True
        if (not self.done and walk.rejected_at is None and result.finish_reason == "stop"
                and len(usable) == len(positions)):
            # The API stopped after the last draft without reporting that position (OpenAI hides
            # the end token): ask that position again with the end banned from its draw.
            if not self._ended_without_logprobs():
                notes.append("the API ended the text; no logprobs for the end to tune it")
        self._adapt(walk, len(usable))
        trace = ChunkTrace(
            index=len(self.chunks),
            drawn=tuple(pos.sampled.text for pos in usable),
            accept_probs=walk.accept_probs,
            accepted=walk.accepted,
            rejected_at=walk.rejected_at,
            replacement=replacement.text if replacement is not None else None,
            log_z=walk.log_z,
            tail=walk.tail,
            alignment=alignment,
            api_seconds=api_seconds,
            scoring_seconds=time.perf_counter() - started,
            notes=tuple(notes),
        )
        self.chunks.append(trace)
        return trace

    def _cut_to_characters(self, chosen: list[Candidate]) -> tuple[list[Candidate], int]:
        """Text prompts cannot hold half a character: keep the longest run ending on a whole one."""
        for keep in range(len(chosen), -1, -1):
            data = self.continuation + b"".join(c.data for c in chosen[:keep])
            if _is_utf8(data):
                return chosen[:keep], len(chosen) - keep
        return [], len(chosen)

    def _adapt(self, walk: Walk, drawn: int) -> None:
        if not self.params.chunk:
            self.chunk = adaptive_chunk(self.usage.accepted_drafts, self.usage.draft_tokens)

    def result(self):
        base = super().result()
        return type(base)(text=base.text, finish_reason=base.finish_reason, usage=base.usage, trace=base.trace,
                          settings=base.settings, chunks=tuple(self.chunks))
