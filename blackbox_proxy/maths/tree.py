"""Multi-draft verification: several drafts from one call, walked as a token tree (pure maths).

One API call with ``n`` choices draws n continuations of the same prefix, i.i.d. from the hosted
p_L (temperature 1, top_p 1): the prompt is billed once. Drafts that share a prefix share the
nodes of a token tree. At a node, the drafts passing through it are *children*: their tokens
there are i.i.d. draws from p_L(· | node) (the walk chose the node from the tokens above it,
never from these), so the node is verified by multi-round speculative sampling (SpecInfer, Miao
et al. 2024, Alg. "multi-step speculative sampling"; SpecTr, Sun et al. 2023), which is exact
for draws with replacement:

    r_1 = p~                                         (the proxy-tuned target at the node)
    for child y_j, j = 1..m:  accept y_j with min(1, r_j(y_j) / q(y_j)),   q = p_L
                              else r_{j+1} = (r_j - q)+ / sum (r_j - q)+
    all rejected:             draw the output from r_{m+1}

Each round is Leviathan et al.'s rejection step with the residual of the previous round as its
target, so the output follows p~ exactly (induction on m). With m = 1 it is the single-draft
rule of :mod:`blackbox_proxy.maths.rejection`. An accepted child moves the walk to its node,
whose children are the next tokens of the drafts that drew it. Recursive rejection sampling
(Jeon et al. 2024) needs drafts drawn *without* replacement; an API's n choices are drawn with
replacement, so it does not apply here.

The unseen tail is handled as in :func:`~blackbox_proxy.maths.rejection.step_sampled` (the
candidates-only rule): the residuals live on C plus one *tail* entry of hosted mass T = 1 -
sum_C p_L and weight w_tail; a draft is always in C (the API reports its logprob), and the final
draw is over C (the tail entry's share is dropped, renormalised). With C = the vocabulary, T = 0
and the walk is exact.

Greedy variant (:func:`node_greedy`): a child is kept when it is the proxy-tuned argmax over
the API's top-k (what per-step greedy chooses among); when none is, that argmax is the output
and the walk ends. So the longest draft path that is the tuned argmax is kept, and the tokens
equal per-step greedy's.

Example (known answer: p_L = (.5, .3, .2), w = (1, 2, .5), Z = 1.2, so p~ = (5/12, 1/2, 1/12);
a first draft of token 0 is accepted with 5/6; after it is rejected the residual is
(p~ - q)+ = (0, .2, 0) normalised, so a second draft of token 1 is accepted surely)::

    >>> import math, torch
    >>> lp = torch.tensor([.5, .3, .2], dtype=torch.float64).log()
    >>> node = NodeScore(lp, torch.tensor([0.0, math.log(2), math.log(.5)], dtype=torch.float64),
    ...                  lp, lp, children=(0, 1))
    >>> [round(x, 4) for x in target(node, 1.0)[0].tolist()]
    [0.4167, 0.5, 0.0833, 0.0]
    >>> step = node_sampled(node, 1.0, [0.9, 0.5], torch.Generator().manual_seed(0))
    >>> step.accepted, [round(p, 4) for p in step.accept_probs]
    (1, [0.8333, 1.0])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .rejection import tail_log_weight


@dataclass(frozen=True)
class NodeScore:
    """One tree node: the candidates' hosted logprobs and the small models' log P over C (so
    ``delta = lp_e - lp_a``), and each child draft's candidate index, in draft order (repeats
    allowed: two drafts may have drawn the same token)."""

    hosted_logprobs: torch.Tensor  # [C]
    delta: torch.Tensor  # [C]
    lp_e: torch.Tensor  # [C]
    lp_a: torch.Tensor  # [C]
    children: tuple[int, ...]


@dataclass(frozen=True)
class NodeStep:
    """The outcome at a node: the position in ``children`` of the accepted draft (None: all were
    rejected), else the ``replacement`` candidate drawn from the last residual (None when a text
    prompt cannot end at any candidate); min(1, r_j/q) of each round, log Z, the tail's weighting."""

    accepted: int | None
    replacement: int | None
    accept_probs: tuple[float, ...]
    log_z: float
    tail: str
    note: str | None = None


