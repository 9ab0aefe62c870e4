"""The KV-cached forward engine under every local scorer: one model, one token context.

:class:`CachedContext` holds a token context in a model's KV cache, extends it to new ids
(reusing the longest common prefix) and scores *all* candidate paths of a position in one
forward pass. The batched scoring is tree attention (as in SpecInfer/Medusa): the candidate
paths share the cached context and often their first tokens, so they are laid out as the nodes
of a trie in one sequence of length N, each node attending to the cache and to its own
ancestors only, with position ids set to its depth. One forward, batch size 1, no copy of the
cache; afterwards the N new cache entries are cropped. Only the outputs that are read (the
last new token, the anchors, the trie nodes) are projected onto the vocabulary (transformers'
``logits_to_keep``): a prompt's other positions skip the largest matrix of a small model.
:class:`ForwardPlan` is what one such forward feeds the model (shared with the scoring queue,
which merges several plans).

Left out: tokenizers, prompt rendering and model loading (``scorer.py``), per-generation
sessions (``sessions.py``) and sharing forwards between generations (``batching.py``).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigurationError
from ..tokens.vocab import common_prefix

Path_ = tuple[int, ...]

# One lock per model object: scorers that share a model (adapter on/off) must not interleave.
_MODEL_LOCKS: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: Any) -> threading.Lock:
    with _LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.Lock()
        return lock


def select_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else MPS, else CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def new_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


def cache_length(cache: Any) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per-layer (keys, values) ``[rows, heads, length, dim]`` of a plain dynamic cache, [] for
    an empty one, None for anything else (sliding or quantised layers...)."""
    if cache is None:
        return []
    layers = getattr(cache, "layers", None)
    if layers is not None:
        out = []
        for layer in layers:
            if type(layer).__name__ != "DynamicLayer":
                return None
            keys = getattr(layer, "keys", None)
            if keys is None:
                if out:
                    return None
                continue  # not initialised yet
            out.append((keys, layer.values))
        return out
    key_cache = getattr(cache, "key_cache", None)  # older transformers
    if key_cache is not None:
        return list(zip(key_cache, cache.value_cache))
    return None


