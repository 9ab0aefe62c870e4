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

from ..errors import HostedResponseError
from ..maths.importance import effective_sample_size, normalised_weights, sequence_log_weight, sir_pick
from ..types import GenerationResult, HostedRequest, HostedResult, SampleTrace, Usage
from .base import Decoder
from .prefix import Prefix

logger = logging.getLogger(__name__)

DEFAULT_SAMPLES = 16  # answers drawn when the request gives no ``samples``
LOW_ESS_FRACTION = 0.1  # warn when ESS < max(LOW_ESS_MIN, this * n)
LOW_ESS_MIN = 1.5


class ResampleDecoder(Decoder):
    """SIR over ``params.samples`` whole answers (default 16) drawn by the API, at most
    ``host.max_choices`` per call. See the module docstring. ``with_normaliser=False`` weighs
    answers by the wrong rule (no log Z_t: what a test shows is worse)."""

    def __init__(self, params, *, with_normaliser: bool = True, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.samples = params.samples or DEFAULT_SAMPLES
        self.choices: list[HostedResult] = []
        self.sample_traces: list[SampleTrace] = []
        self.ess: float | None = None
        self.notes: list[str] = []
        self.with_normaliser = with_normaliser

    def request(self) -> HostedRequest:
        n = min(max(1, self.host.max_choices), self.samples - len(self.choices))
        seed = int(torch.randint(0, 2**31 - 1, (), generator=self.generator))
        return self._request(max_tokens=self.params.max_tokens, temperature=1.0, seed=seed, n=n)

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
            items, chosen = self._kept_positions(choice)
            out = self.scoring.score(items) if items else []  # one batched forward per answer and model
            hosted = [torch.tensor([c.logprob for c in cands], dtype=torch.float64) for _, cands in items]
            lp_e = [torch.tensor(o.expert, dtype=torch.float64) for o in out]
            lp_a = [torch.tensor(o.anti_expert, dtype=torch.float64) for o in out]
            log_weights.append(sequence_log_weight(hosted, lp_e, lp_a, chosen, alpha,
                                                   with_normaliser=self.with_normaliser))
            scored.append([items[t][1][chosen[t]] for t in range(len(items))])
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
            self.append(cand)
        if not self.done:
            self.finish_reason = self.choices[picked].finish_reason or "length"
        self.usage = self.usage + Usage(generated_tokens=self.generated, scoring_seconds=time.perf_counter() - started)
        self.notes = notes

    def _kept_positions(self, choice: HostedResult) -> tuple[list[tuple[Prefix, list]], list[int]]:
        """An answer's positions as scored, (prefix, candidates) each, and the drawn token's index
        there: up to where the answer ends (an end token, or the token completing a stop string).
        The weight is that of the answer as kept: tokens the API drew past the end are not scored
        (what follows would only add variance to the weights, and scoring time)."""
        items, chosen, before = [], [], self.prefix
        for pos in choice.positions:
            if pos.sampled is None or not pos.candidates:
                continue
            cands = list(pos.candidates)
            index = next((i for i, c in enumerate(cands) if c is pos.sampled or c == pos.sampled), None)
            if index is None:
                break
            items.append((before, cands))
            chosen.append(index)
            if pos.sampled.is_end or self._cut_at_stop(before.data + pos.sampled.data) is not None:
                break
            before = before.extend(pos.sampled)
        return items, chosen

    def result(self) -> GenerationResult:
        base = super().result()
        return dataclasses.replace(base, samples=tuple(self.sample_traces), ess=self.ess, notes=tuple(self.notes))

