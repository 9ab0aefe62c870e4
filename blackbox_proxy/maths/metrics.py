"""Distances between next-token distributions, as the fidelity report uses them (pure).

For distributions p, q over the same outcomes (probability vectors ``[V]``):

    TV(p, q)  = ½ Σ |p − q|
    KL(q ‖ p) = Σ q log(q / p),  with 0 log 0 = 0
    floor(p, S) = p(outside S) = min over q supported on S of TV(p, q)

The floor is the least total variation any method that only puts mass on the candidates S
(e.g. the hosted top-k) can reach against p.

Example (known answers)::

    >>> import torch
    >>> q, p = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.25, 0.25, 0.5])
    >>> total_variation(q, p), kl_divergence(q, p), mass_outside(p, torch.tensor([0, 1]))
    (0.5, 0.6931471805599453, 0.5)

Left out: the pipeline that produces the distributions and the report
(``harness/fidelity.py``); averaging over positions.
"""

from __future__ import annotations

import math

import torch


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """½ Σ |p − q| (probabilities, ``[V]``)."""
    return 0.5 * float((p.double() - q.double()).abs().sum())


def kl_divergence(q: torch.Tensor, p: torch.Tensor) -> float:
    """KL(q ‖ p) = Σ q log(q / p), with 0 log 0 = 0, ``[V]``; inf when q's support is not
    inside p's."""
    q, p = q.double(), p.double()
    mask = q > 0
    if bool((p[mask] <= 0).any()):
        return math.inf
    return float((q[mask] * (q[mask].log() - p[mask].log())).sum())


def mass_outside(p: torch.Tensor, support: torch.Tensor) -> float:
    """p's mass outside the indices ``support`` (``[k]``), clamped at 0 against rounding."""
    return max(0.0, 1.0 - float(p[support].sum()))
