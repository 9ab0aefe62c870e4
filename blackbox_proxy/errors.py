"""One error tree for the whole library.

Every error a user can cause is a subclass of :class:`ProxyTuningError` and its message is one
line that says what to do next. The CLI prints ``error: <message>`` and exits non-zero.
"""

from __future__ import annotations


class ProxyTuningError(Exception):
    """Root of every error raised on purpose by blackbox_proxy."""


class ConfigurationError(ProxyTuningError, ValueError):
    """An argument or option has a value the library cannot use (alpha, top_k, prompt...).
    ``field``: the option at fault when one is (a server names it as the error's ``param``)."""

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ContextLimitError(ConfigurationError):
    """A text does not fit a model's context (a small model's, or the hosted one's). Raised
    mid-generation, the tuner stops there with ``finish_reason="length"`` instead."""


class ModeNotSupportedError(ConfigurationError):
    """The hosted mode cannot do what was asked (e.g. continue a partial answer in ``chat``)."""


class TokenizerMismatchError(ConfigurationError):
    """Two models that must share a tokenizer do not."""


class ModelLoadError(ProxyTuningError):
    """A local model or tokenizer could not be loaded."""


class HostedAPIError(ProxyTuningError):
    """The hosted (OpenAI-compatible) API failed or answered something unusable."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class HostedConnectionError(HostedAPIError):
    """The hosted API could not be reached (refused, DNS, timeout)."""


class HostedAuthenticationError(HostedAPIError):
    """The hosted API rejected the API key (401/403)."""


class HostedModelNotFoundError(HostedAPIError):
    """The hosted API does not serve the requested model."""


class HostedBadRequestError(HostedAPIError):
    """The hosted API refused the request (400/422), e.g. more top logprobs than it allows."""


class HostedRateLimitError(HostedAPIError):
    """The hosted API kept answering 429 after every retry."""


class HostedResponseError(HostedAPIError):
    """The hosted API answered, but without the logprobs the method needs."""


class ScorerBackendError(ProxyTuningError):
    """A remote scoring backend (``--scorer-url``, e.g. vLLM) failed or answered something
    unusable in the middle of a generation."""
