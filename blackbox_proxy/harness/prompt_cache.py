"""A provider's prompt cache, as it bills: the yardstick for cached input tokens in a replay.

OpenAI and DeepSeek bill the part of a prompt that repeats the start of an earlier prompt at a
discount, and report it (OpenAI: ``usage.prompt_tokens_details.cached_tokens``; DeepSeek:
``prompt_cache_hit_tokens``). Proxy tuning's calls continue one prompt (each chunk call's prompt
is the previous one plus the tokens kept), so most of its prompt tokens are such repeats. A
replayed answer carries the count its recording had (or none); :class:`PromptCache` gives the
count a provider would report instead, from the requests the replay host sees:

- the longest prefix the prompt shares with an earlier request's prompt (token ids when the
  prompt is ids; characters scaled to the prompt's token count when it is text or messages),
- counted in whole blocks of ``block`` tokens, and only from ``minimum`` tokens on.

Rules (:data:`RULES`): ``openai`` (1,024 tokens, blocks of 128: OpenAI's documented rule),
``deepseek`` (blocks of 64), ``exact`` (every shared token: what ``serve-model`` reports from its
KV cache). Left out: eviction after minutes of disuse, and caches shared between API keys.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError
from ..tokens.vocab import common_prefix

RULES = {"openai": (1024, 128), "deepseek": (64, 64), "exact": (1, 1)}


def prompt_units(body: Any) -> tuple[str, Any] | None:
    """What a generation request's prompt is made of: ("ids", tuple) for a token-id prompt,
    ("text", str) for text or chat messages; None when it has no prompt."""
    if not isinstance(body, dict):
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return "ids", tuple(prompt)
    if isinstance(prompt, str):
        return "text", prompt
    messages = body.get("messages")
    if isinstance(messages, list):
        return "text", "".join(json.dumps(m, sort_keys=True, ensure_ascii=False) for m in messages)
    return None


@dataclass
class PromptCache:
    """See the module docstring. ``keep``: how many earlier prompts are remembered.

    >>> cache = PromptCache.named("deepseek")
    >>> cache.cached({"prompt": list(range(200))}, 200), cache.cached({"prompt": list(range(150)) + [0]}, 151)
    (0, 128)
    """

    minimum: int = 1024
    block: int = 128
    keep: int = 4096
    _seen: deque = field(default_factory=deque, repr=False)

    def __post_init__(self) -> None:
        if self.minimum < 1 or self.block < 1:
            raise ConfigurationError(f"a prompt cache needs minimum >= 1 and block >= 1, got {self.minimum}, {self.block}")
        self._seen = deque(maxlen=self.keep)

    @classmethod
    def named(cls, rule: str) -> "PromptCache":
        if rule not in RULES:
            raise ConfigurationError(f"unknown prompt cache rule {rule!r}; use one of {', '.join(RULES)}")
        minimum, block = RULES[rule]
        return cls(minimum=minimum, block=block)

    def cached(self, body: Any, prompt_tokens: int) -> int:
        """The prompt tokens of the request ``body`` a provider would bill as cached (then remember
        its prompt). ``prompt_tokens``: the prompt's length in tokens (the answer's usage)."""
        found = prompt_units(body)
        if found is None or prompt_tokens <= 0:
            return 0
        kind, units = found
        shared = max((common_prefix(units, earlier) for k, earlier in self._seen if k == kind), default=0)
        self._seen.append((kind, units))
        tokens = shared if kind == "ids" else int(shared * prompt_tokens / max(1, len(units)))
        tokens = min(tokens, prompt_tokens)
        return 0 if tokens < self.minimum else tokens // self.block * self.block
