"""Which strategy runs a generation: the one asked, or for ``auto`` the cheapest exact one the host allows.

``auto`` (the default) chooses, for each generation, from what it asks and what the host allows:

- a host that continues a prefix (``completions``, ``chat-prefix``), temperature 0 or 1 and
  top_p 1: **speculative**. One call drafts a chunk, about 0.25-0.3 calls per token on the
  embedded tasks instead of per-step's one; greedy speculative keeps exactly per-step greedy's
  tokens (both take the tuned argmax at every position, the tail included where it can be
  asked about), and sampled speculative draws from the full proxy-tuned distribution;
- other temperatures or top_p < 1: **per-step** (the only strategy that renormalises them);
- a host that cannot continue (plain ``chat``): answers are continued by instruction
  (:mod:`.instructed`): greedy, **speculative** over the host's copies-and-drafts; otherwise
  **per-step**, one position after each copy.

:data:`DECODERS` maps each strategy to its decoder class.

Left out: the strategies themselves.
"""

from __future__ import annotations

from ..request import GenerationRequest
from ..types import HostCapabilities
from .per_step import PerStepDecoder
from .resample import ResampleDecoder
from .speculative import SpeculativeDecoder

DECODERS: dict[str, type] = {"per-step": PerStepDecoder, "speculative": SpeculativeDecoder,
                             "resample": ResampleDecoder}


def choose(params: GenerationRequest, host: HostCapabilities) -> tuple[str, str]:
    """The strategy ``params`` runs on ``host``, and why (for the trace and ``-v``).

    >>> from blackbox_proxy.types import HostCapabilities
    >>> choose(GenerationRequest.build(prompt="x"), HostCapabilities(mode="completions"))[0]
    'speculative'
    >>> choose(GenerationRequest.build(prompt="x", temperature=0.7), HostCapabilities(mode="completions"))[0]
    'per-step'
    """
    if params.strategy != "auto":
        return params.strategy, "asked"
    if not host.continues_prefix:
        if params.temperature == 0 and params.top_p == 1.0:
            return "speculative", ("the host cannot continue a partial answer: continued by instruction (it copies "
                                   "the answer so far, then drafts on), chunks walked greedily")
        return "per-step", ("the host cannot continue a partial answer: continued by instruction, one tuned "
                            "position per call (a sampled chunk's copy would need the host's own unbiased draws)")
    if params.temperature in (0.0, 1.0) and params.top_p == 1.0:
        how = "greedy: per-step's tokens" if params.temperature == 0 else "sampling the full tuned distribution"
        return "speculative", f"the host continues a prefix: chunks of drafts, a fraction of a call per token ({how})"
    return "per-step", (f"temperature {params.temperature:g}, top_p {params.top_p:g}: per-step renormalises them "
                        "(speculative is exact at temperature 0 or 1, top_p 1)")
