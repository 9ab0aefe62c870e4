"""One generation's view of the small models: KV-cached sessions over a :class:`Scorer`.

A :class:`ScorerSession` keeps the KV cache of everything stable so far (prompt + committed
continuation tokens), extends it as text is appended, rolls it back when re-tokenisation
changes an earlier token, and scores every candidate path of one or several positions in one
forward. When the expert and anti-expert are one peft model with its adapter on and off,
:func:`open_sessions` pairs them as two rows of one batch (:class:`PairedSession`).

Left out: the forward itself (``engine.py``) and sharing forwards with concurrent generations
(``batching.py``, used when ``batching=True``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigurationError
from .batching import model_queue
from .engine import CachedContext, Path_

# The scorers here are :class:`~blackbox_proxy.local.scorer.Scorer` objects; not imported (the
# scorer module imports this one).
Scorer = Any

logger = logging.getLogger(__name__)


def check_mixed_batch(expert: "Scorer", anti: "Scorer") -> bool:
    """True when one peft forward with ``adapter_names=[adapter, "__base__"]`` gives what the
    two toggled forwards give (checked once per pair on a short probe)."""
    if expert._mixed_ok is not None:
        return expert._mixed_ok
    ok = False
    if expert.model is anti.model and expert.adapter is True and anti.adapter is False and expert.adapter_name:
        probe = expert.vocab.encode_text("The quick brown fox jumps over the lazy dog, twice.")[:5] or [0, 1]
        with expert.lock:
            try:
                pair = CachedContext(expert.model, rows=2, forward_kwargs={"adapter_names": [expert.adapter_name, "__base__"]})
                both = pair.score_rows(probe, ())[()]
                one = CachedContext(expert.model, forward_context=expert.forward_context).extend_to(probe)
                other = CachedContext(anti.model, forward_context=anti.forward_context).extend_to(probe)
                worst = max(float((both[0].exp() - one.exp()).abs().max()), float((both[1].exp() - other.exp()).abs().max()))
                ok = worst < (2e-3 if next(expert.model.parameters()).dtype == torch.float32 else 2e-2)
            except Exception as exc:  # noqa: BLE001 - peft versions without mixed batches
                logger.info("mixed adapter batch unavailable for %s (%s)", expert.name, type(exc).__name__)
    expert._mixed_ok = ok
    return ok


def _score_groups(
    scorer: "Scorer", context: CachedContext, prompt_ids: list[int],
    groups: Sequence[tuple[Sequence[int], Sequence[Path_]]], batching: bool = False,
) -> list[dict[Path_, torch.Tensor]]:
    """Score ``(continuation_ids, paths)`` groups on ``context``: one forward when every
    continuation is a prefix of the longest, else one call per group. With ``batching`` the
    forward goes through the model's :class:`~blackbox_proxy.local.batching.ScoringQueue`, shared with
    concurrent generations."""
    longest = max((list(c) for c, _ in groups), key=len)
    nested = all(list(c) == longest[: len(c)] for c, _ in groups)
    if not nested:
        return [r for c, paths in groups for r in _score_groups(scorer, context, prompt_ids, [(c, paths)], batching)]
    ids = prompt_ids + longest
    all_paths = [p for _, paths in groups for p in paths]
    deepest = max((len(prompt_ids) + len(c) + len(p) for c, paths in groups for p in paths), default=len(ids))
    tree_ok = _check_lengths(scorer, ids, all_paths, longest=max(deepest, len(ids)))
    anchored = [(len(prompt_ids) + len(c), list(paths)) for c, paths in groups]
    if batching:
        window_ok = not (scorer.sliding_window and max(deepest, len(ids)) >= scorer.sliding_window)
        batchable = window_ok and scorer.check_tree_attention()
        context.tree_ok = tree_ok
        return model_queue(scorer.model, scorer.lock).score_groups(context, ids, anchored, batchable=batchable)
    with scorer.lock:
        context.tree_ok = tree_ok
        return context.score_groups(ids, anchored)


def _check_lengths(scorer: "Scorer", ids: Sequence[int], paths: Sequence[Path_], longest: int | None = None) -> bool:
    """Refuse texts longer than the model's context; tell whether the tree mask may be used."""
    if longest is None:
        longest = len(ids) + max((len(p) for p in paths), default=0)
    if scorer.max_length and longest > scorer.max_length:
        raise ConfigurationError(
            f"the text is {longest} tokens for {scorer.name}, whose context is {scorer.max_length}; "
            "lower max_tokens or shorten the prompt"
        )
    tree_ok = scorer.check_tree_attention() if paths else True
    if scorer.sliding_window and longest >= scorer.sliding_window:
        tree_ok = False
    return tree_ok


