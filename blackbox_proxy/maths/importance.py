"""Sequence-level importance weights for resampling whole answers (pure: no I/O, explicit generator).

Sampling-importance-resampling (SIR; Rubin 1987) of answers drawn from the hosted model p_L
towards token-level proxy tuning (DESIGN.md §2.3). The target is

    p~(y) = Π_t p_L(y_t | y<t) w_t(y_t) / Z_t,    w = (p_E / p_A)^alpha,

so answer i, drawn from p_L, has importance weight

    log W_i = Σ_t [ alpha · delta_t(y_t) − log Z_t ],

Z_t estimated over the position's candidates with the tail weight of
:mod:`blackbox_proxy.maths.rejection` (exact when k covers the vocabulary). SIR picks i with
probability W_i / Σ W; as n grows the pick's distribution approaches p~. The effective sample
size ESS = (Σ W)² / Σ W² says how many answers really count (1 to n).

Example (known answer: weights 1 and 3 give ESS = 16 / 10)::

    >>> import math, torch
    >>> round(effective_sample_size(torch.tensor([0.0, math.log(3.0)])), 6)
    1.6
    >>> [round(x, 2) for x in normalised_weights(torch.tensor([0.0, math.log(3.0)])).tolist()]
    [0.25, 0.75]

Left out: asking for the answers, scoring them and the warning on a low ESS
(``decoding/resample.py``); exact rejection sampling (it needs a bound on W that top-k
logprobs cannot give).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .rejection import log_normaliser, tail_log_weight


def sequence_log_weight(hosted_logprobs: Sequence[torch.Tensor], lp_e: Sequence[torch.Tensor],
                        lp_a: Sequence[torch.Tensor], chosen: Sequence[int], alpha: float,
                        *, with_normaliser: bool = True) -> float:
    """log W = Σ_t [alpha · delta_t(y_t) − log Z_t] for one answer. Per position t: the candidates'
    hosted logprobs ``[C_t]``, the small models' logprobs ``[C_t]``, and the index of the
    answer's token among them. ``with_normaliser=False`` drops log Z (a deliberately wrong
    weight, for tests)."""
    total = 0.0
    for h, e, a, y in zip(hosted_logprobs, lp_e, lp_a, chosen):
        log_w = alpha * (e.double() - a.double())
        total += float(log_w[y])
        if with_normaliser:
            tail, _ = tail_log_weight(e, a, alpha)
            total -= log_normaliser(h, log_w, tail)
    return total


def effective_sample_size(log_weights: torch.Tensor) -> float:
    """(Σ W)² / Σ W², computed stably from log weights ``[n]``; in [1, n]."""
    lw = log_weights.double()
    return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)))


def normalised_weights(log_weights: torch.Tensor) -> torch.Tensor:
    """W_i / Σ W from log weights ``[n]`` (n >= 1); uniform when no weight is finite."""
    if torch.isfinite(log_weights).any():
        return torch.softmax(log_weights, 0)
    return torch.full_like(log_weights, 1 / len(log_weights))


def sir_pick(weights: torch.Tensor, generator: torch.Generator) -> int:
    """The index SIR picks: one draw from the normalised ``weights`` ``[n]``."""
    return int(torch.multinomial(weights.float(), 1, generator=generator))
