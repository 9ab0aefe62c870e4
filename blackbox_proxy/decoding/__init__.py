"""Decoding strategies: state machines that ask for hosted requests and observe answers (no I/O).

The tuners drive them: ``request()`` gives the next :class:`~blackbox_proxy.types.HostedRequest`,
``observe(results, api_seconds)`` takes the answer, ``done`` and ``result()`` end it.
``base`` holds what they share; ``per_step``, ``speculative`` and ``resample`` are the
strategies. Left out: the maths they call (:mod:`blackbox_proxy.maths`) and all I/O.
"""

from .base import DecodeParams, DecoderBase
from .per_step import PerStepDecoder
from .resample import ResampleDecoder
from .speculative import SpeculativeDecoder

__all__ = ["DecodeParams", "DecoderBase", "PerStepDecoder", "ResampleDecoder", "SpeculativeDecoder"]
