"""Speculative rejection maths with the hosted model as the draft (pure: no I/O, explicit generator).

Speculative sampling (Leviathan et al. 2023, Alg. 1; Chen et al. 2023) with the hosted model as
the draft and the proxy-tuned distribution as the target (DESIGN.md §2.3). At a position with
candidates C (the API's top-k plus the drawn token), hosted probabilities p_L and offsets
delta = log P_E − log P_A:

    w(v)  = exp(alpha * delta(v))                       (tilt of the target over the draft)
    Z     = sum_{v in C} p_L(v) w(v) + (1 - sum_{v in C} p_L(v)) * w_tail
    p~(v) = p_L(v) w(v) / Z                             (the proxy-tuned target)

Terms, used throughout:

- *draft*: the token the API drew at a position (temperature 1, top_p 1, so it follows p_L,
  which is also the draft distribution q);
- *accepted*: a draft y kept with probability min(1, p~(y)/q(y)) = min(1, w(y)/Z);
- *residual draw*: at the first rejection, a token drawn from the residual
  ∝ p_L(v) max(0, w(v)/Z - 1) over the known candidates; the walk ends there. There is no
  *bonus* token after a fully accepted chunk (the API gave no distribution past its last
  position);
- *tail*: the hosted probability outside C, 1 - sum_C p_L. Its size is known, not how it splits,
  so not its offsets. w_tail treats "some token outside C" as one event and proxy-tunes it like
  any other: w_tail = ((1 - P_E(C)) / (1 - P_A(C)))^alpha, exact if the hosted model splits its
  tail like the anti-expert. When either small model leaves less than ``MIN_TAIL_MASS`` outside
  C the ratio is noise (two tiny numbers), so w_tail = 1. With k = the vocabulary, Z is exact.

Greedy variant: drafts are accepted while they are the proxy-tuned argmax over C; the argmax
replaces the first one that is not.

Example (known answer: p_L = (.5, .3, .2), w = (1, 2, .5), so Z = 1.2)::

    >>> import math, torch
    >>> p_l = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    >>> log_w = torch.tensor([0.0, math.log(2), math.log(0.5)], dtype=torch.float64)
    >>> log_z = log_normaliser(p_l.log(), log_w, 0.0)
    >>> round(math.exp(log_z), 6), round(accept_probability(0.0, log_z), 4)
    (1.2, 0.8333)
    >>> residual_distribution(p_l.log(), log_w, log_z).tolist()
    [0.0, 1.0, 0.0]

Left out: the decoder that asks for chunks and appends tokens (``decoding/speculative.py``);
temperatures other than 0 or 1 and top_p < 1 (they need normalisers over the unseen tail of
p_L^(1/T), so the strategy refuses them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# A small model's mass outside C must be at least this for its tail ratio to be trusted.
MIN_TAIL_MASS = 0.01


def tail_log_weight(lp_e: torch.Tensor, lp_a: torch.Tensor, alpha: float) -> tuple[float, str]:
    """(log w_tail, how it was estimated) from the small models' log P of the candidates,
    ``lp_e``, ``lp_a``: ``[C]``."""
    rest_e = 1.0 - float(lp_e.double().exp().sum())
    rest_a = 1.0 - float(lp_a.double().exp().sum())
    if rest_e < MIN_TAIL_MASS or rest_a < MIN_TAIL_MASS:
        return 0.0, "w_tail=1 (small models put >99% on the candidates)"
    value = alpha * (math.log(rest_e) - math.log(rest_a))
    return value, f"w_tail={math.exp(value):.3g} (small models' mass outside the candidates)"


def log_normaliser(hosted_logprobs: torch.Tensor, log_w: torch.Tensor, tail_log_w: float) -> float:
    """log Z = log( sum_C p_L w + (1 - sum_C p_L) w_tail ); ``hosted_logprobs``, ``log_w``: ``[C]``."""
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
    """∝ p_L(v) max(0, w(v)/Z - 1) over the candidates, shape ``[C]`` (``allowed``: bool ``[C]``
    masks some out); None when it has no mass (the draft over-represents every candidate)."""
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
    """One position ready to walk: candidates' hosted logprobs and offsets, and the draft."""

    hosted_logprobs: torch.Tensor  # [C]
    delta: torch.Tensor  # [C]
    lp_e: torch.Tensor  # [C]
    lp_a: torch.Tensor  # [C]
    draft: int  # index of the drawn token in the candidates


@dataclass(frozen=True)
class Walk:
    """The outcome of walking a chunk: drafts accepted, where the first rejection fell and its
    replacement (a candidate index), and per examined position min(1, w/Z), log Z and the tail."""

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
    residual and stop. ``allowed[t]`` (bool ``[C_t]``) optionally restricts the residual draw at
    position t to candidates a text prompt can end on."""
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
    replacement at the first mismatch is the argmax over the ``allowed`` candidates (bool
    ``[C_t]``: those a text prompt can end on), or none when no candidate is allowed there."""
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


