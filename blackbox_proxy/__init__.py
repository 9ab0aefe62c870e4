"""blackbox_proxy: proxy-tune a hosted LLM behind an OpenAI-style API with small local models.

Public API (everything else is internal)::

    from blackbox_proxy import ProxyTuner
    tuner = ProxyTuner(base_url=..., model=..., expert=..., anti_expert=...)
    print(tuner.generate(prompt="...", max_tokens=32).text)
"""

from .aligner import Aligner
from .errors import (
    ConfigurationError,
    HostedAPIError,
    HostedAuthenticationError,
    HostedBadRequestError,
    HostedConnectionError,
    HostedModelNotFoundError,
    HostedRateLimitError,
    HostedResponseError,
    ModeNotSupportedError,
    ModelLoadError,
    ProxyTuningError,
    TokenizerMismatchError,
)
from .hosted import AsyncHostedClient, HostedClient
from .scorer import Scorer
from .tuner import AsyncProxyTuner, ProxyTuner
from .types import (
    Candidate,
    GenerationResult,
    HostedPosition,
    HostedRequest,
    HostedResult,
    StepTrace,
    StreamEvent,
    Usage,
)
from .batch import arun_batch, run_batch
from .cache import ResponseCache
from .vocab import Vocabulary, load_hosted_vocabulary

__version__ = "0.1.0"

__all__ = [
    "Aligner",
    "AsyncHostedClient",
    "AsyncProxyTuner",
    "Candidate",
    "ConfigurationError",
    "GenerationResult",
    "HostedAPIError",
    "HostedAuthenticationError",
    "HostedBadRequestError",
    "HostedClient",
    "HostedConnectionError",
    "HostedModelNotFoundError",
    "HostedPosition",
    "HostedRateLimitError",
    "HostedRequest",
    "HostedResponseError",
    "HostedResult",
    "ModeNotSupportedError",
    "ModelLoadError",
    "ProxyTuner",
    "ProxyTuningError",
    "Scorer",
    "StepTrace",
    "StreamEvent",
    "ResponseCache",
    "arun_batch",
    "run_batch",
    "TokenizerMismatchError",
    "Usage",
    "Vocabulary",
    "load_hosted_vocabulary",
]
