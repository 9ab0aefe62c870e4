"""Small local models (expert and anti-expert) that give next-token log-probabilities.

A :class:`Scorer` wraps one Hugging Face causal LM, its tokenizer and its prompt rendering:
loading (a model folder, or one base with a LoRA adapter toggled on and off), prompt ids,
plain greedy generation, and a one-time self-check that the model honours the custom 4D masks
of tree attention (models whose attention ignores them fall back to one forward per path).

Left out: the KV-cache engine (``engine.py``) and one generation's state (``sessions.py``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigurationError, ModelLoadError, TokenizerMismatchError
from ..tokens.loaders import vocabulary_from_hf
from ..tokens.vocab import Vocabulary
from .backend import ScoringBackend, render_prompt_ids, resolve_render
from .engine import CachedContext, model_lock, select_device
from .sessions import ScorerSession

logger = logging.getLogger(__name__)


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
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self.render = resolve_render(render, tokenizer, self.name)
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
        switched on for the expert and off for the anti-expert (peft's adapter toggling).

        The adapter must have been trained on ``base``: see :func:`check_adapter_base`."""
        anti = cls.from_pretrained(base, device=device, dtype=dtype, render=render, name=str(base))
        check_adapter_base(str(adapter), anti.model, str(base))
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
        """Token ids of the rendered prompt (the continuation is appended after these).

        Chat messages are rendered with this model's chat template whatever ``render`` says (they
        have no raw form); without a template, ``prompt`` (the hosted model's rendering) is used.
        A text prompt is rendered as ``render`` says."""
        return render_prompt_ids(self.tokenizer, self.render, self.name, self.max_length, prompt=prompt,
                                 messages=messages)

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


ADAPTER_CHECK_ENV = "BLACKBOX_PROXY_ADAPTER_BASE_CHECK"  # "off": a mismatch warns instead of failing
_IDENTITY = ("architectures", "model_type", "vocab_size", "hidden_size", "num_hidden_layers")


def _short_name(name_or_path: str) -> str:
    """The last part of a model's name or path, lower case ("HuggingFaceTB/SmolLM2-135M" and
    "~/models/smollm2-135m/" both give "smollm2-135m")."""
    return str(name_or_path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()


def _config_of(name_or_path: str) -> dict[str, Any] | None:
    """The config.json of a model folder, or of a model in the offline Hugging Face cache; None
    when neither is here (nothing is downloaded)."""
    import json
    from pathlib import Path

    folder = Path(name_or_path).expanduser()
    try:
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text(encoding="utf-8"))
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name_or_path, local_files_only=True).to_dict()
    except Exception:  # noqa: BLE001 - not found, not readable: cannot decide
        return None


def _weights_differ(folder: str, model: Any) -> bool | None:
    """Whether the safetensors weights in ``folder`` differ from ``model``'s own (a few rows of
    one tensor both hold, compared); None when that cannot be read."""
    from pathlib import Path

    try:
        from safetensors import safe_open

        files = sorted(Path(folder).expanduser().glob("*.safetensors"))
        if not files:
            return None
        mine = dict(model.named_parameters())
        with safe_open(str(files[0]), framework="pt") as handle:
            for name in handle.keys():
                if name in mine and mine[name].ndim >= 1 and tuple(handle.get_slice(name).get_shape()) == tuple(mine[name].shape):
                    theirs = handle.get_slice(name)[:4].float()
                    ours = mine[name].detach()[:4].float().cpu()
                    return not torch.allclose(theirs, ours, rtol=1e-2, atol=1e-3)
    except Exception:  # noqa: BLE001
        return None
    return None


