"""Greedy proxy tuning over the whole vocabulary from top-k logprobs (pure: no I/O).

At one position the API gives the top-k candidates C with their hosted logprobs; the tuned
score of a token is s(v) = log p_L(v) + log w(v), log w = alpha (log p_E - log p_A), known
locally for every token when the small models share the hosted tokenizer. Greedy decoding
wants argmax_v s(v) over the whole vocabulary, and a token outside C (the *tail*) can win
where the expert strongly prefers a token the hosted model ranks low.

**The bound.** No tail token is more likely than C's least likely member, nor than the tail's
mass T = 1 - p_L(C): log p_L(t) <= log min(p_k, T) =: cap. So s(t) <= cap + log w(t), and with
c* the best candidate, the *suspects* are the tail tokens with cap + log w(t) > s(c*). None:
c* is the exact argmax, and nothing is asked (:func:`suspects`).

**The probe.** Otherwise one call, one token at temperature 0, with ``logit_bias`` b(v) =
log w(v) + L on c* and the suspects (L puts the largest at +100) and -100 on the rest of C
(:func:`greedy_probe`). The host's greedy pick maximises log p_L(v) + b(v) = s(v) + L over the
biased tokens: it *is* the tuned argmax among them, and so the exact argmax over the whole
vocabulary (the other candidates are below c*, the other tail tokens below c* by the bound).
Its logprob comes back with it (:func:`read_probe`): on hosts that report the model's own
logprobs (OpenAI since 2024, vLLM's default raw logprobs, this project's servers) as is; on
hosts that report logprobs after the bias, from its difference with c*'s, where the unknown
normaliser cancels. Example (c* = id 0 with s = -0.5; id 7 outside C with log w = 6 while
min(p_k, T) = 0.05: -3.0 + 6 = 3.0 > -0.5, so 7 is a suspect and is probed)::

    >>> import torch
    >>> log_w = torch.tensor([0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 6.0])
    >>> suspects(torch.tensor([0, 1]), s_best=-0.5, cap=math.log(0.05), log_w=log_w)
    tensor([7])

Exact up to the host applying the biases as sent (they are rounded to 0.01: a near tie within
that may go either way) and the ``logit_bias`` cap: suspects beyond it are left out, best bound
first, and the answer says so. Left out: the cross-tokenizer case (log w of a hosted tail token
would need the byte aligner for each one; there the candidates-only choice stands).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BAN, MAX_BIAS = -100.0, 100.0  # logit_bias's range on OpenAI-style hosts
ROUND = 100  # biases are sent to 1 / ROUND: the same position asks the same request (a cache answers it)
REPORT_TOLERANCE = 0.1  # nats: c*'s logprob in the probe's answer equals the chunk's on hosts that report unbiased


def suspects(cand_ids: torch.Tensor, *, s_best: float, cap: float, log_w: torch.Tensor) -> torch.Tensor:
    """Ids ``[S]`` of the tail tokens (not in ``cand_ids``) whose bound ``cap + log_w`` is above
    the best candidate's score ``s_best``, best bound first. ``log_w`` ``[V]``: every id's log w
    (-inf: a token that cannot be chosen: no evidence, or no text)."""
    bound = log_w.double() + cap
    bound[cand_ids] = -math.inf
    found = torch.nonzero(bound > s_best).flatten()
    return found[torch.argsort(bound[found], descending=True, stable=True)]


def tail_cap(cand_logprobs: torch.Tensor, exhaustive: bool = True) -> float:
    """log of the most a tail token can have: min(p_k, T) (T alone when the host dropped
    entries, so C may not be its whole top-k)."""
    hosted = cand_logprobs.double()
    tail = max(0.0, 1.0 - float(hosted.exp().sum()))
    cap = min(float(hosted.min().exp()), tail) if exhaustive else tail
    return math.log(cap) if cap > 0 else -math.inf


@dataclass(frozen=True)
class GreedyProbe:
    """What a greedy tail probe asks: ``best`` (c*'s id), ``asked`` (the suspects it biases,
    ``[S']``), ``bias`` (id -> logit_bias, c* and the suspects at log w + L, the other
    candidates banned) and ``left_out``: suspects the host's ``logit_bias`` cap left out."""

    best: int
    asked: tuple[int, ...]
    bias: dict[int, float]
    left_out: int = 0

    def logit_bias(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted(self.bias.items()))


def greedy_probe(cand_ids: list[int], best: int, found: torch.Tensor, log_w: torch.Tensor, *,
                 cap: int) -> GreedyProbe:
    """The probe for a position with candidates ``cand_ids``, best candidate id ``best`` and
    suspects ``found`` (best bound first), within ``cap`` logit_bias entries."""
    room = max(0, cap - len(cand_ids))
    asked = found[:room].tolist()
    lifted = [best, *asked]
    values = log_w.double()[lifted]
    top = float(values.max())
    lift = MAX_BIAS - top
    bias = {i: BAN for i in cand_ids if i != best}
    for i, v in zip(lifted, values.tolist()):
        bias[i] = max(BAN, round((v + lift) * ROUND) / ROUND)
    return GreedyProbe(best, tuple(asked), bias, max(0, int(found.numel()) - len(asked)))


@dataclass(frozen=True)
class ProbeAnswer:
    """The host's greedy pick under the probe's biases: its id (c* or a suspect; None when the
    host picked neither, which decides nothing), its hosted logprob (unbiased), and whether the
    host reports logprobs after the bias."""

    winner: int | None
    logprob: float | None
    biased_report: bool


def read_probe(probe: GreedyProbe, best_logprob: float, picked: int | None, picked_logprob: float | None,
               top: dict[int, float]) -> ProbeAnswer:
    """Read a probe's answer: the host picked ``picked`` with reported logprob ``picked_logprob``
    and listed ``top`` (id -> reported logprob). ``best_logprob``: c*'s hosted logprob at this
    position (from the chunk or the per-step call). On a host that reports unbiased logprobs c*
    is listed with that same logprob (C is the unbiased top-k); otherwise the reports are after
    the bias, and the pick's own logprob is c*'s plus the difference of the two reports less the
    difference of their biases (the normaliser cancels)."""
    if picked is None or picked_logprob is None or (picked != probe.best and picked not in probe.asked):
        return ProbeAnswer(None, None, False)
    reported_best = top.get(probe.best)
    biased = reported_best is None or abs(reported_best - best_logprob) > REPORT_TOLERANCE
    if picked == probe.best:
        return ProbeAnswer(picked, best_logprob, biased)
    if not biased:
        return ProbeAnswer(picked, picked_logprob, False)
    if reported_best is None:  # after the bias, without c* to compare with: the pick stands, its logprob unknown
        return ProbeAnswer(picked, None, True)
    logprob = best_logprob + (picked_logprob - reported_best) - (probe.bias[picked] - probe.bias[probe.best])
    return ProbeAnswer(picked, min(0.0, logprob), True)
