"""The small models' side of proxy tuning: log P_E and log P_A of hosted candidates (DESIGN.md §2.1-2.2).

:class:`Scoring` is one generation's scoring: the expert and anti-expert sessions (opened on the
prompt as each model renders it), the byte aligner, and the tuning strength. Its one question is
:meth:`Scoring.score`: for several positions at once (each a :class:`~.prefix.Prefix` and the
hosted candidates there), every candidate's log-probability under both small models, in one
batched forward per model:

- *same tokenizer* (the hosted tokenizer is the small one and every id is known): read by token
  id from the models' next-token distributions, which are kept whole (:attr:`Offsets.full`; the
  speculative tail probes read the unseen tail there). Exact.
- otherwise through the byte aligner (:class:`~blackbox_proxy.tokens.aligner.Aligner`).

A candidate neither small model can say (both at the probability floor) gets expert log P = -inf,
tuned probability 0 (:func:`~blackbox_proxy.maths.combiner.without_evidence`), unless alpha is 0.
Decoders, teacher forcing and the fidelity harness all score through this object.

Left out: what the scores are used for (the strategies), and which candidates a text prompt can
carry (:meth:`~.prefix.HostedPrompt.allowed`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._constants import PROB_FLOOR
from ..maths import combiner
from ..tokens.aligner import Aligner
from ..tokens.vocab import Vocabulary
from ..types import Candidate
from .prefix import Prefix

SAME_TOKENIZER = "token ids (same tokenizer)"


@dataclass(frozen=True)
class Offsets:
    """One position's scores: ``expert`` and ``anti_expert``, log P of each candidate (``[C]``
    lists; -inf for a candidate without evidence), ``alignment``, how they were read, and
    ``full``: on one tokenizer, both models' whole next-token log distributions (``[V]`` each),
    else None."""

    expert: list[float]
    anti_expert: list[float]
    alignment: str
    full: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def delta(self) -> list[float]:
        return [e - a for e, a in zip(self.expert, self.anti_expert)]


def _by_id(dist: torch.Tensor, candidates: Sequence[Candidate], vocab: Vocabulary) -> list[float]:
    """log P_M(v) by token id (same-tokenizer fast path); end tokens without an id use M's ends.
    Clamped at log(PROB_FLOOR) like the aligner, so a delta is never inf - inf."""
    floor = math.log(PROB_FLOOR)
    size = dist.shape[0]
    known = [c.token_id is not None and c.token_id < size for c in candidates]
    values = dist[[c.token_id if k else 0 for c, k in zip(candidates, known)]].double().tolist()
    if not all(known):
        ends = sorted(i for i in vocab.end_ids if i < size)
        end_value = float(torch.logsumexp(dist[ends], 0)) if ends else -math.inf
        values = [v if k else end_value for v, k in zip(values, known)]
    return [max(floor, v) for v in values]


class Scoring:
    """log P_E and log P_A of hosted candidates for one generation. See the module docstring.

    Args:
        expert, anti_expert: open scorer sessions (``distributions_groups``, ``close``).
        aligner: the byte aligner over the small vocabulary (and the hosted one, when known).
        same_vocab: the hosted tokenizer is the small one (read candidates by id).
        alpha: the tuning strength (at 0 no candidate is excluded for want of evidence).
    """

    def __init__(self, expert: Any, anti_expert: Any, aligner: Aligner, *, same_vocab: bool = False,
                 alpha: float = 1.0) -> None:
        self.expert = expert
        self.anti_expert = anti_expert
        self.aligner = aligner
        self.same_vocab = same_vocab
        self.alpha = alpha

    @property
    def vocab(self) -> Vocabulary:
        """The small models' vocabulary."""
        return self.aligner.small

    @property
    def alignment(self) -> str:
        """How candidates are read: by id (one tokenizer) or the aligner's description."""
        return SAME_TOKENIZER if self.same_vocab else self.aligner.description

    def by_ids(self, items: Sequence[tuple[Prefix, Sequence[Candidate]]]) -> bool:
        """Whether ``items`` are read by token id: one tokenizer and every id known."""
        return self.same_vocab and all(
            prefix.ids is not None and all(c.token_id is not None or c.is_end for c in cands)
            for prefix, cands in items)

    def score(self, items: Sequence[tuple[Prefix, Sequence[Candidate]]]) -> list[Offsets]:
        """The :class:`Offsets` of each (prefix, candidates) position, in one batched forward per
        model."""
        if self.by_ids(items):
            groups = [(list(prefix.ids), ()) for prefix, _ in items]
            dists_e = self.expert.distributions_groups(groups)
            dists_a = self.anti_expert.distributions_groups(groups)
            vocab = self.vocab
            out = [Offsets(_by_id(de[()], cands, vocab), _by_id(da[()], cands, vocab), SAME_TOKENIZER,
                           (de[()], da[()]))
                   for de, da, (_, cands) in zip(dists_e, dists_a, items)]
        else:
            plans = [self.aligner.plan(prefix.data, cands) for prefix, cands in items]
            groups = [(plan.kept_ids, plan.paths) for plan in plans]
            dists_e = self.expert.distributions_groups(groups)
            dists_a = self.anti_expert.distributions_groups(groups)
            description = self.aligner.description
            out = [Offsets(self.aligner.evaluate(plan, de), self.aligner.evaluate(plan, da), description)
                   for plan, de, da in zip(plans, dists_e, dists_a)]
        return [self._without_evidence(offsets, cands) for offsets, (_, cands) in zip(out, items)]

    def _without_evidence(self, offsets: Offsets, candidates: Sequence[Candidate]) -> Offsets:
        """Candidates neither small model can say get expert log P = -inf (tuned probability 0);
        at alpha 0 nothing is tuned, so nothing is excluded."""
        if self.alpha == 0:
            return offsets
        silent = combiner.without_evidence(offsets.expert, offsets.anti_expert, math.log(PROB_FLOOR),
                                           [c.is_end for c in candidates])
        if not silent:
            return offsets
        expert = [-math.inf if i in silent else v for i, v in enumerate(offsets.expert)]
        return Offsets(expert, offsets.anti_expert, offsets.alignment, offsets.full)

    def context_ids(self, prefix: Prefix) -> list[int]:
        """The small models' ids of the context before ``prefix``'s next token: its hosted ids on
        one tokenizer, else its stable tokenisation (:meth:`Aligner.split_context`)."""
        if self.same_vocab and prefix.ids is not None:
            return list(prefix.ids)
        ids, _ = self.aligner.split_context(prefix.data)
        return list(ids)

    def prefetch(self, prefix: Prefix) -> None:
        """Run the small models over ``prefix`` ahead of its candidates (while the API call for
        them is in flight): their KV caches then hold the context, and the scoring that follows
        computes only the candidates. Changes no result."""
        ids = self.context_ids(prefix)
        self.expert.distributions_groups([(ids, ())])
        self.anti_expert.distributions_groups([(ids, ())])

    def close(self) -> None:
        """Close both sessions (their KV caches go back to the prompt store)."""
        self.expert.close()
        self.anti_expert.close()