def target(node: NodeScore, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """(r_1, q, log Z, how the tail was weighted): the proxy-tuned target and the draft
    distribution over C plus the tail entry, both ``[C + 1]`` (float64).

    A candidate with w = +inf (the anti-expert gave it probability 0, the expert did not) takes
    all of the target, in p_L's proportions among such candidates (as
    :func:`~blackbox_proxy.maths.rejection.accept_probability` does for one draft)."""
    hosted = node.hosted_logprobs.double()
    log_w = alpha * node.delta.double()
    tail_w, how = tail_log_weight(node.lp_e, node.lp_a, alpha)
    p = hosted.exp()
    rest = max(0.0, 1.0 - float(p.sum()))
    q = torch.cat([p, torch.tensor([rest], dtype=torch.float64)])
    infinite = log_w == math.inf
    if bool(infinite.any()):
        r = torch.where(infinite, p, torch.zeros_like(p))
        r = torch.cat([r / r.sum(), torch.zeros(1, dtype=torch.float64)])
        return r, q, math.inf, how
    tail_term = math.log(rest) + tail_w if rest > 1e-12 else -math.inf
    terms = torch.cat([hosted + log_w, torch.tensor([tail_term], dtype=torch.float64)])
    log_z = float(torch.logsumexp(terms, 0))
    return (terms - log_z).exp(), q, log_z, how


def node_sampled(node: NodeScore, alpha: float, uniforms: Sequence[float], generator: torch.Generator,
                 mask: torch.Tensor | None = None) -> NodeStep:
    """Multi-round verification of a node's children (see the module docstring). ``uniforms``:
    one U(0, 1) per child, in order (drawn by the caller, so the decision is reproducible);
    ``mask`` (bool ``[C]``) restricts the final draw to candidates a text prompt can end on."""
    r, q, log_z, how = target(node, alpha)
    probs: list[float] = []
    for j, (child, u) in enumerate(zip(node.children, uniforms)):
        qy = float(q[child])
        a = 1.0 if qy <= 0.0 else min(1.0, float(r[child]) / qy)
        probs.append(a)
        if u < a:
            return NodeStep(j, None, tuple(probs), log_z, how)
        excess = torch.clamp(r - q, min=0.0)
        total = float(excess.sum())
        if total <= 0.0:  # r == q: every draft is accepted surely; only rounding gets here
            return NodeStep(j, None, tuple(probs), log_z, how, "empty residual between rounds (rounding); kept the draft")
        r = excess / total
    final = r[:-1]
    if mask is not None:
        if not bool(mask.any()):
            return NodeStep(None, None, tuple(probs), log_z, how,
                            "rejected, and no candidate ends on a whole UTF-8 character (text prompt)")
        final = torch.where(mask, final, torch.zeros_like(final))
    note = None
    if float(final.sum()) <= 0.0:
        # the residual lives on the unseen tail only: fall back to the target over C
        note = "empty residual over the candidates; drew from the renormalised target"
        final = target(node, alpha)[0][:-1]
        if mask is not None:
            final = torch.where(mask, final, torch.zeros_like(final))
        if float(final.sum()) <= 0.0:
            final = mask.double() if mask is not None else torch.ones_like(final)
    index = int(torch.multinomial((final / final.sum()).float(), 1, generator=generator))
    return NodeStep(None, index, tuple(probs), log_z, how, note)


def node_greedy(node: NodeScore, alpha: float, top: torch.Tensor, mask: torch.Tensor | None = None) -> NodeStep:
    """Keep the first child that is the proxy-tuned argmax over the candidates in ``top`` (bool
    ``[C]``: the API's top-k) and in ``mask`` when given (bool ``[C]``: those a text prompt can
    end on), i.e. over what per-step greedy chooses among; else output that argmax."""
    scores = node.hosted_logprobs.double() + alpha * node.delta.double()
    allowed = top if mask is None else top & mask
    if not bool(allowed.any()):
        return NodeStep(None, None, (0.0,) * len(node.children), math.nan, "",
                        "rejected, and no candidate ends on a whole UTF-8 character (text prompt)")
    best = int(torch.argmax(torch.where(allowed, scores, torch.full_like(scores, -math.inf))))
    for j, child in enumerate(node.children):
        if child == best:
            return NodeStep(j, None, (0.0,) * j + (1.0,), math.nan, "")
    return NodeStep(None, best, (0.0,) * len(node.children), math.nan, "")


def node_distribution(node_q: torch.Tensor, r1: torch.Tensor, m: int) -> torch.Tensor:
    """The exact output distribution of :func:`node_sampled` with ``m`` children drawn i.i.d.
    from ``node_q`` (``[U]``, over a universe without a tail) and target ``r1``: the oracle of
    the tests. Computed by the recursion P_m = sum_y q(y) [a_1(y) δ_y + (1 - a_1(y)) P'_{m-1}]
    where P' is the same walk on the residual r_2 (independent of y), and P_0 = r."""
    q, r = node_q.double(), r1.double()
    if m == 0:
        return r / r.sum()
    accept = torch.where(q > 0, torch.clamp(r / q.clamp(min=1e-300), max=1.0), torch.ones_like(q))
    rejected = float((q * (1 - accept)).sum())
    excess = torch.clamp(r - q, min=0.0)
    rest = node_distribution(q, excess / excess.sum(), m - 1) if float(excess.sum()) > 0 else torch.zeros_like(q)
    return q * accept + rejected * rest
