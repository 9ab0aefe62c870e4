"""The resample strategy: proxy tuning for APIs that cannot continue a partial answer (DESIGN.md §2.3).

Chat-only APIs (OpenAI's chat models among them) return whole answers; token-by-token proxy
tuning stops after the first token there. This strategy asks for ``n`` whole answers at
temperature 1 and top_p 1 with top-k logprobs at every position (one call with ``n`` choices,
several when the host caps ``n``), scores every position of every answer with the expert and
anti-expert (one batched forward per answer per model) up to where the answer ends (its end
token, or the token completing a stop string: the API is not sent the stop strings, so its
answers may run on, unscored and unkept), and picks one answer by
sampling-importance-resampling with the decoder's seeded generator. The weights log W_i, the
pick and the effective sample size (ESS) are the maths of :mod:`blackbox_proxy.maths.importance`.
When the ESS is low the pick is little better than one sample, and the trace and a warning say
so, with the remedies (more samples, shorter answers, a smaller alpha).

Works in every mode: it only needs whole samples. Left out: exact rejection sampling (it needs a
bound on W that top-k logprobs cannot give).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import torch

from .. import _constants as C
from ..errors import HostedResponseError
from ..maths.importance import effective_sample_size, normalised_weights, sequence_log_weight, sir_pick
from ..types import GenerationResult, HostedRequest, HostedResult, SampleTrace, Usage
from .base import DecoderBase

logger = logging.getLogger(__name__)

MAX_N_PER_CALL = C.MAX_CHOICES_PER_CALL  # choices asked per API call; more samples take several calls
LOW_ESS_FRACTION = 0.1  # warn when ESS < max(LOW_ESS_MIN, this * n)
LOW_ESS_MIN = 1.5


class ResampleDecoder(DecoderBase):
    """SIR over ``params.samples`` whole answers drawn by the API. See the module docstring."""

    def __init__(self, *, samples: int, max_per_call: int = MAX_N_PER_CALL, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_per_call = max(1, max_per_call)
        self.whole_answers = True  # chat mode: the picked answer is kept whole
        self.samples = samples
        self.choices: list[HostedResult] = []
        self.sample_traces: list[SampleTrace] = []
        self.ess: float | None = None
        self.with_normaliser = True  # tests switch it off to show the wrong weight is worse

    def request(self) -> HostedRequest:
        n = min(self.max_per_call, self.samples - len(self.choices))
        seed = int(torch.randint(0, 2**31 - 1, (), generator=self.generator))
        request = self._request(max_tokens=self.params.max_tokens, temperature=1.0, seed=seed)
        return dataclasses.replace(request, n=n)

    def observe(self, results: Sequence[HostedResult], api_seconds: float) -> None:
        if not results:
            raise HostedResponseError("the hosted API returned no choices; the resample strategy needs whole answers")
        self._count_call(results[0], api_seconds)
        self.choices.extend(results)
        if len(self.choices) >= self.samples:
            self._pick()

    def _pick(self) -> None:
        started = time.perf_counter()
        alpha = self.params.alpha
        log_weights, scored = [], []
        for choice in self.choices:
            positions = [p for p in choice.positions if p.sampled is not None and p.candidates]
            items, before, ids = [], self.continuation, list(self.hosted_ids) if self.hosted_ids is not None else None
            chosen = []
            for pos in positions:
                cands = list(pos.candidates)
                index = next((i for i, c in enumerate(cands) if c is pos.sampled or c == pos.sampled), None)
                if index is None:
                    break
                items.append((before, list(ids) if ids is not None else None, cands))
                chosen.append(index)
                if self._answer_ends(before, pos.sampled):
                    break
                before += pos.sampled.data
                if ids is not None:
                    ids = ids + [pos.sampled.token_id] if pos.sampled.token_id is not None else None
            if items:  # one batched forward per answer and model (its positions are nested)
                out, _ = self._score_positions(items)
            else:
                out = []
            hosted = [torch.tensor([c.logprob for c in cands], dtype=torch.float64) for _, _, cands in items]
            lp_e = [torch.tensor(e, dtype=torch.float64) for e, _ in out]
            lp_a = [torch.tensor(a, dtype=torch.float64) for _, a in out]
            log_weights.append(sequence_log_weight(hosted, lp_e, lp_a, chosen, alpha,
                                                   with_normaliser=self.with_normaliser))
            scored.append([items[t][2][chosen[t]] for t in range(len(items))])
        lw = torch.tensor(log_weights, dtype=torch.float64)
        self.ess = effective_sample_size(lw) if len(lw) else 0.0
        probs = normalised_weights(lw)
        picked = sir_pick(probs, self.generator)
        threshold = max(LOW_ESS_MIN, LOW_ESS_FRACTION * len(lw))
        notes = []
        if self.ess < threshold:
            note = (f"effective sample size {self.ess:.2f} of {len(lw)} samples: the pick is little better than one "
                    "sample; use more samples, shorter answers, or a smaller alpha")
            notes.append(note)
            logger.warning(note)
        for i, (choice, lwi) in enumerate(zip(self.choices, log_weights)):
            self.sample_traces.append(SampleTrace(text=choice.text, log_weight=lwi, weight=float(probs[i]),
                                                  tokens=len(scored[i]), finish_reason=choice.finish_reason,
                                                  picked=i == picked,
                                                  token_ids=tuple(c.token_id for c in scored[i])))
        for cand in scored[picked]:
            if self.done:
                break
            self._append(cand)
        if not self.done:
            self.finish_reason = self.choices[picked].finish_reason or "length"
        self.usage = self.usage + Usage(generated_tokens=self.generated, scoring_seconds=time.perf_counter() - started)
        self.notes = notes

    def _answer_ends(self, before: bytes, sampled) -> bool:
        """Whether the answer ends at this token (an end token, or its bytes complete a stop
        string). The weight is that of the answer as kept: tokens the API drew past the end
        are not scored (what follows would only add variance to the weights, and scoring time)."""
        return sampled.is_end or self._cut_at_stop(before + sampled.data) is not None

    def result(self) -> GenerationResult:
        base = super().result()
        return dataclasses.replace(base, samples=tuple(self.sample_traces), ess=self.ess,
                                   notes=tuple(getattr(self, "notes", ())))

