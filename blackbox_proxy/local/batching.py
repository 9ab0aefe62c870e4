"""Scoring across concurrent generations: one forward for many prompts that share a small model.

Concurrent generations (a batch run, several server clients) each ask their expert and
anti-expert to score candidates. One forward per request leaves most of a forward's cost (reading
the weights) unshared. :class:`ScoringQueue` collects the requests that arrive while the model
is busy and runs them as ONE forward: each context's KV cache is left-padded to the longest and
stacked along the batch dimension, each row's new tokens and trie nodes are right-padded, and a
4D mask per row keeps every row to its own context, causal order and trie (as in
:meth:`~blackbox_proxy.local.engine.CachedContext.score_groups`). Afterwards each context gets its own
cache back, without padding and without the trie's entries.

Batching needs no waiting: the first request finds the model free and runs at once; requests
that arrive during that forward are run together as the next one. Models whose attention ignores
custom masks, caches that are not plain per-layer key/value tensors, and sliding-window
contexts past their window are run one at a time, as before.

The slow obvious reference is each context's own ``score_groups``; the tests compare the two.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from .engine import cache_from_layers as _cache_from
from .engine import cache_layers as _layers
from .engine import new_cache

Path_ = tuple[int, ...]

DEFAULT_MAX_ROWS = 32  # rows (prompts x rows per prompt) in one batched forward


class _Request:
    __slots__ = ("context", "ids", "groups", "batchable", "done", "result", "error")

    def __init__(self, context: Any, ids: list[int], groups: Sequence[tuple[int, Sequence[Path_]]],
                 batchable: bool) -> None:
        self.context, self.ids, self.groups, self.batchable = context, ids, groups, batchable
        self.done = False
        self.result: list[dict[Path_, torch.Tensor]] | None = None
        self.error: BaseException | None = None


class ScoringQueue:
    """Collects :meth:`CachedContext.score_groups` calls on one model from several threads and
    runs those that wait together as one forward. See the module docstring.

    Example::

        queue = ScoringQueue(lock)       # the model's lock
        out = queue.score_groups(context, ids, [(len(ids), paths)], batchable=True)
    """

    def __init__(self, lock: threading.Lock, *, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        self.lock = lock
        self.max_rows = max_rows
        self._guard = threading.Lock()
        self._pending: list[_Request] = []
        self.forwards = 0  # batched forwards run (for benchmarks and tests)
        self.batched_requests = 0  # requests that shared a forward with another

    def score_groups(self, context: Any, ids: Sequence[int], groups: Sequence[tuple[int, Sequence[Path_]]],
                     *, batchable: bool = True) -> list[dict[Path_, torch.Tensor]]:
        request = _Request(context, list(ids), list(groups), batchable)
        with self._guard:
            self._pending.append(request)
        while True:
            with self.lock:
                if request.done:
                    break
                with self._guard:
                    batch = self._take()
                try:
                    self._run(batch)
                except BaseException as exc:  # noqa: BLE001 - every waiting caller gets it
                    for taken in batch:
                        if not taken.done:
                            taken.context.reset()
                            taken.error, taken.done = exc, True
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def score_many(self, jobs: Sequence[tuple[Any, Sequence[int], Sequence[tuple[int, Sequence[Path_]]]]],
                   *, batchable: bool = True) -> list[list[dict[Path_, torch.Tensor]]]:
        """Score ``(context, ids, groups)`` jobs of one caller together (one forward where they
        are compatible); what the queue does for concurrent callers, without threads."""
        requests = [_Request(context, list(ids), list(groups), batchable) for context, ids, groups in jobs]
        size = max(1, self.max_rows // max((r.context.rows for r in requests), default=1))
        with self.lock:
            for start in range(0, len(requests), size):
                self._run(requests[start: start + size])
        for request in requests:
            if request.error is not None:
                raise request.error
        return [request.result for request in requests]

    def _take(self) -> list[_Request]:
        """The oldest pending requests, up to ``max_rows`` rows (at least one request)."""
        batch, rows = [], 0
        while self._pending:
            rows += self._pending[0].context.rows
            if batch and rows > self.max_rows:
                break
            batch.append(self._pending.pop(0))
        return batch

    def _run(self, batch: list[_Request]) -> None:
        plans = []
        for request in batch:
            try:
                plan = request.context.prepare(request.ids, request.groups)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                request.context.reset()
                request.error, request.done = exc, True
                continue
            if plan.answer is not None:
                request.result, request.done = plan.answer, True
            else:
                plans.append((request, plan))
        together = [(r, p) for r, p in plans if r.batchable and _layers(r.context.cache) is not None]
        alone = [(r, p) for r, p in plans if (r, p) not in together]
        groups = _compatible(together)
        for members in groups:
            if len(members) == 1:
                alone.append(members[0])
            else:
                self._forward_many(members)
        for request, plan in alone:
            self._forward_one(request, plan)

    @staticmethod
    def _forward_one(request: _Request, plan: Any) -> None:
        try:
            request.result = request.context.run(plan)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            request.error = exc
        request.done = True

    def _forward_many(self, members: list[tuple[_Request, Any]]) -> None:
        contexts = [r.context for r, _ in members]
        first = contexts[0]
        model, device = first.model, first.device
        dtype = next(model.parameters()).dtype
        low = torch.finfo(dtype).min
        past = [_layers(c.cache) for c in contexts]
        n_layers = max(len(p) for p in past)
        keep = [plan.keep for _, plan in members]
        if any(len(p) not in (0, n_layers) for p in past) or any(k != (p[0][0].shape[2] if p else 0)
                                                                  for k, p in zip(keep, past)):
            for request, plan in members:
                self._forward_one(request, plan)
            return
        big_k = max(keep)
        big_q = max(len(plan.inputs) for _, plan in members)
        rows = [c.rows for c in contexts]
        total = sum(rows)
        input_ids = torch.zeros((total, big_q), dtype=torch.long, device=device)
        positions = torch.zeros((total, big_q), dtype=torch.long, device=device)
        mask = torch.full((total, 1, big_q, big_k + big_q), low, dtype=dtype, device=device)
        row = 0
        for (_, plan), r in zip(members, rows):
            n_in, k = len(plan.inputs), plan.keep
            own = plan.mask_rows(dtype, device)  # [n_in, k + n_in]
            block = slice(row, row + r)
            input_ids[block, :n_in] = torch.tensor(plan.inputs, device=device)
            positions[block, :n_in] = torch.tensor(plan.positions, device=device)
            mask[block, 0, :n_in, big_k - k: big_k] = own[:, :k]
            mask[block, 0, :n_in, big_k: big_k + n_in] = own[:, k:]
            for q in range(n_in, big_q):  # padding queries see only themselves
                mask[block, 0, q, big_k + q] = 0
            row += r
        layers = []
        for layer in range(n_layers):
            template = next(p[layer] for p in past if p)
            ks, vs = [], []
            for p, r, k in zip(past, rows, keep):
                shape = (r, template[0].shape[1], big_k - k, template[0].shape[3])
                pad_k = torch.zeros(shape, dtype=template[0].dtype, device=device)
                pad_v = torch.zeros(shape[:3] + (template[1].shape[3],), dtype=template[1].dtype, device=device)
                ks.append(torch.cat([pad_k, p[layer][0]], dim=2) if p else pad_k)
                vs.append(torch.cat([pad_v, p[layer][1]], dim=2) if p else pad_v)
            layers.append((torch.cat(ks, 0), torch.cat(vs, 0)))
        cache = _cache_from(layers) if big_k else None
        kwargs = _merged_kwargs(contexts)
        skip = min(plan.first_needed for _, plan in members)  # no row reads an output before it
        if skip and first.keeps_logits:
            kwargs["logits_to_keep"] = big_q - skip
        try:
            with torch.inference_mode(), first._forward_context():
                out = model(input_ids=input_ids, cache=cache if cache is not None else new_cache(), use_cache=True,
                            attention_mask=mask, position_ids=positions, **kwargs)
            logits = out.logits if out.logits.shape[1] == big_q - skip else out.logits[:, skip:]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            grown = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            after = _layers(grown)
            if after is None:
                raise RuntimeError("the model returned a cache this queue cannot split")
        except BaseException as exc:  # noqa: BLE001
            for request, _ in members:
                request.context.reset()
                request.error, request.done = exc, True
            return
        self.forwards += 1
        self.batched_requests += len(members)
        row = 0
        for (request, plan), r in zip(members, rows):
            k, n_new = plan.keep, len(plan.new)
            block = slice(row, row + r)
            own = [(torch.cat([kk[block, :, big_k - k: big_k], kk[block, :, big_k: big_k + n_new]], dim=2),
                    torch.cat([vv[block, :, big_k - k: big_k], vv[block, :, big_k: big_k + n_new]], dim=2))
                   for kk, vv in after]
            context = request.context
            context.cache = _cache_from(own)
            try:
                request.result = context.complete(plan, logprobs[block, : len(plan.inputs) - skip], skip)
            except BaseException as exc:  # noqa: BLE001
                context.reset()
                request.error = exc
            request.done = True
            row += r


def _signature(context: Any) -> tuple:
    """Contexts batch together when they run the same model the same way."""
    kwargs = tuple(sorted((k, isinstance(v, list) or repr(v)) for k, v in context.forward_kwargs.items()))
    return (id(context.model), context._forward_context, kwargs)


def _compatible(plans: list[tuple[_Request, Any]]) -> list[list[tuple[_Request, Any]]]:
    groups: dict[tuple, list] = {}
    for request, plan in plans:
        groups.setdefault(_signature(request.context), []).append((request, plan))
    return list(groups.values())


def _merged_kwargs(contexts: Sequence[Any]) -> dict[str, Any]:
    """Per-row keyword lists (peft's ``adapter_names``) are concatenated; the rest is shared."""
    merged: dict[str, Any] = {}
    for key, value in contexts[0].forward_kwargs.items():
        if isinstance(value, list):
            merged[key] = [item for c in contexts for item in c.forward_kwargs[key]]
        else:
            merged[key] = value
    return merged


_QUEUES: "weakref.WeakKeyDictionary[Any, ScoringQueue]" = weakref.WeakKeyDictionary()
_QUEUES_GUARD = threading.Lock()


def model_queue(model: Any, lock: threading.Lock) -> ScoringQueue:
    """The one :class:`ScoringQueue` of a model object (shared by all its scorers)."""
    with _QUEUES_GUARD:
        queue = _QUEUES.get(model)
        if queue is None:
            queue = _QUEUES[model] = ScoringQueue(lock)
        return queue
