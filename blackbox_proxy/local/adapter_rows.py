"""One peft model as two rows of one forward: the expert (adapter on) and the anti-expert (off).

:class:`AdapterRows` runs each LoRA linear layer on the base weights once for both rows and adds
the low-rank update on the expert's row only (peft's own arithmetic, the same floats);
:func:`check_mixed_batch` checks once per pair, on a short probe, that the two-row forward gives
what the two toggled forwards give (else peft's mixed batch, else two forwards);
:func:`forward_setup` is what a scorer's cached context runs with, alone or as a pair.

Left out: the sessions that use it (``sessions.py``) and the forward itself (``engine.py``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from .engine import CachedContext

# The scorers here are :class:`~blackbox_proxy.local.scorer.Scorer` objects; not imported (the
# scorer module imports the sessions, which import this one).
Scorer = Any

logger = logging.getLogger(__name__)


class AdapterRows:
    """Forward context running a peft LoRA model as a batch whose rows have the adapter on or
    off (``pattern``, tiled over the batch: ``(True, False)`` = expert row, anti-expert row).

    Inside it each LoRA linear layer computes ``y = W x + b`` for every row and adds
    ``scale * B A x`` on the "on" rows only: peft's own arithmetic (the same floats), without
    the per-layer indexing and hooks of its mixed batch (``adapter_names``), which cost 10-50%
    of a scoring forward of SmolLM2-135M on a CPU, nor the ~13 ms of ``disable_adapter()``.
    ``layers`` is None for what this does not cover (DoRA and other variants, several active
    adapters, merged or quantised layers, training mode); the pairing check then falls back to
    peft's mixed batch. The weights are read once, when built: the adapter must stay loaded
    and unmerged. Run it under the model's lock: it swaps the layers' ``forward`` for the
    duration of one forward.

    Example::

        rows = AdapterRows(peft_model, "default", (True, False))
        with torch.inference_mode(), rows():
            logits = peft_model(input_ids=ids.expand(2, -1)).logits  # row 0 expert, row 1 base
    """

    def __init__(self, model: Any, adapter: str, pattern: tuple[bool, ...] = (True, False)) -> None:
        self.model, self.adapter, self.pattern = model, adapter, tuple(bool(p) for p in pattern)
        self.layers = _plain_lora_layers(model, adapter)
        self.ok: bool | None = None if self.layers else False  # set by the pairing check
        self._on: dict[tuple[int, Any], torch.Tensor | None] = {}
        self._forwards = [(module, self._layer_forward(*weights)) for module, *weights in self.layers or ()]

    def rows_on(self, x: torch.Tensor) -> torch.Tensor | None:
        """Indices of the batch rows that get the adapter (None: all of them)."""
        batch = x.shape[0]
        if x.dim() < 3 or batch % len(self.pattern):
            raise RuntimeError(f"adapter rows need inputs [batch, sequence, features] with a batch of "
                               f"{len(self.pattern)} rows per context, got {tuple(x.shape)}")
        key = (batch, x.device)
        if key not in self._on:
            on = [i for i in range(batch) if self.pattern[i % len(self.pattern)]]
            self._on[key] = None if len(on) == batch else torch.tensor(on, dtype=torch.long, device=x.device)
        return self._on[key]

    def _layer_forward(self, weight: torch.Tensor, bias: Any, a: torch.Tensor, b: torch.Tensor, b_bias: Any,
                       scale: float) -> Any:
        functional = torch.nn.functional

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            y = functional.linear(x, weight, bias)
            on = self.rows_on(x)
            if on is not None and not len(on):
                return y
            part = x if on is None else x.index_select(0, on)
            delta = functional.linear(functional.linear(part.to(a.dtype), a), b, b_bias).to(y.dtype)
            return y.add_(delta, alpha=scale) if on is None else y.index_add_(0, on, delta, alpha=scale)

        return forward

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        patched = []
        try:
            for module, forward in self._forwards:
                module.forward = forward
                patched.append(module)
            yield
        finally:
            for module in patched:
                module.__dict__.pop("forward", None)


def _plain_lora_layers(model: Any, adapter: str) -> list[tuple] | None:
    """(module, W, b, A, B, B's bias, scale) of every LoRA layer, or None when one of them is
    not a plain LoRA linear layer with ``adapter`` as its only active adapter."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return None
    out = []
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        base = getattr(module, "base_layer", None)
        if (type(module) is not LoraLinear or type(base) is not torch.nn.Linear or module.training
                or list(module.active_adapters) != [adapter] or adapter not in module.lora_A or module.merged
                or module.disable_adapters or module.fan_in_fan_out or adapter in getattr(module, "lora_variant", {})
                or module.use_dora.get(adapter, False)):
            return None
        lora_b = module.lora_B[adapter]
        out.append((module, base.weight, base.bias, module.lora_A[adapter].weight, lora_b.weight, lora_b.bias,
                    float(module.scaling[adapter])))
    return out or None


_ROWS: "weakref.WeakKeyDictionary[Any, dict[tuple, AdapterRows]]" = weakref.WeakKeyDictionary()
_ROWS_GUARD = threading.Lock()


def adapter_rows(model: Any, adapter: str, pattern: tuple[bool, ...] = (True, False)) -> AdapterRows:
    """The one :class:`AdapterRows` of a model, adapter and row pattern (so that the scoring
    queue sees one forward context and batches its contexts together)."""
    with _ROWS_GUARD:
        per_model = _ROWS.setdefault(model, {})
        key = (adapter, tuple(pattern))
        if key not in per_model:
            per_model[key] = AdapterRows(model, adapter, pattern)
        return per_model[key]


def _pair_matches(expert: "Scorer", anti: "Scorer", **pair: Any) -> bool:
    """Whether a two-row forward (adapter on, off) gives what the two toggled forwards give, on a
    short probe (probabilities within 2e-3 in float32, 2e-2 otherwise)."""
    probe = expert.vocab.encode_text("The quick brown fox jumps over the lazy dog, twice.")[:5] or [0, 1]
    with expert.lock:
        try:
            both = CachedContext(expert.model, rows=2, **pair).score_rows(probe, ())[()]
            one = CachedContext(expert.model, forward_context=expert.forward_context).extend_to(probe)
            other = CachedContext(anti.model, forward_context=anti.forward_context).extend_to(probe)
        except Exception as exc:  # noqa: BLE001 - peft versions without mixed batches, odd layer shapes
            logger.info("two-row adapter batch (%s) unavailable for %s (%s)", ", ".join(pair), expert.name,
                        type(exc).__name__)
            return False
    worst = max(float((both[0].exp() - one.exp()).abs().max()), float((both[1].exp() - other.exp()).abs().max()))
    return worst < (2e-3 if next(expert.model.parameters()).dtype == torch.float32 else 2e-2)


def check_mixed_batch(expert: "Scorer", anti: "Scorer") -> bool:
    """True when the expert and anti-expert (one peft model, adapter on and off) can be scored as
    two rows of one forward: by :class:`AdapterRows`, else by peft's mixed batch
    (``adapter_names=[adapter, "__base__"]``); each checked once per pair on a short probe
    against the two toggled forwards."""
    if expert._mixed_ok is not None:
        return expert._mixed_ok
    ok = False
    if expert.model is anti.model and expert.adapter is True and anti.adapter is False and expert.adapter_name:
        rows = adapter_rows(expert.model, expert.adapter_name)
        if rows.ok is None:
            rows.ok = _pair_matches(expert, anti, forward_context=rows)
        ok = rows.ok or _pair_matches(expert, anti, forward_kwargs=peft_mixed(expert))
    expert._mixed_ok = ok
    return ok


def peft_mixed(expert: "Scorer") -> dict[str, Any]:
    return {"adapter_names": [expert.adapter_name, "__base__"]}


def forward_setup(scorer: "Scorer", rows: int) -> dict[str, Any]:
    """CachedContext arguments for a scorer alone (rows=1) or an adapter pair (rows=2): the
    checked :class:`AdapterRows` when there is one, else peft's own ways."""
    if scorer.adapter is not None and scorer.adapter_name:
        pair = adapter_rows(scorer.model, scorer.adapter_name)
        if pair.ok:
            pattern = (True, False) if rows == 2 else (bool(scorer.adapter),)
            return {"forward_context": adapter_rows(scorer.model, scorer.adapter_name, pattern)}
    if rows == 2:
        return {"forward_kwargs": peft_mixed(scorer)}
    return {"forward_context": scorer.forward_context}