def speculative_distribution(p_l: torch.Tensor, lp_e: torch.Tensor, lp_a: torch.Tensor, alpha: float,
                             candidates: torch.Tensor) -> torch.Tensor:
    """The distribution one step of :func:`walk_sampled` draws from, exactly, shape ``[U]``.

    ``p_l``: ``[U]``, the hosted model's probabilities over the universe U (sums to 1); ``lp_e``,
    ``lp_a``: ``[U]``, the small models' log P of every u in U; ``candidates``: ``[k]``, indices
    of the top-k the API reports. A draft v ~ p_L is scored with candidates S_v = C ∪ {v}; it is
    accepted with min(1, w(v)/Z_v), Z_v = Σ_{S_v} p_L w + (1 − Σ_{S_v} p_L) w_tail(S_v); on
    rejection the output comes from the residual ∝ p_L(u) max(0, w(u)/Z_v − 1) over S_v (or,
    when that is empty, from p_L w renormalised over S_v).
    """
    p_l, lp_e, lp_a = p_l.double(), lp_e.double(), lp_a.double()
    size = p_l.numel()
    log_w = alpha * (lp_e - lp_a)
    w = log_w.exp()
    in_c = torch.zeros(size, dtype=torch.bool)
    in_c[candidates] = True
    c_idx = in_c.nonzero().flatten()
    p_e, p_a = lp_e.exp(), lp_a.exp()
    s_lw = float((p_l[c_idx] * w[c_idx]).sum())
    cov, rest_e, rest_a = float(p_l[c_idx].sum()), 1 - float(p_e[c_idx].sum()), 1 - float(p_a[c_idx].sum())

    def z_of(extra_lw: torch.Tensor, extra_l: torch.Tensor, extra_e: torch.Tensor, extra_a: torch.Tensor) -> torch.Tensor:
        """Z over C plus one extra draft per entry (vectorised :func:`log_normaliser`, not in logs)."""
        covered = cov + extra_l
        re, ra = rest_e - extra_e, rest_a - extra_a
        tail_log = torch.where((re < MIN_TAIL_MASS) | (ra < MIN_TAIL_MASS), torch.zeros_like(re),
                               alpha * (re.clamp(min=1e-300).log() - ra.clamp(min=1e-300).log()))
        uncovered = (1 - covered).clamp(min=0)
        tail = torch.where(uncovered > 1e-12, uncovered * tail_log.exp(), torch.zeros_like(uncovered))
        return s_lw + extra_lw + tail

    zero = torch.zeros(1, dtype=torch.float64)
    z_c = float(z_of(zero, zero, zero, zero)[0])
    out = torch.zeros(size, dtype=torch.float64)
    # drafts inside C: Z = Z_C, one shared residual over C
    accept_c = torch.clamp(w[c_idx] / z_c, max=1.0)
    accept_c = torch.where(torch.isinf(w[c_idx]), torch.ones_like(accept_c), accept_c)
    out[c_idx] += p_l[c_idx] * accept_c
    rejected = float((p_l[c_idx] * (1 - accept_c)).sum())
    residual = p_l[c_idx] * torch.clamp(w[c_idx] / z_c - 1, min=0)
    target_c = p_l[c_idx] * w[c_idx]
    if rejected > 0:
        out[c_idx] += rejected * (residual / residual.sum() if float(residual.sum()) > 0 else target_c / target_c.sum())
    # drafts outside C: each its own Z_v; the residual lives on C (a rejected v has w(v) < Z_v)
    o_idx = (~in_c).nonzero().flatten()
    if o_idx.numel():
        z_v = z_of(p_l[o_idx] * w[o_idx], p_l[o_idx], p_e[o_idx], p_a[o_idx])
        accept = torch.clamp(w[o_idx] / z_v, max=1.0)
        out[o_idx] += p_l[o_idx] * accept
        reject = p_l[o_idx] * (1 - accept)  # [n_out]
        excess = p_l[c_idx][None, :] * torch.clamp(w[c_idx][None, :] / z_v[:, None] - 1, min=0)  # [n_out, k]
        total = excess.sum(1)
        has = total > 0
        share = torch.where(has[:, None], excess / total.clamp(min=1e-300)[:, None], torch.zeros_like(excess))
        out[c_idx] += (reject[:, None] * share).sum(0)
        # empty residual: p_L w renormalised over C ∪ {v}
        fallback = ~has & (reject > 0)
        if bool(fallback.any()):
            denom = s_lw + p_l[o_idx][fallback] * w[o_idx][fallback]
            r = reject[fallback]
            out[c_idx] += (r[:, None] * target_c[None, :] / denom[:, None]).sum(0)
            out[o_idx[fallback]] += r * p_l[o_idx][fallback] * w[o_idx][fallback] / denom
    return out
