"""Numbers that cross modules: retry policy, API caps and numerical floors, in one place."""

from __future__ import annotations

# Retry policy of the hosted client (the only retry layer; the SDK's own retries are off).
MAX_RETRIES = 4  # attempts after the first one
INITIAL_RETRY_DELAY = 0.5  # seconds; doubled each attempt
MAX_RETRY_DELAY = 8.0  # one wait never exceeds this
MAX_TOTAL_RETRY_WAIT = 60.0  # give up once this much time went to waiting
MAX_CHOICES_PER_CALL = 16  # choices (n) asked per API call; this project's server caps n at 16
MAX_RETRY_AFTER = 30.0  # a server's retry-after is honoured up to this many seconds
MALFORMED_RESPONSE_RETRIES = 1  # a 200 with missing/truncated logprobs is asked again this often
RETRY_JITTER = 0.25  # +- fraction of each delay
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
DEFAULT_TIMEOUT = 60.0  # seconds per HTTP request

# What OpenAI-style APIs allow.
DEFAULT_TOP_K = 20
OPENAI_CHAT_MAX_TOP_LOGPROBS = 20
OPENAI_COMPLETIONS_MAX_LOGPROBS = 5
# Logprob values at or below this are sentinels ("very unlikely, not measured"), not numbers.
LOGPROB_SENTINEL = -9000.0

# Numerical floor for aligned probabilities: log P never goes below log(PROB_FLOOR).
PROB_FLOOR = 1e-12

# Strings that hosts use for end-of-text tokens when the hosted vocabulary is unknown.
END_TOKEN_STRINGS = frozenset(
    {
        "<|endoftext|>",
        "</s>",
        "<eos>",
        "<|im_end|>",
        "<|eot_id|>",
        "<|end_of_text|>",
        "<end_of_turn>",
        "<|end|>",
        "<|return|>",
    }
)