class ScorerSession:
    """One generation's KV-cached context in one :class:`Scorer`.

    ``distributions(continuation_ids, paths)`` makes the context prompt + continuation_ids and
    returns log P(next | context + prefix) for the root and every prefix of every path.
    """

    def __init__(self, scorer: Scorer, prompt_ids: Sequence[int], *, batching: bool = False) -> None:
        self.scorer = scorer
        self.batching = batching
        self.prompt_ids = list(prompt_ids)
        self.context = CachedContext(scorer.model, forward_context=scorer.forward_context)
        self.forwards = 0

    def distributions(self, continuation_ids: Sequence[int], paths: Sequence[Path_] = ()) -> dict[Path_, torch.Tensor]:
        return self.distributions_groups([(continuation_ids, paths)])[0]

    def distributions_groups(
        self, groups: Sequence[tuple[Sequence[int], Sequence[Path_]]]
    ) -> list[dict[Path_, torch.Tensor]]:
        """:meth:`distributions` for several continuations at once (one forward when each is a
        prefix of the longest, e.g. the positions of a speculative chunk)."""
        self.forwards += 1
        return [{k: v[0] for k, v in d.items()}
                for d in _score_groups(self.scorer, self.context, self.prompt_ids, groups, self.batching)]

    def close(self) -> None:
        self.context.reset()


class _SharedPair:
    """Expert and anti-expert of ONE peft model scored as a batch of two rows (adapter on, off):
    one forward per step instead of two. Each call computes both rows; the partner's identical
    call is then served from memory."""

    def __init__(self, expert: Scorer, anti: Scorer, prompt_ids: Sequence[int], *, batching: bool = False) -> None:
        self.expert = expert
        self.batching = batching
        self.prompt_ids = list(prompt_ids)
        self.context = CachedContext(expert.model, rows=2,
                                     forward_kwargs={"adapter_names": [expert.adapter_name, "__base__"]})
        self._key: tuple | None = None
        self._rows: list[dict[Path_, torch.Tensor]] = []
        self.forwards = 0

    def rows(self, groups: Sequence[tuple[Sequence[int], Sequence[Path_]]]) -> list[dict[Path_, torch.Tensor]]:
        key = tuple((tuple(c), tuple(p)) for c, p in groups)
        if key != self._key:
            self._rows = _score_groups(self.expert, self.context, self.prompt_ids, groups, self.batching)
            self._key = key
            self.forwards += 1
        return self._rows


class PairedSession:
    """A :class:`ScorerSession` look-alike for one row of a :class:`_SharedPair`."""

    def __init__(self, shared: _SharedPair, scorer: Scorer, row: int) -> None:
        self.shared = shared
        self.scorer = scorer
        self.row = row
        self.prompt_ids = shared.prompt_ids

    @property
    def forwards(self) -> int:
        return self.shared.forwards

    def distributions(self, continuation_ids: Sequence[int], paths: Sequence[Path_] = ()) -> dict[Path_, torch.Tensor]:
        return self.distributions_groups([(continuation_ids, paths)])[0]

    def distributions_groups(
        self, groups: Sequence[tuple[Sequence[int], Sequence[Path_]]]
    ) -> list[dict[Path_, torch.Tensor]]:
        return [{k: v[self.row] for k, v in d.items()} for d in self.shared.rows(groups)]

    def close(self) -> None:
        self.shared.context.reset()


def open_sessions(expert: Scorer, expert_ids: Sequence[int], anti: Scorer, anti_ids: Sequence[int],
                  *, batching: bool = False) -> tuple[Any, Any]:
    """Sessions for the expert and anti-expert: one batched pair when they are the same peft
    model with the adapter on/off and see the same prompt tokens, else two plain sessions.
    ``batching``: share forwards with concurrent generations (:mod:`blackbox_proxy.local.batching`)."""
    if list(expert_ids) == list(anti_ids) and check_mixed_batch(expert, anti):
        shared = _SharedPair(expert, anti, expert_ids, batching=batching)
        return PairedSession(shared, expert, 0), PairedSession(shared, anti, 1)
    return expert.session(expert_ids, batching=batching), anti.session(anti_ids, batching=batching)
