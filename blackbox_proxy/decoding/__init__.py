"""Decoding strategies: state machines that ask for hosted requests and observe answers (no I/O).

The tuners drive them: ``request()`` gives the next :class:`~blackbox_proxy.types.HostedRequest`,
``observe(results, api_seconds)`` takes the answer, ``done`` and ``result()`` end it.
"""

from .base import DecodeParams, DecoderBase, PerStepDecoder
from .resample import ResampleDecoder
from .speculative import SpeculativeDecoder

__all__ = ["DecodeParams", "DecoderBase", "PerStepDecoder", "ResampleDecoder", "SpeculativeDecoder"]
