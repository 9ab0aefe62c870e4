"""Decoding strategies: state machines that ask for hosted requests and observe answers (no I/O).

A decoder is built whole from what the generation asks (a
:class:`~blackbox_proxy.request.GenerationRequest`), what the host allows
(:class:`~blackbox_proxy.types.HostCapabilities`), the small models' :class:`~.scoring.Scoring`
and the :class:`~.prefix.HostedPrompt`. The drivers (``driver.py``) run it: ``request()`` gives
the next :class:`~blackbox_proxy.types.HostedRequest`, ``observe(results, api_seconds)`` takes the
answer, ``done`` and ``result()`` end it.

``prefix`` and ``scoring`` are the values every strategy, teacher forcing (``forcing.py``) and
the fidelity harness share; ``base`` holds the decoder state; ``per_step``, ``speculative`` and
``resample`` are the strategies, ``strategies`` says which one runs (``auto``: the cheapest exact
one the host allows); ``walks/`` the ways a speculative chunk is walked. Left out:
the maths they call (:mod:`blackbox_proxy.maths`) and all I/O.
"""

from .base import Decoder
from .per_step import PerStepDecoder
from .prefix import HostedPrompt, Prefix
from .resample import ResampleDecoder
from .scoring import Offsets, Scoring
from .speculative import SpeculativeDecoder
from .strategies import DECODERS, choose

__all__ = ["DECODERS", "Decoder", "HostedPrompt", "Offsets", "PerStepDecoder", "Prefix", "ResampleDecoder", "Scoring",
           "SpeculativeDecoder", "choose"]
