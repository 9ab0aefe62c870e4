"""The tail of p_L after a speculative draft: bounds on Z, tail probes, estimates (pure: no I/O).

The derivation is in :mod:`blackbox_proxy.maths.rejection` ("Reaching the tail"). This module
holds its pieces, for one position with known candidates C (the API's top-k, hosted
probabilities p_L) and tail mass T = 1 - sum_C p_L:

- :func:`tail_bound`: the largest Z_tail = sum_{v not in C} p_L(v) w(v) can be, given T and that
  no tail token is above the k-th top probability. Z lies in [Z_C, Z_C + B] for sure.
- :func:`plan_probe`: a *tail probe*: one hosted call of n one-token draws at the position
  (temperature 1, top_p 1) with C banned through ``logit_bias`` (-100) and, when w is known for
  every id (same tokenizer), a tilt log(lambda w(v)) on the tail tokens the expert finds most
  likely (up to the host's ``logit_bias`` cap). Draws among the tilted tokens S come ∝ p_L w
  (the target's own shape) and reveal their exact p_L (the API returns unbiased logprobs);
  draws elsewhere in the tail (R) are plain p_L draws.
- :func:`tail_estimate`: Z_tail and the tail's share of the residual from one probe's draws.
- :func:`probed_distribution`: the distribution one position of the probed walk draws from,
  exactly given the probe's draws, averaged over simulated probes (the fidelity harness).

Example (known answer: three tail tokens with w = (10, 3, 1), T = 0.25, no tail token above
0.1, so at most 0.1*10 + 0.1*3 + 0.05*1)::

    >>> import torch
    >>> tail_bound(torch.tensor([1.0, 10.0, 3.0]), 0.25, 0.1)
    1.35

Left out: the walk that uses these (``decoding/speculative.py``) and the cross-tokenizer case's
bound (w outside C is unknown there, so no bound and no tilt: see :mod:`rejection`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .rejection import residual_distribution, speculative_distribution

BAN = -100.0  # logit_bias that removes a token from the draw (e^-100 of its mass is left)
MAX_BIAS = 100.0  # |logit_bias| OpenAI accepts
DEFAULT_SHARE = 0.8  # the part of a probe's draws aimed at the tilted tokens (if p_L's tail were p_A's)
SETTLED = 1e-3  # B <= SETTLED * Z_C: Z is known to 0.05% without a probe; none is asked
DEFAULT_DRAWS = 16  # draws per probe (this project's server returns at most 16 choices per call)


def tail_bound(w_tail: torch.Tensor, tail_mass: float, p_cap: float) -> float:
    """The most sum_{v in tail} p(v) w(v) can be over distributions p of the tail with total
    ``tail_mass`` and p(v) <= ``p_cap`` (the k-th top probability): fill the highest weights at
    ``p_cap`` (greedy is optimal for this fractional knapsack). ``w_tail``: ``[V - |C|]``."""
    if tail_mass <= 0 or w_tail.numel() == 0:
        return 0.0
    w = torch.sort(w_tail.double(), descending=True).values
    if p_cap <= 0 or p_cap >= tail_mass:
        return tail_mass * float(w[0])
    full = int(tail_mass // p_cap)
    if full >= w.numel():  # the tail cannot hold T under the cap: the reported top-k is not the top
        return tail_mass * float(w[0])
    return p_cap * float(w[:full].sum()) + (tail_mass - full * p_cap) * float(w[full])


@dataclass(frozen=True)
class TailView:
    """What is known of Z at one position without a call: Z_C, the tail mass T and the bound B,
    so Z in [Z_C, Z_C + B]. ``settled``: B <= ``SETTLED`` * Z_C (no probe is worth asking)."""

    z_c: float
    tail_mass: float
    bound: float

    @property
    def settled(self) -> bool:
        return self.bound <= SETTLED * self.z_c

    @property
    def log_z_hi(self) -> float:
        return math.log(self.z_c + self.bound)

    def log_z(self, z_tail: float | None = None) -> float:
        """log Z^: Z_C + ``z_tail`` clipped into the bounds; the midpoint without an estimate."""
        z = self.z_c + self.bound / 2 if z_tail is None else min(max(self.z_c + z_tail, self.z_c), self.z_c + self.bound)
        return math.log(z)


def tail_view(cand_logprobs: torch.Tensor, cand_log_w: torch.Tensor, tail_log_w: torch.Tensor,
              p_cap: float) -> TailView | None:
    """The bounds at a position: the candidates' hosted logprobs and log w ``[C]``, the log w of
    every other id ``[V - C]``, and ``p_cap`` (no tail token is more likely). None when they give
    no positive Z (every weight 0: nothing to tune with)."""
    z_c = float((cand_logprobs.double() + cand_log_w.double()).exp().sum())
    tail = max(0.0, 1.0 - float(cand_logprobs.double().exp().sum()))
    bound = tail_bound(tail_log_w.double().exp(), tail, p_cap)
    if not math.isfinite(z_c + bound) or z_c + bound <= 0:
        return None
    return TailView(z_c, tail, bound)


def log_weights(lp_e: torch.Tensor, lp_a: torch.Tensor, alpha: float, floor: float,
                keep: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
    """log w = alpha (log P_E - log P_A) of every id ``[V]``, both clamped at ``floor`` as the
    candidates' are; ids neither model can say (both at the floor) get w = 0, the candidates'
    no-evidence rule (:func:`~blackbox_proxy.maths.combiner.without_evidence`), except ``keep``
    (the end ids)."""
    e, a = lp_e.double().clamp(min=floor), lp_a.double().clamp(min=floor)
    log_w = alpha * (e - a)
    if alpha == 0:
        return log_w
    silent = (e <= floor + 1e-9) & (a <= floor + 1e-9)
    if keep:
        silent[list(keep)] = False
    return torch.where(silent, torch.full_like(log_w, -math.inf), log_w)


def position_view(hosted_logprobs: torch.Tensor, cand_log_w: torch.Tensor, ids: list[int | None], draft: int,
                  top_k: int, log_w: torch.Tensor, exhaustive: bool = True) -> tuple[list[int], TailView] | None:
    """C and the bounds at one position of a chunk: the candidates' hosted logprobs, log w and
    hosted ids ``[C']`` (sorted best first, the draft at index ``draft``), every id's log w
    ``[V]``. C is the top ``top_k`` (a draft from outside them is a known tail token); no tail
    token is above C's smallest probability other than the draft's (``exhaustive``: the host
    dropped no entry; else only T bounds a tail token). None without hosted ids, or Z = 0."""
    c_index = list(range(min(top_k, len(ids))))
    if any(ids[i] is None or ids[i] >= log_w.numel() for i in c_index):
        return None
    in_c = torch.zeros(log_w.numel(), dtype=torch.bool)
    in_c[[ids[i] for i in c_index]] = True
    hosted = hosted_logprobs.double()[c_index]
    others = [float(hosted_logprobs[i]) for i in c_index if i != draft]
    tail = max(0.0, 1.0 - float(hosted.exp().sum()))
    p_cap = math.exp(min(others)) if others and exhaustive else tail
    view = tail_view(hosted, cand_log_w.double()[c_index], log_w[~in_c], p_cap)
    return (c_index, view) if view is not None else None


@dataclass(frozen=True)
class ProbePlan:
    """What one tail probe asks: ``banned`` ids (C) at -100, ``tilted`` ids ``[S]`` with biases
    ``log_h`` ``[S]`` (the log of the tilt h; 0 elsewhere), and ``draws`` per probe;
    ``tilted_log_pa``, ``tilted_log_w`` ``[S]``: the anti-expert's log-probability and log w of the
    tilted tokens (the no-call guess of w for the tilted mass no draw found)."""

    banned: tuple[int, ...]
    tilted: torch.Tensor
    log_h: torch.Tensor
    draws: int
    tilted_log_pa: torch.Tensor | None = None
    tilted_log_w: torch.Tensor | None = None

    def logit_bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((i, BAN) for i in self.banned) + tuple(
            (int(i), float(b)) for i, b in zip(self.tilted.tolist(), self.log_h.tolist()))

    def log_tilt(self, ids: torch.Tensor) -> torch.Tensor:
        """log h of each id in ``ids`` ``[n]`` (0 for ids outside S)."""
        if self.tilted.numel() == 0:
            return torch.zeros(ids.shape, dtype=torch.float64)
        order = torch.argsort(self.tilted)
        known = self.tilted[order]
        at = torch.searchsorted(known, ids).clamp(max=known.numel() - 1)
        return torch.where(known[at] == ids, self.log_h[order][at], torch.zeros((), dtype=torch.float64))


def plan_probe(banned: list[int], log_w: torch.Tensor | None, lp_e: torch.Tensor | None,
               lp_a: torch.Tensor | None, *, cap: int, draws: int = DEFAULT_DRAWS,
               share: float = DEFAULT_SHARE) -> ProbePlan:
    """The probe for a position whose known candidates have ids ``banned``. With w known for
    every id (``log_w``, ``lp_e``, ``lp_a``: ``[V]``, same tokenizer) the ``cap - len(banned)``
    tail tokens of highest p_E get the tilt lambda*w, with lambda such that, were p_L's tail
    shaped like p_A's, a ``share`` of the draws would land on them; otherwise no tilt."""
    empty = torch.zeros(0, dtype=torch.long)
    room = cap - len(banned)
    if log_w is None or lp_e is None or lp_a is None or room <= 0:
        return ProbePlan(tuple(banned), empty, torch.zeros(0, dtype=torch.float64), draws)
    in_c = torch.zeros(log_w.numel(), dtype=torch.bool)
    in_c[banned] = True
    key = torch.where(in_c, torch.full_like(lp_e.double(), -math.inf), lp_e.double())
    room = min(room, int(torch.isfinite(key).sum()))
    tilted = torch.topk(key, room).indices
    in_s = torch.zeros_like(in_c)
    in_s[tilted] = True
    untilted = ~in_c & ~in_s
    rest = float(lp_a.double()[untilted].exp().sum())
    s_mass = float((lp_a.double()[tilted] + log_w.double()[tilted]).exp().sum())
    log_lambda = math.log(share / (1 - share)) + math.log(rest) - math.log(s_mass) if rest > 0 and s_mass > 0 else 0.0
    # biases rounded to 0.01 and ids sorted: the same position asks the same request even when
    # the small models' scores differ in the last bits (batched forwards), so a response cache
    # answers it; the estimator uses these rounded values, so nothing is lost
    log_h = torch.round((log_lambda + log_w.double()[tilted]).clamp(-MAX_BIAS, MAX_BIAS) * 100) / 100
    keep = torch.isfinite(log_w.double()[tilted])  # a weight of 0 (no evidence) is not asked for
    tilted, log_h = tilted[keep], log_h[keep]
    order = torch.argsort(tilted)
    tilted, log_h, keep = tilted[order], log_h[order], torch.ones(order.numel(), dtype=torch.bool)
    return ProbePlan(tuple(banned), tilted, log_h[keep], draws, lp_a.double()[tilted], log_w.double()[tilted])


@dataclass(frozen=True)
class TailEstimate:
    """What one probe says about the tail: ``z_tail`` (the estimate of Z_tail) and the tail
    entries that carry residual mass: ``ids`` ``[m]`` with ``mass`` ``[m]`` (exact p_L for tilted
    draws, T_R/n_R per plain draw) and ``log_w`` ``[m]``; ``how`` for the trace."""

    z_tail: float
    ids: torch.Tensor
    mass: torch.Tensor
    log_w: torch.Tensor
    how: str


def tail_estimate(plan: ProbePlan, ids: torch.Tensor, hosted_logprobs: torch.Tensor, log_w: torch.Tensor,
                  tail_mass: float) -> TailEstimate | None:
    """Z_tail from one probe's draws (``ids``, their hosted logprobs and log w, ``[n]`` each).

    The tail splits into the tilted tokens found (D, exact p_L), the untilted tail R and the
    tilted tokens not found (U). A draw comes from g ∝ p_L h (h = e^bias: 1 on R), whose
    normaliser N = T / E_g[1/h] is estimated by N^ = T n / sum 1/h_i, so p_L(R) ≈ N^ n_R / n =
    T n_R / sum 1/h_i (capped at T - p_L(D)), and U holds the rest. Then

        Z^_tail = sum_D p_L w + p_L(R)^ mean_{R draws} w + p_L(U)^ w_U

    with w_U the anti-expert-weighted mean w over the tilted tokens not drawn (no call). Each
    plain draw stands for p_L(R)^ / n_R of p_L in the residual (sampling-importance-resampling);
    U has no entry there (its tokens are unknown). Consistent: as n grows D covers S's mass and
    the counts converge. None without draws.
    """
    n = ids.numel()
    if n == 0 or tail_mass <= 0:
        return None
    ids, p = ids.long(), hosted_logprobs.double().exp()
    log_w = log_w.double()
    in_s = torch.isin(ids, plan.tilted)
    s_ids, first = _distinct(ids, in_s)
    z_d = float((p[first] * log_w[first].exp()).sum())
    rest = max(0.0, tail_mass - float(p[first].sum()))
    plain = ~in_s
    n_r = int(plain.sum())
    m_r = min(rest, tail_mass * n_r / float((-plan.log_tilt(ids)).exp().sum()))
    w_u = _unfound_weight(plan, s_ids)
    z_tail = z_d + (m_r * float(log_w[plain].exp().mean()) if n_r else 0.0) + (rest - m_r) * w_u
    how = (f"probe: {n} draws, {len(s_ids)} tilted token(s) found, {n_r} plain draw(s); "
           f"Z_tail≈{z_tail:.4g} (found {z_d:.3g}, untilted p_L≈{m_r:.3g}, unfound p_L≈{rest - m_r:.3g})")
    if not n_r:
        return TailEstimate(z_tail, s_ids, p[first], log_w[first], how)
    r_ids, inverse = torch.unique(ids[plain], return_inverse=True)
    counts = torch.zeros(r_ids.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones(n_r, dtype=torch.float64))
    r_log_w = torch.zeros(r_ids.numel(), dtype=torch.float64).index_copy_(0, inverse, log_w[plain])
    return TailEstimate(z_tail, torch.cat([s_ids, r_ids]), torch.cat([p[first], m_r * counts / n_r]),
                        torch.cat([log_w[first], r_log_w]), how)


def _unfound_weight(plan: ProbePlan, found: torch.Tensor) -> float:
    """The anti-expert-weighted mean w over the tilted tokens not in ``found`` (1 when unknown)."""
    if plan.tilted_log_pa is None or plan.tilted.numel() == 0:
        return 1.0
    left = ~torch.isin(plan.tilted, found)
    if not bool(left.any()):
        return 0.0
    lp, lw = plan.tilted_log_pa[left], plan.tilted_log_w[left]
    value = float(torch.logsumexp(lp + lw, 0) - torch.logsumexp(lp, 0))
    return math.exp(value) if math.isfinite(value) else 1.0


def _distinct(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct ids among ``ids[mask]``, the index of each one's first draw)."""
    seen: dict[int, int] = {}
    for j, (i, m) in enumerate(zip(ids.tolist(), mask.tolist())):
        if m and i not in seen:
            seen[i] = j
    return torch.tensor(list(seen), dtype=torch.long), torch.tensor(list(seen.values()), dtype=torch.long)


def replacement(cand_logprobs: torch.Tensor, cand_log_w: torch.Tensor, estimate: TailEstimate | None,
                log_z: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The residual ∝ p_L (w/Z - 1)+ over the candidates ``[C]`` followed by the estimate's tail
    entries ``[m]``, shape ``[C + m]``; where it has no mass, the target p_L w renormalised over
    them. ``allowed`` (bool ``[C + m]``) masks entries a text prompt cannot end on."""
    lp, lw = cand_logprobs.double(), cand_log_w.double()
    if estimate is not None and estimate.ids.numel():
        lp = torch.cat([lp, estimate.mass.log()])
        lw = torch.cat([lw, estimate.log_w])
    out = residual_distribution(lp, lw, log_z, allowed)
    if out is not None:
        return out
    target = (lp + lw).softmax(0) if bool(torch.isfinite(lp + lw).any()) else torch.ones_like(lp) / lp.numel()
    if allowed is not None:
        target = torch.where(allowed, target, torch.zeros_like(target))
    total = float(target.sum())
    return target / total if total > 0 else allowed.double() / float(allowed.sum())


def probed_distribution(p_l: torch.Tensor, lp_e: torch.Tensor, lp_a: torch.Tensor, alpha: float,
                        candidates: torch.Tensor, *, generator: torch.Generator, cap: int = 300,
                        draws: int = DEFAULT_DRAWS, samples: int = 64) -> tuple[torch.Tensor, float]:
    """What one position of the probed walk draws from, ``[U]``, and its expected probe calls.

    ``p_l``, ``lp_e``, ``lp_a``: ``[U]`` over the whole vocabulary (same tokenizer);
    ``candidates``: ``[k]`` ids of the API's top-k. The draft y ~ p_L is kept when
    u < w(y)/(Z_C + B) without a probe, else after a probe when u < w(y)/Z^ (Z^ clipped into
    [Z_C, Z_C + B]); a rejection draws :func:`replacement`. Given the probe's draws this is
    closed-form; the probe itself is simulated ``samples`` times from the exact tilted p_L and
    averaged (so the result carries Monte Carlo noise of order 1/sqrt(samples) on the probe's
    own randomness). With B <= ``SETTLED`` * Z_C (k = the vocabulary: B = 0) Z^ = Z_C + B/2 and
    no probe is asked. The probability of asking one is P(u >= w(y)/(Z_C + B)). More candidates
    than ``cap`` cannot be banned: the candidates-only rule, as the decoder does.
    """
    if candidates.numel() > cap:
        return speculative_distribution(p_l, lp_e, lp_a, alpha, candidates), 0.0
    p_l, lp_e, lp_a = p_l.double(), lp_e.double(), lp_a.double()
    log_w = alpha * (lp_e - lp_a)
    in_c = torch.zeros(p_l.numel(), dtype=torch.bool)
    in_c[candidates] = True
    view = tail_view(p_l[candidates].log(), log_w[candidates], log_w[~in_c], float(p_l[candidates].min()))

    def given(log_z: float, estimate: TailEstimate | None) -> torch.Tensor:
        out = p_l * torch.clamp((log_w - log_z).exp(), max=1.0)  # min(1, w/Z); w = +inf: 1
        r = replacement(p_l[candidates].log(), log_w[candidates], estimate, log_z)
        ids = candidates if estimate is None else torch.cat([candidates, estimate.ids])
        return out.index_add(0, ids, (1.0 - float(out.sum())) * r)

    if view.settled:
        return given(view.log_z(), None), 0.0
    asked = 1.0 - float((p_l * torch.clamp((log_w - view.log_z_hi).exp(), max=1.0)).sum())
    plan = plan_probe(candidates.tolist(), log_w, lp_e, lp_a, cap=cap, draws=draws)
    g = torch.where(in_c, torch.zeros_like(p_l), p_l * plan.log_tilt(torch.arange(p_l.numel())).exp())
    total = torch.zeros_like(p_l)
    for _ in range(samples):
        ids = torch.multinomial(g / g.sum(), draws, replacement=True, generator=generator)
        estimate = tail_estimate(plan, ids, p_l[ids].log(), log_w[ids], view.tail_mass)
        total += given(view.log_z(estimate.z_tail), estimate)
    return total / samples, asked
