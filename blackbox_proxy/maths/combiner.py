"""Proxy-tuning arithmetic over one position's candidates (pure: no I/O, explicit generator).

Liu et al. 2024, eq. (1), restricted to the candidate set C the hosted API returned
(DESIGN.md §2.1)::

    delta(v) = log P_E(v | s) - log P_A(v | s)
    score(v) = log p_L(v | s) + alpha * delta(v)
    p^(v)    = softmax_C(score / T), then top-p, or argmax when T = 0

The white-box strategy uses the same functions with C = the whole vocabulary.

Example (known answer)::

    >>> import torch
    >>> s = proxy_scores(torch.tensor([-0.1, -2.4]), torch.tensor([-3.0, 0.5]), alpha=1.0)
    >>> [round(x, 2) for x in s.tolist()]
    [-3.1, -1.9]
    >>> tuned_distribution(s, temperature=0.0).tolist()
    [0.0, 1.0]

Left out: scoring the candidates (the decoders, scorers and aligner) and the mass outside C
(the speculative maths, :mod:`blackbox_proxy.maths.rejection`, keeps it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import ConfigurationError


def proxy_scores(hosted_logprobs: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """score = hosted_logprobs + alpha * delta, shapes ``[C]`` (any shape the two share, e.g. the
    white-box ``[rows, V]``). Inputs are not modified.

    An infinite delta (a model gave probability 0) is kept: the candidate's score is +-inf.
    """
    if hosted_logprobs.shape != delta.shape:
        raise ValueError(f"shapes differ: hosted {tuple(hosted_logprobs.shape)} vs delta {tuple(delta.shape)}")
    if alpha == 0:  # 0 * inf would be nan
        return hosted_logprobs.double().clone()
    return hosted_logprobs.double() + alpha * delta.double()


def tuned_distribution(scores: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """p^ over the candidates, shape ``[C]``: softmax(scores / T), nucleus-truncated to ``top_p``.

    ``temperature == 0`` gives a one-hot argmax (ties go to the lowest index, i.e. the
    candidate the hosted model ranks highest).

    Computed in float64 as softmax((scores - max) / T), so no finite alpha or temperature gives
    NaN: a subnormal T tends to the argmax, a huge T to uniform. A NaN score (e.g. -inf + inf)
    counts as -inf; when some scores are +inf the mass is shared equally among them (the limit).

    >>> tuned_distribution(torch.tensor([0.0, -1.0]), temperature=1e-320).tolist()
    [1.0, 0.0]
    >>> tuned_distribution(torch.tensor([math.inf, 3.0, math.inf, -math.inf]), temperature=1.0).tolist()
    [0.5, 0.0, 0.5, 0.0]
    """
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    # the function's own domain (the options' ranges for users are GenerationRequest's)
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ConfigurationError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ConfigurationError(f"top_p must be in (0, 1], got {top_p!r}")
    scores = scores.double()
    scores = torch.where(torch.isnan(scores), torch.full_like(scores, -math.inf), scores)
    if temperature == 0 or not torch.isfinite(scores).any():
        probs = torch.zeros_like(scores)
        probs[int(torch.argmax(scores))] = 1.0
        return probs
    top = scores == math.inf
    if top.any():
        return top.double() / float(top.sum())
    probs = torch.softmax((scores - scores.max()) / temperature, dim=-1)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    return probs


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely entries of ``probs`` (``[C]``) whose mass reaches
    ``top_p``; renormalise. The input is not modified."""
    order = torch.argsort(probs, descending=True, stable=True)
    sorted_probs = probs[order]
    before = torch.cumsum(sorted_probs, 0) - sorted_probs  # mass strictly before each entry
    keep_sorted = before < top_p
    keep_sorted[0] = True
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[keep_sorted]] = True
    out = torch.where(keep, probs, torch.zeros_like(probs))
    return out / out.sum()


def choose(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one index from ``probs`` (shape ``[C]``) with the given generator."""
    if float(probs.max()) >= 1.0:
        return int(torch.argmax(probs))
    return int(torch.multinomial(probs.float(), 1, generator=generator))


def without_evidence(lp_e: Sequence[float], lp_a: Sequence[float], floor: float,
                     exempt: Sequence[bool] = ()) -> list[int]:
    """Indices of the candidates that neither small model can say: both log-probabilities at
    (or below) the aligner's ``floor``, ``[C]`` each. ``exempt[i]`` keeps candidate i out of it
    (the end of text, which the small models express through their own end tokens).

    Why they are taken out of the tuned choice (p~ = 0) rather than given delta = 0: proxy tuning
    moves the hosted distribution by the small models' *evidence*, w(v) = (p_E(v)/p_A(v))^alpha.
    A hosted special token (``<start_of_image>``), a control token or a byte piece with no reading
    in the small vocabulary has p_E = p_A = 0 up to the floor: the ratio is 0/0, not 1. Reading it
    as 1 lets such a token win whenever the renderings push every real candidate down (a raw
    hosted prompt against a chat-rendered expert: measured, ``<start_of_image>`` chosen 16 times
    in a row). Taking it as 0 keeps the tuned text within what the small models can express;
    when every candidate is without evidence, none is taken out (nothing to tune with there).

    >>> without_evidence([-27.6, -3.0, -27.7], [-27.7, -1.0, -27.6], floor=-27.6)
    [0, 2]
    >>> without_evidence([-27.7, -27.7], [-27.7, -27.7], floor=-27.6)  # all: none taken out
    []
    >>> without_evidence([-30.0, -2.0], [-30.0, -2.5], floor=-27.6, exempt=[True, False])
    []
    """
    if len(lp_e) != len(lp_a):
        raise ValueError(f"lengths differ: {len(lp_e)} vs {len(lp_a)}")
    exempt = list(exempt) or [False] * len(lp_e)
    silent = [i for i, (e, a) in enumerate(zip(lp_e, lp_a)) if e <= floor + 1e-9 and a <= floor + 1e-9
              and not exempt[i]]
    return [] if len(silent) == len(lp_e) else silent
