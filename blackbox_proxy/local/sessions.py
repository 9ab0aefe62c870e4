"""One generation's view of the small models: KV-cached sessions over a :class:`Scorer`.

A :class:`ScorerSession` keeps the KV cache of everything stable so far (prompt + committed
continuation tokens), extends it as text is appended, rolls it back when re-tokenisation
changes an earlier token, and scores every candidate path of one or several positions in one
forward. When the expert and anti-expert are one peft model with its adapter on and off,
:func:`open_sessions` pairs them as two rows of one batch (:class:`PairedSession`, run by
:class:`~.adapter_rows.AdapterRows`). A new generation starts from the cached KV of the last prompt's common prefix
(:class:`PromptStore`: a shared system prompt or few-shot examples are computed once). A prompt's
KV is always computed in the same blocks (:func:`prefill_ends`), so a reused prefix holds the very
floats a fresh session computes: what a process served before never changes an answer.

Left out: the forward itself (``engine.py``), the two-row adapter forward (``adapter_rows.py``)
and sharing forwards with concurrent generations (``batching.py``, used when ``batching=True``).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ContextLimitError
from ..tokens.vocab import common_prefix
from .adapter_rows import check_mixed_batch, forward_setup
from .batching import model_queue
from .engine import CachedContext, Path_, cache_from_layers, cache_layers, cache_length

# The scorers here are :class:`~blackbox_proxy.local.scorer.Scorer` objects; not imported (the
# scorer module imports this one).
Scorer = Any

logger = logging.getLogger(__name__)


# A prompt's KV is computed in blocks that end at 32, 64, 128, 256, 512 tokens, then every 512
# (see prefill_ends): reuse keeps at least half of a shared prefix of 32 tokens or more, and a
# prompt that shares nothing pays a few forwards (on one CPU thread, a 109-token prompt in
# 32 + 32 + 45 tokens costs ~1.3x one forward of 109; a GPU runs short forwards at launch cost).
PREFILL_FIRST, PREFILL_STEP = 32, 512


def prefill_ends(n: int) -> list[int]:
    """Where the blocks end that every session computes a prompt of ``n`` tokens in, one forward
    each, before its first scoring forward; each below ``n`` (the last prompt token goes with
    the first scoring forward, which reads its output).

    >>> prefill_ends(100), prefill_ends(32), prefill_ends(33), prefill_ends(1600)
    ([32, 64], [], [32], [32, 64, 128, 256, 512, 1024, 1536])
    """
    ends, end = [], PREFILL_FIRST
    while end < n:
        ends.append(end)
        end = min(2 * end, end + PREFILL_STEP)
    return ends


def _prefill(scorer: "Scorer", context: CachedContext, prompt_ids: Sequence[int]) -> None:
    """Compute the blocks of the prompt (:func:`prefill_ends`) that ``context`` lacks, one
    forward each, alone under the model's lock: the same forwards, hence the same floats,
    whether the context starts empty or from the :class:`PromptStore`."""
    ends = [end for end in prefill_ends(len(prompt_ids)) if end > len(context.ids)]
    if ends:
        with scorer.lock:
            for end in ends:
                context.score_groups(list(prompt_ids[:end]), [(end, ())])


class PromptStore:
    """The KV cache of the last prompt run in one way (an owner such as a scorer, and a kind such
    as "pair"), so that a later generation whose prompt shares a prefix with it (a system
    prompt, few-shot examples) starts from a copy instead of recomputing it. One entry per
    (owner, kind): memory is one prompt's cache. An entry belongs to the owner's weights as they
    were: change them in place and start from a new owner (or a new store).

    A pure cache, to the last bit: keys and values of a prefix do not depend on what follows it
    (causal attention), but their floats do depend on the shapes of the forward that computed
    them. Every session therefore computes its prompt in the same blocks (:func:`prefill_ends`:
    a few forwards more than one), and only whole blocks are stored and seeded:
    a seeded context holds exactly what a fresh one computes, so what a process served before
    never changes an answer (a replica behind a load balancer answers as a fresh one does).

    Example::

        store.seed(scorer, "alone", context, prompt_ids)   # before the first forward
        ...                                                 # forwards
        store.save(scorer, "alone", context, len(prompt_ids))
    """

    def __init__(self) -> None:
        self._entries: "weakref.WeakKeyDictionary[Any, dict[Any, tuple]]" = weakref.WeakKeyDictionary()
        self._guard = threading.Lock()

    def save(self, owner: Any, kind: Any, context: "CachedContext", n: int) -> bool:
        """Remember the whole blocks (:func:`prefill_ends`) of the first ``n`` tokens of
        ``context`` (ids and cache) for ``(owner, kind)``."""
        n = max(prefill_ends(n), default=0)
        layers = cache_layers(context.cache)
        if not layers or n < 1 or len(context.ids) < n or cache_length(context.cache) < n:
            return False
        snapshot = tuple((k[:, :, :n].clone(), v[:, :, :n].clone()) for k, v in layers)
        with self._guard:
            self._entries.setdefault(owner, {})[kind] = (tuple(context.ids[:n]), snapshot)
        return True

    def seed(self, owner: Any, kind: Any, context: "CachedContext", ids: Sequence[int]) -> int:
        """Give an empty ``context`` the longest cached prefix of ``ids`` that is whole blocks of
        it (:func:`prefill_ends`); returns its length."""
        with self._guard:
            entry = self._entries.get(owner, {}).get(kind)
        if entry is None or context.cache is not None:
            return 0
        stored, layers = entry
        shared = common_prefix(stored, ids)
        common = max((end for end in prefill_ends(len(ids)) if end <= shared), default=0)
        if common == 0:
            return 0
        context.cache = cache_from_layers([(k[:, :, :common].clone(), v[:, :, :common].clone()) for k, v in layers])
        context.ids, context.last_logprobs = list(stored[:common]), None
        return common


PROMPTS = PromptStore()  # one prompt's cache per scorer (and per adapter pair)


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
    _prefill(scorer, context, prompt_ids)
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
    """Refuse texts longer than the model's context (:class:`ContextLimitError`: mid-generation the
    tuner stops there, finish_reason "length"); tell whether the tree mask may be used."""
    if longest is None:
        longest = len(ids) + max((len(p) for p in paths), default=0)
    if scorer.max_length and longest > scorer.max_length:
        raise ContextLimitError(
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
        self.context = CachedContext(scorer.model, **forward_setup(scorer, 1))
        self.reused = PROMPTS.seed(scorer, "alone", self.context, self.prompt_ids)  # prompt tokens not recomputed
        self._saved = False
        self.forwards = 0

    def distributions(self, continuation_ids: Sequence[int], paths: Sequence[Path_] = ()) -> dict[Path_, torch.Tensor]:
        return self.distributions_groups([(continuation_ids, paths)])[0]

    def distributions_groups(
        self, groups: Sequence[tuple[Sequence[int], Sequence[Path_]]]
    ) -> list[dict[Path_, torch.Tensor]]:
        """:meth:`distributions` for several continuations at once (one forward when each is a
        prefix of the longest, e.g. the positions of a speculative chunk)."""
        self.forwards += 1
        out = _score_groups(self.scorer, self.context, self.prompt_ids, groups, self.batching)
        if not self._saved:
            self._saved = True
            PROMPTS.save(self.scorer, "alone", self.context, len(self.prompt_ids))
        return [{k: v[0] for k, v in d.items()} for d in out]

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
        self.context = CachedContext(expert.model, rows=2, **forward_setup(expert, 2))
        self.reused = PROMPTS.seed(expert, "pair", self.context, self.prompt_ids)
        self._key: tuple | None = None
        self._rows: list[dict[Path_, torch.Tensor]] = []
        self.forwards = 0

    def rows(self, groups: Sequence[tuple[Sequence[int], Sequence[Path_]]]) -> list[dict[Path_, torch.Tensor]]:
        key = tuple((tuple(c), tuple(p)) for c, p in groups)
        if key != self._key:
            self._rows = _score_groups(self.expert, self.context, self.prompt_ids, groups, self.batching)
            if not self.forwards:
                PROMPTS.save(self.expert, "pair", self.context, len(self.prompt_ids))
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
    ``batching``: share forwards with concurrent generations (:mod:`blackbox_proxy.local.batching`).
    A backend with ``open_pair`` (:mod:`blackbox_proxy.local.backend`) pairs its own sessions."""
    pair = getattr(expert, "open_pair", None)
    sessions = pair(expert_ids, anti, anti_ids, batching=batching) if pair is not None else None
    if sessions is not None:
        return sessions
    local = hasattr(expert, "_mixed_ok") and hasattr(anti, "model")  # two local Scorers
    if local and list(expert_ids) == list(anti_ids) and check_mixed_batch(expert, anti):
        shared = _SharedPair(expert, anti, expert_ids, batching=batching)
        return PairedSession(shared, expert, 0), PairedSession(shared, anti, 1)
    return expert.session(expert_ids, batching=batching), anti.session(anti_ids, batching=batching)
