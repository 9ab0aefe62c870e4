"""DeepSeek and Mistral: chat-prefix through ``prefix: true`` on the assistant message.

Both are detected from their name in the host name of the base URL. What it leaves out: their
other API features (FIM, JSON mode); DeepSeek's cap of 20 top logprobs is the only other
difference that matters here.
"""

from __future__ import annotations

from typing import Any

from ... import _constants as C
from ...types import MODES
from . import Dialect, register


def _prefix_message(prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return {"role": "assistant", "content": prefix, "prefix": True}, {}


register(Dialect(
    name="deepseek",
    note="chat-prefix through prefix: true on the assistant message; up to 20 top logprobs",
    host_words=("deepseek",),
    detect_order=10,
    top_k_caps=dict.fromkeys(MODES, C.OPENAI_CHAT_MAX_TOP_LOGPROBS),
    continue_prefix=_prefix_message,
))

register(Dialect(
    name="mistral",
    note="chat-prefix through prefix: true on the assistant message",
    host_words=("mistral",),
    detect_order=20,
    continue_prefix=_prefix_message,
))
