"""vLLM (and this project's own server, which speaks its dialect).

Special tokens kept in the output (else an end token prints as ``""``), hosted token ids in the
answers when the hosted tokenizer is known (``token_id:N``: exact ids, no lossy bytes for
partial characters), token-id prompts, and ``continue_final_message`` for chat-prefix.
Detected from ``owned_by`` in ``/v1/models``. ``logit_bias`` biases the draw only (vLLM returns
the raw model's logprobs; this project's server does the same); no cap of its own, OpenAI's 300 is
used so that measurements here carry over. What it leaves out: ``--max-logprobs`` on the server
caps k (20 by default); the server says so when asked for more.
"""

from __future__ import annotations

from typing import Any

from . import OPENAI_MAX_LOGIT_BIAS, Dialect, register


def _body(vocab: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"skip_special_tokens": False}
    if vocab is not None:
        body["return_tokens_as_token_ids"] = True  # read back through the hosted tokenizer
    return body


def _continue(prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return ({"role": "assistant", "content": prefix},
            {"continue_final_message": True, "add_generation_prompt": False})


register(Dialect(
    name="vllm",
    note="skip_special_tokens false, return_tokens_as_token_ids (with the hosted tokenizer), token-id "
         "prompts, continue_final_message for chat-prefix, usage with every streamed event; --max-logprobs caps k (20 by default)",
    owners=frozenset({"vllm", "blackbox-proxy"}),
    detect_order=30,
    body_defaults=_body,
    token_prompts=True,
    logit_bias_cap=OPENAI_MAX_LOGIT_BIAS,
    continue_prefix=_continue,
    streams_logprobs=True,
    stream_options={"include_usage": True, "continuous_usage_stats": True},  # usage with every event
))
