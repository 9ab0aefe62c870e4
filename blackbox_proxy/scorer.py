"""Small local models (expert and anti-expert) that give next-token log-probabilities.

A :class:`Scorer` wraps one Hugging Face causal LM, its tokenizer and its prompt rendering. A
:class:`ScorerSession` is one generation with that model: it keeps the KV cache of everything
stable so far (prompt + committed continuation tokens), extends it as text is appended, rolls it
back when re-tokenisation changes an earlier token, and scores *all* candidate paths of a
position in one forward pass.

The batched scoring is tree attention (as in SpecInfer/Medusa): the candidate paths share the
cached context and often their first tokens, so they are laid out as the nodes of a trie in one
sequence of length N, each node attending to the cache and to its own ancestors only, with
position ids set to its depth. One forward, batch size 1, no copy of the cache; afterwards the N
new cache entries are cropped. A one-time self-check compares this against plain sequential
forwards; models whose attention ignores custom 4D masks fall back to one forward per path.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from .errors import ConfigurationError, ModelLoadError
from .vocab import Vocabulary, vocabulary_from_hf

logger = logging.getLogger(__name__)

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


def _new_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


def _cache_length(cache: Any) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


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

    def _forward(self, input_ids: Sequence[int], **kwargs: Any) -> torch.Tensor:
        """logits ``[rows, len(input_ids), V]`` (float32)."""
        ids = torch.tensor([list(input_ids)] * self.rows, dtype=torch.long, device=self.device)
        if "position_ids" in kwargs:
            kwargs["position_ids"] = kwargs["position_ids"].expand(self.rows, -1)
        with torch.inference_mode(), self._forward_context():
            out = self.model(input_ids=ids, cache=self.cache, use_cache=True, **kwargs, **self.forward_kwargs)
        self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        return out.logits.float()

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
        if plan.answer is not None:
            return plan.answer
        kwargs: dict[str, Any] = {}
        if plan.order:
            dtype = next(self.model.parameters()).dtype
            mask = plan.mask_rows(dtype, self.device)
            kwargs = {"attention_mask": mask[None, None],
                      "position_ids": torch.tensor([plan.positions], device=self.device)}
        try:
            logits = self._forward(plan.inputs, **kwargs)
        except BaseException:
            self.reset()  # the cache may hold part of this call: start clean next time
            raise
        return self.complete(plan, torch.log_softmax(logits, dim=-1))

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
        common = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            common += 1
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
            self.cache, keep = _new_cache(), 0
        elif keep < _cache_length(self.cache):
            self.cache.crop(keep - _cache_length(self.cache))
        return ForwardPlan(ids, groups, nodes, keep, ids[keep:])

    def complete(self, plan: "ForwardPlan", logprobs: torch.Tensor) -> list[dict[Path_, torch.Tensor]]:
        """Finish :meth:`score_groups` from the forward's log-probs ``[rows, n_new + n_nodes, V]``:
        drop the trie's cache entries, remember the context, and pick each group's outputs."""
        n_new, n_ctx = len(plan.new), len(plan.ids)
        extra = _cache_length(self.cache) - n_ctx
        if extra > 0:
            self.cache.crop(-extra)
        if n_new:
            self.last_logprobs = logprobs[:, n_new - 1]
        self.ids = plan.ids
        out: list[dict[Path_, torch.Tensor]] = []
        for anchor, _ in plan.groups:
            root = self.last_logprobs if anchor == n_ctx else logprobs[:, anchor - 1 - plan.keep]
            out.append({(): root})
        for (g, path), i in plan.nodes.items():
            out[g][path] = logprobs[:, n_new + i]
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
            self.cache.crop(-(_cache_length(self.cache) - n_ctx))
            logprobs = torch.log_softmax(logits, dim=-1)
            for depth in range(1, len(leaf) + 1):
                out.setdefault(leaf[:depth], logprobs[:, depth - 1])
        return out


class Scorer:
    """One small causal LM with its tokenizer, vocabulary and prompt rendering.

    Args:
        model: a Hugging Face ``PreTrainedModel`` for causal LM (or a peft model).
        tokenizer: its fast tokenizer.
        render: ``"chat"`` (the tokenizer's chat template), ``"raw"`` (the prompt text as is) or
            ``"auto"`` (chat when the tokenizer has a template).
        name: shown in messages and traces.
        adapter: ``None`` (plain model), ``True``/``False`` (a peft model with its adapter on or
            off; one model object can then serve as both expert and anti-expert).

    Example::

        expert = Scorer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
        session = expert.session(expert.prompt_ids(prompt="2+2="))
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        render: str = "auto",
        name: str | None = None,
        adapter: bool | None = None,
        vocabulary: Vocabulary | None = None,
        lock: threading.Lock | None = None,
    ) -> None:
        if adapter is not None and not hasattr(model, "disable_adapter"):
            raise ConfigurationError("adapter=True/False needs a peft model (PeftModel) with a LoRA adapter")
        if render not in ("auto", "chat", "raw"):
            raise ConfigurationError(f"render must be 'auto', 'chat' or 'raw', got {render!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if render == "chat" and not has_template:
            raise ConfigurationError(f"{self.name} has no chat template; use render='raw'")
        self.render = ("chat" if has_template else "raw") if render == "auto" else render
        self.adapter = adapter
        self.adapter_name: str | None = None
        if adapter is not None:
            active = getattr(model, "active_adapter", None)
            self.adapter_name = active if isinstance(active, str) else None
        self._mixed_ok: bool | None = None
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        extra_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.vocab = vocabulary or vocabulary_from_hf(tokenizer, end_ids=extra_eos, name=self.name)
        self.lock = lock or model_lock(model)
        self.device = next(model.parameters()).device
        self.max_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        window = getattr(model.config, "sliding_window", None)
        if getattr(model.config, "use_sliding_window", True) is False:
            window = None
        # Past this length the tree mask (which has no window) would let sliding layers see too far.
        self.sliding_window: int | None = int(window) if window else None
        self._tree_ok: bool | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | None = None,
        dtype: Any = None,
        render: str = "auto",
        name: str | None = None,
    ) -> "Scorer":
        """Load a Hugging Face causal LM and tokenizer (local folder or offline cache)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        target = select_device(device)
        if dtype is None:
            dtype = torch.float32 if target.type == "cpu" else "auto"
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
            raise ModelLoadError(
                f"cannot load {name_or_path!r} as a causal LM ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                "pass a local model folder or a Hugging Face name available offline"
            ) from exc
        return cls(model.to(target), tokenizer, render=render, name=name or str(name_or_path))

    @classmethod
    def pair_from_adapter(
        cls,
        base: str,
        adapter: str,
        *,
        device: str | None = None,
        dtype: Any = None,
        render: str = "auto",
    ) -> tuple["Scorer", "Scorer"]:
        """(expert, anti_expert) from ONE model in memory: ``base`` with the LoRA ``adapter``
        switched on for the expert and off for the anti-expert (peft's adapter toggling)."""
        anti = cls.from_pretrained(base, device=device, dtype=dtype, render=render, name=str(base))
        try:
            from peft import PeftModel
        except ImportError:
            raise ModelLoadError("an expert adapter needs peft: run `pip install peft`") from None
        try:
            peft_model = PeftModel.from_pretrained(anti.model, str(adapter))
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(
                f"cannot load the LoRA adapter {str(adapter)!r} onto {base!r} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160]}); pass the folder holding adapter_config.json"
            ) from exc
        peft_model.eval()
        vocab = anti.vocab
        expert = cls(peft_model, anti.tokenizer, render=anti.render, name=f"{base}+{adapter}", adapter=True,
                     vocabulary=vocab)
        anti_expert = cls(peft_model, anti.tokenizer, render=anti.render, name=str(base), adapter=False,
                          vocabulary=vocab)
        return expert, anti_expert

    # ----- prompts -----------------------------------------------------------------------------
    def prompt_ids(self, *, prompt: str | None = None, messages: Sequence[dict[str, str]] | None = None) -> list[int]:
        """Token ids of the rendered prompt (the continuation is appended after these)."""
        if self.render == "chat":
            if messages is None:
                messages = [{"role": "user", "content": prompt or ""}]
            text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        else:
            if prompt is None:
                raise ConfigurationError(
                    f"{self.name} renders raw text (no chat template): pass prompt=TEXT, not messages"
                )
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if not ids:
            raise ConfigurationError(f"the prompt renders to no tokens for {self.name}; pass a non-empty prompt")
        if self.max_length and len(ids) >= self.max_length:
            raise ConfigurationError(
                f"the prompt is {len(ids)} tokens for {self.name}, whose context is {self.max_length}; shorten it"
            )
        return ids

    # ----- forward helpers ----------------------------------------------------------------------
    def forward_context(self) -> Any:
        if self.adapter is False:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def session(self, prompt_ids: Sequence[int], *, batching: bool = False) -> "ScorerSession":
        return ScorerSession(self, prompt_ids, batching=batching)

    def generate(
        self,
        *,
        prompt: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        max_tokens: int = 64,
        stop: Sequence[str] = (),
    ) -> str:
        """Greedy text from this model alone (e.g. "expert alone" baselines), KV-cached."""
        session = self.session(self.prompt_ids(prompt=prompt, messages=messages))
        ids: list[int] = []
        try:
            for _ in range(max_tokens):
                token = int(torch.argmax(session.distributions(ids)[()]))
                if token in self.vocab.end_ids:
                    break
                ids.append(token)
                text = self.vocab.bytes_of(ids).decode("utf-8", errors="replace")
                hits = [text.find(s) for s in stop if s and s in text]
                if hits:
                    return text[: min(hits)]
        finally:
            session.close()
        return self.vocab.bytes_of(ids).decode("utf-8", errors="replace")

    def check_tree_attention(self) -> bool:
        """Compare tree-attention scoring with sequential forwards once; cache the verdict."""
        if self._tree_ok is not None:
            return self._tree_ok
        probe = self.vocab.encode_text("The quick brown fox jumps over the lazy dog, twice.")
        if len(probe) < 6:
            probe = list(self.vocab.sorted_ids[:6])
        ctx_ids, a, b, c = probe[:3], probe[3], probe[4], probe[5]
        with self.lock:
            try:
                ctx = CachedContext(self.model, forward_context=self.forward_context)
                ctx.extend_to(ctx_ids[:1])
                ctx.tree_ok = True
                fast = ctx.score(ctx_ids, [(a, c), (b,)])  # new context tokens and trie in one forward
                worst = 0.0
                for path in [(), (a,), (a, c), (b,)]:
                    ref = CachedContext(self.model, forward_context=self.forward_context)
                    slow = ref.extend_to(ctx_ids + list(path))
                    # Compare probabilities: a mask that is ignored moves them by far more than this.
                    worst = max(worst, float((fast[path].exp() - slow.exp()).abs().max()))
            except Exception as exc:  # noqa: BLE001 - e.g. flash-attention refuses 4D masks
                logger.warning("%s cannot take a tree attention mask (%s); scoring one path per forward",
                               self.name, type(exc).__name__)
                self._tree_ok = False
                return False
        tolerance = 2e-3 if next(self.model.parameters()).dtype == torch.float32 else 2e-2
        self._tree_ok = worst < tolerance
        if not self._tree_ok:
            logger.warning(
                "%s ignores custom attention masks (max error %.2g); scoring one path per forward",
                self.name,
                worst,
            )
        return self._tree_ok


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
    forward goes through the model's :class:`~blackbox_proxy.batching.ScoringQueue`, shared with
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
        from .batching import model_queue

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
    ``batching``: share forwards with concurrent generations (:mod:`blackbox_proxy.batching`)."""
    if list(expert_ids) == list(anti_ids) and check_mixed_batch(expert, anti):
        shared = _SharedPair(expert, anti, expert_ids, batching=batching)
        return PairedSession(shared, expert, 0), PairedSession(shared, anti, 1)
    return expert.session(expert_ids, batching=batching), anti.session(anti_ids, batching=batching)