def cache_from_layers(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    cache = new_cache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def takes_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward can skip the vocabulary projection of positions nobody reads
    (transformers' ``logits_to_keep``); peft models are asked about their base model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


class ForwardPlan:
    """What one :meth:`CachedContext.score_groups` call feeds the model: the context ``ids``,
    the ``keep`` cached tokens it reuses, the ``new`` tokens after them, then one input per trie
    node. ``answer`` is set instead when no forward is needed."""

    def __init__(self, ids: list[int], groups: Sequence[tuple[int, Sequence[Path_]]],
                 nodes: dict[tuple[int, Path_], int], keep: int, new: list[int],
                 answer: list[dict[Path_, torch.Tensor]] | None = None) -> None:
        self.ids, self.groups, self.nodes, self.keep, self.new, self.answer = ids, groups, nodes, keep, new, answer
        self.order = list(nodes)

    @property
    def inputs(self) -> list[int]:
        return self.new + [path[-1] for _, path in self.order]

    @property
    def first_needed(self) -> int:
        """Index of the first input whose output is read: the last new token, an earlier anchor's
        token, or the first trie node. The outputs before it (most of a prompt) are not needed."""
        if not self.new:
            return 0
        earlier = [anchor - 1 - self.keep for anchor, _ in self.groups if anchor < len(self.ids)]
        return min([len(self.new) - 1] + earlier)

    @property
    def positions(self) -> list[int]:
        """Position ids: the new tokens in order; a node at its anchor + depth - 1."""
        return list(range(self.keep, len(self.ids))) + [self.groups[g][0] + len(path) - 1 for g, path in self.order]

    def mask_rows(self, dtype: torch.dtype, device: Any) -> torch.Tensor:
        """Additive attention mask ``[n_inputs, keep + n_inputs]`` (0 = may attend): the cached
        prefix and earlier new tokens for new tokens; ``ids[:anchor]`` and its own ancestors for
        a trie node."""
        n_new, n_ctx, keep = len(self.new), len(self.ids), self.keep
        n_in = n_new + len(self.order)
        low = torch.finfo(dtype).min
        mask = torch.full((n_in, keep + n_in), low, dtype=dtype, device=device)
        mask[:, :keep] = 0
        if n_new:
            mask[:n_new, keep:n_ctx] = torch.triu(torch.full((n_new, n_new), low, dtype=dtype, device=device), diagonal=1)
        for i, (g, path) in enumerate(self.order):
            row = n_new + i
            mask[row, : self.groups[g][0]] = 0
            for depth in range(1, len(path) + 1):
                mask[row, n_ctx + self.nodes[(g, path[:depth])]] = 0
        return mask


class CachedContext:
    """A token context held in a model's KV cache, with the log-probs of the next token.

    ``extend_to(ids)`` makes the cache hold exactly ``ids`` (reusing the longest common prefix,
    cropping the rest) and returns log P(next | ids) as a float32 tensor of shape ``[V]``.
    ``score(ids, paths)`` also returns log P(next | ids + path) for every prefix of every path,
    in one forward (see the module docstring).

    With ``rows > 1`` the same tokens run as a batch of identical rows that differ only by
    ``forward_kwargs`` (e.g. peft's ``adapter_names``: expert and anti-expert in one forward);
    :meth:`score_rows` then returns tensors of shape ``[rows, V]``.
    """

    def __init__(self, model: Any, *, forward_context: Any = contextlib.nullcontext, rows: int = 1,
                 forward_kwargs: dict[str, Any] | None = None) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self._forward_context = forward_context
        self.rows = rows
        self.forward_kwargs = dict(forward_kwargs or {})
        self.ids: list[int] = []
        self.cache: Any = None
        self.last_logprobs: torch.Tensor | None = None  # [rows, V]
        self.tree_ok: bool | None = None  # set by the caller's self-check
        self.keeps_logits = takes_logits_to_keep(model)

    def _forward(self, input_ids: Sequence[int], logits_from: int = 0, **kwargs: Any) -> torch.Tensor:
        """logits ``[rows, len(input_ids) - logits_from, V]`` (float32) of the inputs from index
        ``logits_from`` on (the others are not projected onto the vocabulary when the model allows)."""
        ids = torch.tensor([list(input_ids)] * self.rows, dtype=torch.long, device=self.device)
        if "position_ids" in kwargs:
            kwargs["position_ids"] = kwargs["position_ids"].expand(self.rows, -1)
        if logits_from and self.keeps_logits:
            kwargs["logits_to_keep"] = len(input_ids) - logits_from
        with torch.inference_mode(), self._forward_context():
            out = self.model(input_ids=ids, cache=self.cache, use_cache=True, **kwargs, **self.forward_kwargs)
        self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        logits = out.logits
        if logits.shape[1] == len(input_ids) and logits_from:
            logits = logits[:, logits_from:]  # the model ignored logits_to_keep
        return logits.float()

    def reset(self) -> None:
        self.ids, self.cache, self.last_logprobs = [], None, None

    def extend_to(self, ids: Sequence[int]) -> torch.Tensor:
        return self.score(ids, ())[()]

    def tree(self, paths: Sequence[Path_]) -> dict[Path_, torch.Tensor]:
        """log P(next | context + p) for ``p`` = () and every prefix of every path."""
        if self.last_logprobs is None:
            raise RuntimeError("extend_to() must run before tree()")
        return self.score(self.ids, paths)

    def score(self, ids: Sequence[int], paths: Sequence[Path_] = ()) -> dict[Path_, torch.Tensor]:
        """:meth:`score_rows` for one row: tensors of shape ``[V]``."""
        return {key: value[0] for key, value in self.score_rows(ids, paths).items()}

    def score_rows(self, ids: Sequence[int], paths: Sequence[Path_] = ()) -> dict[Path_, torch.Tensor]:
        """Make the cache hold ``ids`` and score the trie of ``paths`` on top, in ONE forward.
        Returns log P(next | ids + p), shape ``[rows, V]``, for ``p`` = () and every prefix of
        every path. (:meth:`score_groups` with one group anchored at the end.)"""
        return self.score_groups(ids, [(len(ids), paths)])[0]

    def score_groups(
        self, ids: Sequence[int], groups: Sequence[tuple[int, Sequence[Path_]]]
    ) -> list[dict[Path_, torch.Tensor]]:
        """Make the cache hold ``ids`` and score several tries, each rooted at a prefix of it.

        ``groups`` is a list of ``(anchor, paths)``: the paths of a group continue
        ``ids[:anchor]`` (1 <= anchor <= len(ids)). Everything goes in ONE forward: the tokens
        the cache lacks attend causally; each trie node attends to ``ids[:anchor]`` and to its
        own ancestors, at position ``anchor + depth - 1``. For each group, returns
        log P(next | ids[:anchor] + p), shape ``[rows, V]``, for ``p`` = () and every prefix of
        every path. This is how all positions of a speculative chunk are scored at once.
        """
        plan = self.prepare(ids, groups)
        return plan.answer if plan.answer is not None else self.run(plan)

    def run(self, plan: "ForwardPlan") -> list[dict[Path_, torch.Tensor]]:
        """The one forward that a plan from :meth:`prepare` needs, and its answer (what
        :meth:`score_groups` returns). A failure leaves the cache clean for the next call."""
        kwargs: dict[str, Any] = {}
        if plan.order:
            dtype = next(self.model.parameters()).dtype
            mask = plan.mask_rows(dtype, self.device)
            kwargs = {"attention_mask": mask[None, None],
                      "position_ids": torch.tensor([plan.positions], device=self.device)}
        first = plan.first_needed
        try:
            logits = self._forward(plan.inputs, first, **kwargs)
            return self.complete(plan, torch.log_softmax(logits, dim=-1), first)
        except BaseException:
            self.reset()  # the cache may hold part of this call: start clean next time
            raise

    def prepare(self, ids: Sequence[int], groups: Sequence[tuple[int, Sequence[Path_]]]) -> "ForwardPlan":
        """Plan :meth:`score_groups`: crop the cache to the reusable prefix and lay out the new
        tokens and trie nodes (or answer from memory when no forward is needed)."""
        ids = list(ids)
        if not ids:
            raise ConfigurationError("a model context needs at least one token; pass a non-empty prompt")
        if any(not 1 <= anchor <= len(ids) for anchor, _ in groups):
            raise ValueError(f"anchors must lie in [1, {len(ids)}], got {[a for a, _ in groups]}")
        nodes: dict[tuple[int, Path_], int] = {}  # (group, path prefix) -> index
        for g, (_, paths) in enumerate(groups):
            for path in paths:
                for depth in range(1, len(path) + 1):
                    key = (g, tuple(path[:depth]))
                    if key not in nodes:
                        nodes[key] = len(nodes)  # insertion order puts parents before children
        if self.tree_ok is False and nodes:
            return ForwardPlan(ids, groups, nodes, 0, [], answer=self._sequential_groups(ids, groups))
        common = common_prefix(self.ids, ids)
        fresh = common == len(ids) == len(self.ids) and self.last_logprobs is not None
        first_anchor = min((anchor for anchor, _ in groups), default=len(ids))
        if fresh and first_anchor == len(ids):
            keep = len(ids)  # the root is known; only trie nodes (if any) to compute
            if not nodes:
                return ForwardPlan(ids, groups, nodes, keep, [], answer=[{(): self.last_logprobs} for _ in groups])
        else:
            # Recompute from the earliest position whose output a group needs.
            keep = min(common, first_anchor - 1, len(ids) - 1)
        if self.cache is None or keep == 0:
            self.cache, keep = new_cache(), 0
        elif keep < cache_length(self.cache):
            self.cache.crop(keep - cache_length(self.cache))
        return ForwardPlan(ids, groups, nodes, keep, ids[keep:])

    def complete(self, plan: "ForwardPlan", logprobs: torch.Tensor, first: int = 0) -> list[dict[Path_, torch.Tensor]]:
        """Finish :meth:`score_groups` from the forward's log-probs ``[rows, n_inputs - first, V]``
        (inputs from index ``first`` on): drop the trie's cache entries, remember the context,
        and pick each group's outputs."""
        n_new, n_ctx = len(plan.new), len(plan.ids)
        extra = cache_length(self.cache) - n_ctx
        if extra > 0:
            self.cache.crop(-extra)
        if n_new:
            self.last_logprobs = logprobs[:, n_new - 1 - first]
        self.ids = plan.ids
        out: list[dict[Path_, torch.Tensor]] = []
        for anchor, _ in plan.groups:
            root = self.last_logprobs if anchor == n_ctx else logprobs[:, anchor - 1 - plan.keep - first]
            out.append({(): root})
        for (g, path), i in plan.nodes.items():
            out[g][path] = logprobs[:, n_new + i - first]
        return out

    def _sequential_groups(
        self, ids: list[int], groups: Sequence[tuple[int, Sequence[Path_]]]
    ) -> list[dict[Path_, torch.Tensor]]:
        """Slow exact fallback: per group, its context then one forward per leaf path."""
        out = []
        for anchor, paths in groups:
            root = self.score_groups(ids[:anchor], [(anchor, ())])[0]
            order = list(dict.fromkeys(tuple(p[:d]) for p in paths for d in range(1, len(p) + 1)))
            out.append(self._sequential(order, dict(root)))
        self.score_groups(ids, [(len(ids), ())])
        return out

    def _sequential(self, order: list[Path_], out: dict[Path_, torch.Tensor]) -> dict[Path_, torch.Tensor]:
        """One forward per leaf path on top of the current context."""
        n_ctx = len(self.ids)
        leaves = [p for p in order if not any(q[: len(p)] == p and len(q) > len(p) for q in order)]
        for leaf in leaves:
            try:
                logits = self._forward(list(leaf))
            except BaseException:
                self.reset()
                raise
            self.cache.crop(-(cache_length(self.cache) - n_ctx))
            logprobs = torch.log_softmax(logits, dim=-1)
            for depth in range(1, len(leaf) + 1):
                out.setdefault(leaf[:depth], logprobs[:, depth - 1])
        return out