def check_adapter_base(adapter: str, model: Any, base: str) -> None:
    """Refuse a LoRA ``adapter`` trained on another model than ``model`` (loaded from ``base``).

    peft loads any adapter whose shapes fit, so an adapter trained on, say, the base model of a
    family applied to its instruct model gives offsets that mean nothing, silently. The
    adapter's ``base_model_name_or_path`` is compared with the model's identity: the same name
    (last path part, any case) passes; otherwise, when that base can be read here (a folder, or
    the offline Hugging Face cache), a different architecture, vocabulary, width or depth, or the
    same shapes with different weights, is a :class:`ConfigurationError`. When it cannot be
    decided (no recorded base, a name not available here) a warning says so.
    ``BLACKBOX_PROXY_ADAPTER_BASE_CHECK=off`` turns a refusal into a warning.
    """
    import json
    import os
    from pathlib import Path

    config_path = Path(adapter).expanduser() / "adapter_config.json"
    if not config_path.is_file():
        return  # not a local adapter folder: peft reports that
    try:
        recorded = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return  # peft reports an unreadable config
    ours = {_short_name(base), _short_name(getattr(model.config, "_name_or_path", "") or base)}
    if not recorded:
        logger.warning("the LoRA adapter %s does not say which model it was trained on; make sure it is %s", adapter, base)
        return
    if _short_name(recorded) in ours:
        return
    theirs = _config_of(str(recorded))
    if theirs is None:
        logger.warning("the LoRA adapter %s was trained on %r, which is not available here to compare with %s; "
                       "if %s is not that model, the expert's offsets mean nothing", adapter, recorded, base, base)
        return
    mine = model.config.to_dict()
    differ = [f"{k} {theirs.get(k)!r} vs {mine.get(k)!r}" for k in _IDENTITY if theirs.get(k) != mine.get(k)]
    if not differ:
        weights = _weights_differ(str(recorded), model) if Path(str(recorded)).expanduser().is_dir() else None
        if weights is False:
            return  # the same model under another name
        if weights is None:
            logger.warning("the LoRA adapter %s was trained on %r, a model of the same shapes as %s under another "
                           "name; if it is not the same model, the expert's offsets mean nothing", adapter, recorded, base)
            return
        differ = ["the same shapes, other weights"]
    message = (f"the LoRA adapter {adapter} was trained on {recorded!r}, not on {base!r} ({'; '.join(differ)}); pass "
               f"the model it was trained on as the anti-expert (or set {ADAPTER_CHECK_ENV}=off to load it anyway)")
    if os.environ.get(ADAPTER_CHECK_ENV, "").strip().lower() in ("off", "0", "false", "no"):
        logger.warning("%s", message)
        return
    raise ConfigurationError(message)


def load_scorer(spec: Any, *, device: str | None, render: str, role: str) -> ScoringBackend:
    """``spec`` itself when it is a :class:`Scorer` or another scoring backend
    (:class:`~blackbox_proxy.local.backend.ScoringBackend`), else the model it names, loaded."""
    if isinstance(spec, (Scorer, ScoringBackend)):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ConfigurationError(f"{role} must be a model name/path or a Scorer, got {spec!r}")
    return Scorer.from_pretrained(spec, device=device, render=render, name=spec)


def load_small_models(*, expert: Any, anti_expert: Any, expert_adapter: str | None, device: str | None,
                      expert_render: str, anti_expert_render: str,
                      scorer_url: str | None = None) -> tuple[ScoringBackend, ScoringBackend]:
    """(expert, anti-expert) scorers: two models, or one base with a LoRA adapter on and off; with
    ``scorer_url``, the two models of that name served by vLLM (:mod:`blackbox_proxy.local.vllm_scorer`)."""
    if scorer_url is not None:
        from .vllm_scorer import connect

        return connect(scorer_url, expert=expert, anti_expert=anti_expert, expert_adapter=expert_adapter,
                       expert_render=expert_render, anti_expert_render=anti_expert_render)
    if expert_adapter is not None:
        if expert is not None:
            raise ConfigurationError("pass either an expert model or an expert adapter (over the anti-expert), not both")
        if not isinstance(anti_expert, str):
            raise ConfigurationError("with an expert adapter, anti_expert must be the base model's name or path")
        return Scorer.pair_from_adapter(anti_expert, expert_adapter, device=device, render=anti_expert_render)
    if expert is None:
        raise ConfigurationError("no expert: pass an expert model (--expert) or a LoRA adapter (--expert-adapter)")
    e = load_scorer(expert, device=device, render=expert_render, role="expert")
    a = load_scorer(anti_expert, device=device, render=anti_expert_render, role="anti_expert")
    if not e.vocab.same_as(a.vocab):
        raise TokenizerMismatchError(
            f"expert {e.name!r} and anti-expert {a.name!r} have different tokenizers "
            f"({e.vocab.size} vs {a.vocab.size} ids); use the same small model before and after tuning"
        )
    return e, a
