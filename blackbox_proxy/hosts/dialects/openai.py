"""OpenAI's own API: token-id prompts, its caps on top logprobs and logit_bias, no assistant prefix.

Detected from ``openai.com`` in the host name (after every other dialect had its chance: a
server that names itself in ``/v1/models`` wins). What it leaves out: everything else is the
plain wire format, which is OpenAI's. ``logit_bias`` takes up to 300 entries and, since early
2024, does not change the returned logprobs (the speculative strategy's tail probes rely on it).
"""

from __future__ import annotations

from ... import _constants as C
from . import OPENAI_MAX_LOGIT_BIAS, Dialect, register

register(Dialect(
    name="openai",
    note="completions: up to 5 logprobs, token-id prompts; chat: up to 20 top logprobs; no assistant prefix; "
         "logit_bias up to 300 entries; streams logprobs",
    host_words=("openai.com",),
    detect_order=90,
    token_prompts=True,
    logit_bias_cap=OPENAI_MAX_LOGIT_BIAS,
    streams_logprobs=True,
    top_k_caps={"completions": C.OPENAI_COMPLETIONS_MAX_LOGPROBS, "chat-prefix": C.OPENAI_CHAT_MAX_TOP_LOGPROBS,
                "chat": C.OPENAI_CHAT_MAX_TOP_LOGPROBS},
))
