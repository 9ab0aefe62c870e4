"""The per-step strategy: one hosted API call per generated token (DESIGN.md §2.3).

At each step:

1. the API returns the top-k candidates C (plus the sampled token) with hosted logprobs;
2. each small model gives log P_M(v | s) for every v in C: directly by token id when it shares
   the hosted tokenizer (exact), otherwise through the byte aligner (:mod:`.scoring`);
3. p^ = softmax_C(logprob_L + alpha * (logprob_E - logprob_A)) / T, top-p, or argmax at T = 0
   (:mod:`blackbox_proxy.maths.combiner`);
4. the chosen token's bytes are appended; end-of-text, a stop string or ``max_tokens`` ends it.

Greedy (T = 0) reaches past the top-k where it can (:mod:`.tail`: one tokenizer, a host that
honours ``logit_bias``): where a token outside C may beat C's argmax, one more call asks the
host which, and the step takes the argmax over the whole vocabulary; ``usage.tail_calls`` counts
those calls. Sampling renormalises over C.

On a plain chat host, which cannot continue a partial answer, each position after the first is
asked by instruction (:mod:`.instructed`): the host copies the answer so far and the position
after the copy is the one tuned.

Per-step requests are made at temperature 0 (the sampled token is then the top-1, already among
the candidates): per-step decoding needs the candidates' logprobs, not the server's draw.

Left out: the shared machinery (requests, scoring, appending: ``base.py``) and, when sampling,
any mass outside the top-k, which this strategy renormalises away (the speculative strategy
keeps it).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..types import HostedRequest, HostedResult, StepTrace
from . import instructed
from .base import Decoder


class PerStepDecoder(Decoder):
    """One hosted API call per generated token. See the module docstring."""

    def request(self) -> HostedRequest:
        return self._asking_tail() or self._asking_character() or self._request(max_tokens=1, temperature=0.0)

    @property
    def prefetch_useful(self) -> bool:
        return self._tail is None and self._character is None  # those answers need no scoring

    def observe(self, results: Sequence[HostedResult], api_seconds: float) -> StepTrace | None:
        """Consume the API's answer to :meth:`request`: score, choose (or ask about the tail), append."""
        if self._tail is not None:
            return self._settle_tail(results, api_seconds)
        if self._character is not None:
            return self._settle_character(results, api_seconds)
        if self._not_copied(results, api_seconds):
            return None
        result = instructed.first_copied(results)
        notes: list[str] = [self.copies.settle()] if self.copies.level else []
        self._count_call(result, api_seconds)
        if not result.positions:
            self._ended_without_logprobs()
            return None
        if self._end_hidden:
            notes.append("the API ended without logprobs; re-asked with the end token banned from its draw")
            self._end_hidden = False
        return self._choose(result.positions[0], api_seconds, notes, self.params.temperature, self.params.top_p)
