"""Context limits: a generation that cannot fit is refused before the first paid call
(:func:`check_fits`, used by the tuner's ``check_request`` for the expert, the anti-expert and the
hosted model when its context is known), and one that outgrows a context after paid calls ends
there with ``finish_reason="length"`` and the text so far (:func:`stop_at_context`).

Left out: where the lengths come from (the scorers' ``max_length``, the hosted ``max_model_len``
found by ``hosts/discover.py``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .errors import ConfigurationError, ContextLimitError, HostedBadRequestError

if TYPE_CHECKING:
    from .decoding.base import DecoderBase

logger = logging.getLogger(__name__)


def check_fits(who: str, prompt_tokens: int, max_tokens: int, context: int | None) -> None:
    """Refuse before the first paid call a generation that cannot fit ``who``'s context."""
    if context and prompt_tokens + max_tokens > context:
        room = context - prompt_tokens
        fix = f"pass max_tokens {room} or less" if room > 0 else "shorten the prompt"
        raise ConfigurationError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is more than "
                                 f"the context of {who} ({context} tokens); {fix}")


def is_context_limit(exc: BaseException) -> bool:
    """Whether ``exc`` says a text outgrew a model's context: a small model's
    (:class:`ContextLimitError`) or the hosted one's (its 400 "maximum context length...", as
    OpenAI, vLLM and llama.cpp word it)."""
    if isinstance(exc, ContextLimitError):
        return True
    text = str(exc).lower()
    return isinstance(exc, HostedBadRequestError) and "context" in text and any(
        word in text for word in ("maximum", "length", "exceed", "too long", "too many tokens"))


def stop_at_context(decoder: DecoderBase, exc: BaseException, paid: bool) -> None:
    """End ``decoder`` with ``finish_reason="length"`` (the text so far) when ``exc`` is a context
    limit reached after paid calls; otherwise re-raise it. The decoders change no state before
    :meth:`observe` appends, so the text so far is consistent."""
    if not paid or not is_context_limit(exc):
        raise exc
    logger.warning("the generation reached a model's context limit after %d tokens; it stops there "
                   "(finish_reason length): %s", decoder.generated, exc)
    decoder.finish_reason = "length"
