"""The scoring backend interface: what the tuner and the decoders need of an expert or anti-expert.

Two implementations: :class:`~blackbox_proxy.local.scorer.Scorer` (a Hugging Face model in this
process) and :class:`~blackbox_proxy.local.vllm_scorer.VLLMScorer` (a model, or a LoRA module,
served by a vLLM OpenAI-compatible server). Anything with these attributes and methods can be
passed as ``expert=`` / ``anti_expert=`` to the tuners.

A backend renders prompts to its token ids (:meth:`ScoringBackend.prompt_ids`, shared here as
:func:`render_prompt_ids` for backends with a Hugging Face tokenizer) and opens one
:class:`ScoringSession` per generation. A session answers
``distributions_groups([(continuation_ids, paths), ...])``: for each group, a dict from every
prefix of every path (the root ``()`` included) to the log next-token distribution ``[V]`` after
prompt + continuation + that prefix (float, summing to 1 in probability). The byte aligner reads
one entry at inner nodes and prefix-range sums at the ends of paths, so every node must be a
whole distribution.

Optional: a backend may define ``open_pair(expert_ids, anti, anti_ids, *, batching)`` returning
(expert session, anti-expert session), or None; :func:`~blackbox_proxy.local.sessions.open_sessions`
uses it to score both models in one round (the local scorer pairs its own adapter rows instead).

Left out: the model computation itself (``engine.py``, ``vllm_scorer.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from ..errors import ConfigurationError
from ..tokens.vocab import Vocabulary

Path = tuple[int, ...]
Group = tuple[Sequence[int], Sequence[Path]]


@runtime_checkable
class ScoringSession(Protocol):
    """One generation's context in one small model (see the module docstring)."""

    prompt_ids: list[int]

    def distributions(self, continuation_ids: Sequence[int], paths: Sequence[Path] = ()) -> dict[Path, Any]:
        """``distributions_groups([(continuation_ids, paths)])[0]``."""
        ...

    def distributions_groups(self, groups: Sequence[Group]) -> list[dict[Path, Any]]:
        """Per group, every node (prefix of a path, root included) -> log P(next) as a tensor ``[V]``."""
        ...

    def close(self) -> None:
        """Free what the session holds (KV cache, remembered answers)."""
        ...


@runtime_checkable
class ScoringBackend(Protocol):
    """An expert or anti-expert: a vocabulary, a prompt rendering and sessions.

    Attributes:
        name: shown in traces and messages.
        vocab: the small model's :class:`Vocabulary` (token bytes; the aligner works on it).
        tokenizer: its Hugging Face tokenizer (chat templates for completions-mode messages).
        render: ``"chat"`` or ``"raw"`` (how prompts are rendered).
        max_length: the model's context in tokens, or None when unknown.
    """

    name: str
    vocab: Vocabulary
    tokenizer: Any
    render: str
    max_length: int | None

    def prompt_ids(self, *, prompt: str | None = None, messages: Sequence[dict[str, str]] | None = None) -> list[int]:
        """Token ids of the rendered prompt; the continuation is appended after them."""
        ...

    def session(self, prompt_ids: Sequence[int], *, batching: bool = False) -> ScoringSession:
        """A session for one generation (``batching``: share work with concurrent ones, if the backend can)."""
        ...


def resolve_render(render: str, tokenizer: Any, name: str) -> str:
    """``"chat"`` or ``"raw"`` for a requested ``auto`` | ``chat`` | ``raw``: auto is chat when
    the tokenizer has a chat template."""
    if render not in ("auto", "chat", "raw"):
        raise ConfigurationError(f"render must be 'auto', 'chat' or 'raw', got {render!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if render == "chat" and not has_template:
        raise ConfigurationError(f"{name} has no chat template; use render='raw'")
    return ("chat" if has_template else "raw") if render == "auto" else render


def render_prompt_ids(tokenizer: Any, render: str, name: str, max_length: int | None, *, prompt: str | None = None,
                      messages: Sequence[dict[str, str]] | None = None) -> list[int]:
    """Token ids of a prompt as a backend with a Hugging Face ``tokenizer`` renders it.

    Chat messages are rendered with the tokenizer's chat template whatever ``render`` says (they
    have no raw form); without a template, ``prompt`` (the hosted model's rendering) is used.
    A text prompt is rendered as ``render`` says."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if render == "chat" or (messages is not None and has_template):
        if messages is None:
            messages = [{"role": "user", "content": prompt or ""}]
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    else:
        if prompt is None:
            raise ConfigurationError(f"{name} renders raw text (no chat template): pass prompt=TEXT, not messages")
        ids = list(tokenizer.encode(prompt, add_special_tokens=True))
    if not ids:
        raise ConfigurationError(f"the prompt renders to no tokens for {name}; pass a non-empty prompt")
    if max_length and len(ids) >= max_length:
        raise ConfigurationError(
            f"the prompt is {len(ids)} tokens for {name}, whose context is {max_length}; shorten it"
        )
    return ids
