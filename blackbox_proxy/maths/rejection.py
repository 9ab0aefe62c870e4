"""Speculative rejection maths with the hosted model as the draft (pure: no I/O, explicit generator).

Speculative sampling (Leviathan et al. 2023, Alg. 1; Chen et al. 2023) with the hosted model as
the draft and the proxy-tuned distribution as the target (DESIGN.md §2.3). At a position with
candidates C (the API's top-k plus the drawn token), hosted probabilities p_L and offsets
delta = log P_E − log P_A:

    w(v)  = exp(alpha * delta(v))                       (tilt of the target over the draft)
    Z     = sum_v p_L(v) w(v) = Z_C + Z_tail            (Z_C over C, Z_tail over the rest)
    p~(v) = p_L(v) w(v) / Z                             (the proxy-tuned target)

Terms, used throughout:

- *draft*: the token the API drew at a position (temperature 1, top_p 1, so it follows p_L,
  which is also the draft distribution q);
- *accepted*: a draft y kept with probability min(1, p~(y)/q(y)) = min(1, w(y)/Z);
- *residual draw*: at the first rejection, a token drawn from the residual ∝ p_L(v) max(0,
  w(v)/Z - 1); the walk ends there. There is no *bonus* token after a fully accepted chunk (the
  API gave no distribution past its last position);
- *tail*: the hosted probability outside C, T = 1 - sum_C p_L. Its size is known, not how it
  splits;
- *tail probe*: one extra hosted call of n one-token draws at a position with C banned through
  ``logit_bias`` (:mod:`blackbox_proxy.maths.tail`).

Today's rule (:func:`walk_sampled`, kept for hosts without ``logit_bias`` and as the fallback):
the residual is drawn over C only, and Z_tail = T * w_tail with w_tail = ((1 - P_E(C)) /
(1 - P_A(C)))^alpha, i.e. "some token outside C" proxy-tuned as one event (exact if the hosted
model splits its tail like the anti-expert; w_tail = 1 when either small model leaves less than
``MIN_TAIL_MASS`` outside C). With k = the vocabulary both are exact.

Reaching the tail (issue 16)
----------------------------
1. *Any* normaliser guess Z^, residual over the whole vocabulary. Accept y ~ p_L with
   min(1, w/Z^), else draw r ∝ p_L (w - Z^)+. The output is
   P(v) = p_L min(1, w/Z^) + rho * r(v), rho = sum p_L (1 - w/Z^)+; since
   sum p_L (w/Z^ - 1)+ - rho = Z/Z^ - 1, Z^ = Z gives P = p~ exactly. For Z^ != Z the tokens
   with w <= Z^ get p~ Z/Z^: a first-order error, TV ≈ |1 - Z/Z^| p~(w <= Z^). So Z is needed as
   much as the tail's residual; today's rule loses sum_{v not in C} p_L (w/Z - 1)+ outright and
   errs on Z by a few per cent (same-tokenizer preset, k = 20: mean |Z^/Z - 1| = 1.8%).
2. Exact at bounded cost is out of reach. Given Z, "draw v ~ p_L (C locally, the tail by a
   banned draw), accept with (w - Z)+/(W - Z)" draws r exactly with W >= max w, at
   T (W - Z) / sum p_L (w - Z)+ banned draws per residual. Z itself has no exact coin cheaper
   than the two-coin Bernoulli factory (Gonçalves, Łatuszyński & Roberts 2017) on
   E[w(V)/W_tail], V ~ p_L restricted to the tail: T W_tail / Z banned draws per decision. On
   the same-tokenizer preset (SmolLM2 + arithmetic LoRA, k = 20) W_tail reaches 1.1e4 and
   T W_tail / Z reaches 240 (mean 6.2), at exactly the positions that hold the TV: an expert
   token at hosted rank 150-200 with w ≈ 2000 carrying a third of p~. A plain banned draw finds
   it with probability ~0.0015, so plain Monte Carlo Z misses it too. A positive ``logit_bias``
   finds it at once, but a tilted draw's normaliser sum p_L e^b is unknown: ratio estimates,
   not exact coins. Hence: exact where bounds pin Z, consistent (exact as draws -> inf) elsewhere.
3. Exact for free, same tokenizer (w known for every id): every tail token has p_L <= p_k, the
   k-th top probability, so Z_tail <= B = max{sum p w : sum p = T, 0 <= p <= p_k} (greedy over
   the highest tail weights, :func:`~blackbox_proxy.maths.tail.tail_bound`), Z in [Z_C, Z_C + B].
   *Settled* position, B <= 1e-3 Z_C: Z^ = Z_C + B/2 (within 5e-4 of Z), residual over C (the
   tail's residual mass is at most Z_tail/Z <= 1e-3), no call; k = the vocabulary: B = 0, exact.
   *Lazy probe*: draw u first; if u < w(y)/(Z_C + B) every admissible Z^ accepts, so accept
   without a call; otherwise ask the probe and accept iff u < w(y)/Z^ (Z^ clipped into
   [Z_C, Z_C + B]). This is the distribution of "probe first, then decide", paid only with
   probability sum p_L (1 - w/(Z_C + B))+ per position (every rejection is among them).
4. The probe (n draws, one call): C banned; the cap - |C| tail tokens of highest p_E get bias
   log(lambda w) (S; lambda puts a share 0.8 of the draws on S were p_L's tail shaped like p_A's;
   p_A w = p_E at alpha = 1). A draw in S follows p_L w within S, the target's own shape, and
   reveals its exact p_L (APIs return unbiased logprobs); a draw in R = tail - S is a plain p_L
   draw. The probe's normaliser N = sum p_L h is unknown, but N^ = T n / sum_i 1/h_i estimates it,
   so p_L(R)^ = T n_R / sum_i 1/h_i; with D the distinct S tokens drawn (exact p_L) and U the
   S tokens not drawn, Z^_tail = sum_D p_L w + p_L(R)^ mean_{R draws} w + (T - p_L(D) -
   p_L(R)^) w_U, w_U the anti-expert-weighted mean w over U (no call). The replacement is drawn
   ∝ p_L (w/Z^ - 1)+ over C, D (exact p_L) and the R draws (p_L(R)^/n_R each:
   sampling-importance-resampling); U's tokens are unknown, so they get no residual mass.
5. What is exact and what is not. Exact: k = the vocabulary (and any B = 0 position); the lazy
   probe adds no error. Within 1e-3: settled positions. Consistent, not exact: a probed
   position with finite n (Z^ errs by the count-based split and w_U, and is noisy by the R
   mean; the residual misses the S tokens never drawn). Measured on the same-tokenizer preset
   with n = 16 (one call): docs/fidelity. Cross-tokenizer: w outside C is known only for tokens that are
   drawn and then aligned, so there is no bound, no tilt and no lazy acceptance; it keeps
   today's rule. So do hosts without ``logit_bias`` (the client's ``logit_bias_cap`` is 0),
   ``tail_calls = 0``, a probe answered with a banned token or with logprobs that are not the
   model's own (checked on its top-1), and text prompts whose prefix ends inside a character.

Greedy variant: drafts are accepted while they are the proxy-tuned argmax over C (over the
candidates a text prompt can end on, with text prompts: per-step greedy's set); the argmax
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

Left out: the decoder that asks for chunks and probes (``decoding/speculative.py``);
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


@dataclass(frozen=True)
class Step:
    """One position of today's rule: whether the draft was ``accepted``, else the ``replacement``
    (a candidate index, or None when a text prompt cannot end at any candidate), with min(1, w/Z),
    log Z, how the tail was weighted and a note."""

    accepted: bool
    replacement: int | None
    accept_prob: float
    log_z: float
    tail: str
    note: str | None = None


def step_sampled(pos: PositionScore, alpha: float, u: float, generator: torch.Generator,
                 mask: torch.Tensor | None = None) -> Step:
    """Today's rule at one position, given the uniform ``u`` that decides acceptance: accept when
    u < min(1, w/Z); else draw the residual over the candidates (``mask``: bool ``[C]``)."""
    log_w = alpha * pos.delta.double()
    tail_w, how = tail_log_weight(pos.lp_e, pos.lp_a, alpha)
    log_z = log_normaliser(pos.hosted_logprobs, log_w, tail_w)
    a = accept_probability(float(log_w[pos.draft]), log_z)
    if u < a:
        return Step(True, None, a, log_z, how)
    if mask is not None and not bool(mask.any()):
        # A text prompt cannot end here (no candidate completes a UTF-8 character): stop at the
        # rejection without a replacement; the caller cuts back to a whole character.
        return Step(False, None, a, log_z, how, "rejected, and no candidate ends on a whole UTF-8 character (text prompt)")
    note = None
    residual = residual_distribution(pos.hosted_logprobs, log_w, log_z, mask)
    if residual is None:
        # Every known candidate already has at least its target mass: the missing mass is in the
        # unseen tail. Fall back to the tuned distribution renormalised over C.
        note = "empty residual over the candidates; drew from the renormalised target"
        target = (pos.hosted_logprobs.double() + log_w).softmax(0)
        if mask is not None:
            target = torch.where(mask, target, torch.zeros_like(target))
        total = float(target.sum())
        residual = target / total if total > 0 and math.isfinite(total) else (
            mask.double() if mask is not None else torch.ones_like(target)) / float(
            mask.sum() if mask is not None else len(target))
    index = int(torch.multinomial(residual.float(), 1, generator=generator))
    return Step(False, index, a, log_z, how, note)


def walk_sampled(positions: Sequence[PositionScore], alpha: float, generator: torch.Generator,
                 allowed: Sequence[torch.Tensor | None] | None = None) -> Walk:
    """Today's rule over a chunk: accept drafts in order with probability min(1, w/Z); at the
    first rejection draw the residual over C and stop. ``allowed[t]`` (bool ``[C_t]``) optionally
    restricts the residual draw at position t to candidates a text prompt can end on."""
    probs: list[float] = []
    log_zs: list[float] = []
    tails: list[str] = []
    for t, pos in enumerate(positions):
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        step = step_sampled(pos, alpha, u, generator, allowed[t] if allowed is not None else None)
        probs.append(step.accept_prob)
        log_zs.append(step.log_z)
        tails.append(step.tail)
        if not step.accepted:
            notes = (f"position {t}: {step.note}",) if step.note else ()
            return Walk(t, t, step.replacement, tuple(probs), tuple(log_zs), tuple(tails), notes)
    return Walk(len(positions), None, None, tuple(probs), tuple(log_zs), tuple(tails), ())


def walk_greedy(positions: Sequence[PositionScore], alpha: float,
                allowed: Sequence[torch.Tensor | None] | None = None) -> Walk:
    """Accept the API's greedy drafts while they are the proxy-tuned argmax over C, taken over
    the ``allowed`` candidates when given (bool ``[C_t]``: those a text prompt can end on, the
    set per-step greedy chooses among); the replacement at the first mismatch is that argmax,
    or none when no candidate is allowed there."""
    for t, pos in enumerate(positions):
        scores = pos.hosted_logprobs.double() + alpha * pos.delta.double()
        mask = allowed[t] if allowed is not None else None
        if mask is not None:
            if not bool(mask.any()):
                return Walk(t, t, None, (1.0,) * t + (0.0,), (), (), (
                    f"position {t}: rejected, and no candidate ends on a whole UTF-8 character (text prompt)",))
            scores = torch.where(mask, scores, torch.full_like(scores, -math.inf))
        best = int(torch.argmax(scores))
        if best == pos.draft:
            continue
        return Walk(t, t, best, (1.0,) * t + (0.0,), (), (), ())
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
