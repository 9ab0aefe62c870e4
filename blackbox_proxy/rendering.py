"""How the prompt is rendered for each model (README, "Prompt rendering").

- The small models' ``auto`` rendering follows the hosted prompt (:func:`auto_render`): raw text in
  ``completions`` mode, their chat template in the chat modes, so all three models continue the
  same context. An adapter pair is one model with one rendering (:func:`adapter_render`).
- Chat messages sent to a ``completions`` host are rendered for it with a chat template
  (:func:`hosted_chat_text`): the one given, else the hosted tokenizer's, else the expert's, as
  Liu et al. did for base models; the small models render messages with their own templates
  (``Scorer.prompt_ids``).
- :func:`renderings_disagree`: chat-rendered small models that find the raw hosted prompt's own
  candidates implausible (a warning then says what to pass).

Left out: the templates themselves (the tokenizers') and tokenisation (``tokens/``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigurationError
from .tokens.loaders import render_chat
from .tokens.vocab import Vocabulary

# nats: the anti-expert's cross-entropy on the hosted candidates that calls for a warning; measured
# on the embedded pair: 2.8 and 3.1 on the demo's one-shot prompts, 9.4 to 18.2 on plain prompts
CONTEXT_MISMATCH = 8.0
MISMATCH_WARNING = (
    "the expert/anti-expert render the prompt with a chat template while the hosted model continues raw text "
    "(completions mode), and the anti-expert finds the hosted model's own candidates implausible; for plain "
    "prompts leave --expert-render/--anti-expert-render at auto (raw here), or use --mode chat-prefix")


def auto_render(render: str, mode: str) -> str:
    """``auto`` follows the hosted prompt: raw in completions mode, else the chat template."""
    return "raw" if render == "auto" and mode == "completions" else render


def adapter_render(expert_render: str, anti_expert_render: str, mode: str) -> str:
    """An adapter pair is one model with one rendering: an explicit choice wins over ``auto``."""
    chosen = {expert_render, anti_expert_render} - {"auto"}
    if len(chosen) > 1:
        raise ConfigurationError("with an expert adapter both small models are one model and share one prompt "
                                 f"rendering; got expert {expert_render!r} and anti-expert {anti_expert_render!r}")
    return auto_render(chosen.pop() if chosen else "auto", mode)


def read_template(template: str | None) -> str | None:
    """A chat template given as its text (it holds ``{``) or as the path of a file holding it."""
    if template is None or "{" in template:
        return template
    try:
        return Path(template).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read the chat template file {template} ({exc.strerror}); pass a "
                                 "Jinja template or the path of a file holding one") from None


def hosted_chat_text(messages: Sequence[dict[str, str]], *, template: str | None, hosted_vocab: Vocabulary | None,
                     expert_tokenizer: Any) -> str:
    """``messages`` as the text a completions host continues (its reply follows)."""
    if template is not None:
        return render_chat(expert_tokenizer, list(messages), template)
    if hosted_vocab is not None and hosted_vocab.render_chat is not None:
        return hosted_vocab.render_chat(list(messages))
    if getattr(expert_tokenizer, "chat_template", None):
        return render_chat(expert_tokenizer, list(messages))
    raise ConfigurationError("chat messages for a completions host need a chat template, and neither the hosted "
                             "tokenizer nor the expert has one; pass chat_template= (--chat-template FILE)")


def renderings_disagree(renders: Iterable[str], first_candidates: Iterable[Any]) -> bool:
    """Whether chat-rendered small models see a context other than the hosted model's: the
    anti-expert's cross-entropy on the hosted candidates of the first position, weighted by their
    hosted probability, is above :data:`CONTEXT_MISMATCH`."""
    if set(renders) == {"raw"}:
        return False
    pairs = [(math.exp(c.hosted_logprob), -c.anti_expert_logprob) for c in first_candidates
             if math.isfinite(c.anti_expert_logprob)]
    mass = sum(p for p, _ in pairs)
    return mass > 0 and sum(p * x for p, x in pairs) / mass > CONTEXT_MISMATCH
