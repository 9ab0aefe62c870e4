"""blackbox_proxy: proxy-tune a hosted LLM behind an OpenAI-style API with small local models.

Public API (everything else is internal)::

    from blackbox_proxy import ProxyTuner
    tuner = ProxyTuner(base_url=..., model=..., expert=..., anti_expert=...)
    print(tuner.generate(prompt="...", max_tokens=32).text)

Names are imported on first use, so ``import blackbox_proxy`` (and ``blackbox-proxy --help``)
loads neither torch nor transformers.
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it (relative to this package)
_EXPORTS = {
    "Aligner": "tokens.aligner",
    "AsyncHostedClient": "hosts.client",
    "AsyncProxyTuner": "tuner",
    "Candidate": "types",
    "ConfigurationError": "errors",
    "GenerationRequest": "request",
    "GenerationResult": "types",
    "HostedAPIError": "errors",
    "HostedAuthenticationError": "errors",
    "HostedBadRequestError": "errors",
    "HostedClient": "hosts.client",
    "HostedConnectionError": "errors",
    "HostedModelNotFoundError": "errors",
    "HostedPosition": "types",
    "HostedRateLimitError": "errors",
    "HostedRequest": "types",
    "HostedResponseError": "errors",
    "HostedResult": "types",
    "ModeNotSupportedError": "errors",
    "ModelLoadError": "errors",
    "ProxyTuner": "tuner",
    "ProxyTuningError": "errors",
    "ResponseCache": "hosts.cache",
    "Scorer": "local.scorer",
    "StepTrace": "types",
    "StreamEvent": "types",
    "TokenizerMismatchError": "errors",
    "Usage": "types",
    "Vocabulary": "tokens.vocab",
    "WhiteBoxTuner": "whitebox",
    "arun_batch": "apps.batch",
    "load_hosted_vocabulary": "tokens.loaders",
    "run_batch": "apps.batch",
    "teacher_force": "decoding.forcing",
    "teacher_force_async": "decoding.forcing",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

