"""The per-step decoding strategy: one hosted API call per generated token (DESIGN.md §2.3).

:class:`PerStepDecoder` holds one generation's state and all of its logic, and does no I/O: the
sync and async tuners ask it for the next :class:`HostedRequest`, send it themselves, and hand
the answer back to :meth:`PerStepDecoder.observe`, which scores the candidates with the expert
and anti-expert, combines, draws and appends. At each step:

1. the API returns the top-k candidates C (plus the sampled token) with hosted logprobs;
2. each small model gives log P_M(v | s) for every v in C: directly by token id when it shares
   the hosted tokenizer (exact), otherwise through the byte aligner;
3. p^ = softmax_C(logprob_L + alpha * (logprob_E - logprob_A)) / T, top-p, or argmax at T = 0;
4. the chosen token's bytes are appended; end-of-text, a stop string or ``max_tokens`` ends it.

Hosted requests are made at temperature 0 (the sampled token is then the top-1, already among
the candidates): per-step decoding needs the candidates' logprobs, not the server's draw.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import combiner
from ._constants import PROB_FLOOR
from .aligner import Aligner
from .errors import HostedResponseError
from .scorer import ScorerSession
from .types import (
    Candidate,
    CandidateTrace,
    GenerationResult,
    HostedRequest,
    HostedResult,
    StepTrace,
    Usage,
)
from .vocab import Vocabulary, split_utf8


@dataclass(frozen=True)
class DecodeParams:
    """Validated decoding settings of one generation."""

    alpha: float = 1.0
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 64
    top_k: int = 20
    stop: tuple[str, ...] = ()
    seed: int | None = None


def _same_vocab_logprobs(dist: torch.Tensor, candidates: Sequence[Candidate], vocab: Vocabulary) -> list[float]:
    """log P_M(v) by token id (same-tokenizer fast path); end tokens without an id use M's ends.
    Clamped at log(PROB_FLOOR) like the aligner, so a delta is never inf - inf."""
    floor = math.log(PROB_FLOOR)
    out = []
    for cand in candidates:
        if cand.token_id is not None and cand.token_id < dist.shape[0]:
            value = float(dist[cand.token_id])
        else:
            ends = sorted(i for i in vocab.end_ids if i < dist.shape[0])
            value = float(torch.logsumexp(dist[ends], 0)) if ends else -math.inf
        out.append(max(floor, value))
    return out


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class PerStepDecoder:
    """State and logic of one per-step generation. See the module docstring.

    Args:
        mode: the hosted mode (``completions``, ``chat-prefix`` or ``chat``).
        expert, anti_expert: open scorer sessions (their prompts already rendered).
        aligner: the byte aligner over the small vocabulary.
        same_vocab: the hosted tokenizer is the small one (follow ids; exact offsets).
        prompt: text prompt for ``completions`` mode; messages for chat modes.
        hosted_prompt_ids: hosted ids of the prompt when sending token prompts, else None.
    """

    def __init__(
        self,
        *,
        mode: str,
        expert: ScorerSession,
        anti_expert: ScorerSession,
        aligner: Aligner,
        params: DecodeParams,
        same_vocab: bool = False,
        prompt: str | None = None,
        messages: Sequence[tuple[str, str]] = (),
        hosted_prompt_ids: Sequence[int] | None = None,
        settings: dict | None = None,
    ) -> None:
        self.mode = mode
        self.expert = expert
        self.anti_expert = anti_expert
        self.aligner = aligner
        self.params = params
        self.same_vocab = same_vocab
        self.prompt = prompt
        self.messages = tuple(messages)
        self.hosted_prompt_ids = list(hosted_prompt_ids) if hosted_prompt_ids is not None else None
        self.settings = dict(settings or {})
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        self.continuation = b""
        self.hosted_ids: list[int] | None = []  # None once a chosen token has no known id
        self.steps: list[StepTrace] = []
        self.usage = Usage()
        self.finish_reason: str | None = None
        self.end_ids: tuple[int, ...] = ()  # hosted end ids, when the hosted vocabulary is known
        self._end_hidden = False  # the API ended without logprobs: ask again with the end banned

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    # ----- requests ------------------------------------------------------------------------------
    def _sendable_text(self) -> tuple[str, bytes]:
        """The continuation as text, and the incomplete UTF-8 tail that text cannot carry.
        (Text-prompt generations only ever hold valid UTF-8; a switch from token-id prompts
        mid-way may leave invalid bytes, which are sent as U+FFFD.)"""
        complete, tail = split_utf8(self.continuation)
        return complete.decode("utf-8", errors="replace"), tail

    def request(self) -> HostedRequest:
        p = self.params
        common = dict(mode=self.mode, max_tokens=1, top_k=p.top_k, temperature=0.0, top_p=1.0)
        if self._end_hidden:
            # OpenAI reports no logprobs when it samples the end; banning it for the draw (logit_bias
            # does not change returned logprobs) brings the position back with the end among the top-k.
            common["logit_bias"] = tuple((i, -100.0) for i in self.end_ids)
        if self.mode == "completions":
            if self.hosted_prompt_ids is not None and self.hosted_ids is not None:
                return HostedRequest(prompt=tuple(self.hosted_prompt_ids + self.hosted_ids), **common)
            text, _ = self._sendable_text()
            return HostedRequest(prompt=(self.prompt or "") + text, **common)
        text, _ = self._sendable_text()
        return HostedRequest(messages=self.messages, assistant_prefix=text, **common)

    # ----- one step ---------------------------------------------------------------------------
    def _consistent(self, candidates: Sequence[Candidate]) -> tuple[list[Candidate], int]:
        """Candidates a text prompt can carry on from, and how many were excluded.

        A text prompt holds only valid UTF-8, so with text prompts a candidate that would leave
        the continuation invalid (ending inside a character, or a stray continuation byte) is
        excluded; the others are renormalised by the softmax. Token-id prompts keep every one.
        """
        if self.hosted_prompt_ids is not None and self.hosted_ids is not None:
            return list(candidates), 0
        keep = [c for c in candidates if c.is_end or _is_utf8(self.continuation + c.data)]
        return keep, len(candidates) - len(keep)

    def _small_logprobs(self, candidates: Sequence[Candidate]) -> tuple[list[float], list[float], str]:
        ids_known = self.hosted_ids is not None and all(c.token_id is not None or c.is_end for c in candidates)
        if self.same_vocab and ids_known:
            vocab = self.aligner.small
            dist_e = self.expert.distributions(self.hosted_ids)[()]
            dist_a = self.anti_expert.distributions(self.hosted_ids)[()]
            return (
                _same_vocab_logprobs(dist_e, candidates, vocab),
                _same_vocab_logprobs(dist_a, candidates, vocab),
                "token ids (same tokenizer)",
            )
        plan = self.aligner.plan(self.continuation, candidates)
        dists_e = self.expert.distributions(plan.kept_ids, plan.paths)
        dists_a = self.anti_expert.distributions(plan.kept_ids, plan.paths)
        return self.aligner.evaluate(plan, dists_e), self.aligner.evaluate(plan, dists_a), self.aligner.description

    def observe(self, results: Sequence[HostedResult], api_seconds: float) -> StepTrace | None:
        """Consume the API's answer to :meth:`request`: score, choose, append."""
        started = time.perf_counter()
        result = results[0]
        p = self.params
        notes: list[str] = []
        self.usage = self.usage + Usage(
            api_calls=1,
            prompt_tokens=result.usage.prompt_tokens,
            completion_tokens=result.usage.completion_tokens,
            api_seconds=api_seconds,
        )
        if not result.positions:
            # The server ended the text and reported no logprobs for that position.
            if self.end_ids and not self._end_hidden:
                self._end_hidden = True  # ask once more with the end tokens banned from the draw
                return None
            self.finish_reason = "stop"
            return None
        if self._end_hidden:
            notes.append("the API ended without logprobs; re-asked with the end token banned from its draw")
            self._end_hidden = False
        position = result.positions[0]
        if not position.candidates:
            raise HostedResponseError(
                "the hosted API returned no usable top logprobs at this position; "
                "raise --top-k or check that the server fills `top_logprobs`"
            )
        candidates, excluded = self._consistent(position.candidates)
        if excluded:
            notes.append(f"{excluded} candidate(s) ending inside a UTF-8 character excluded (text prompt)")
        if not candidates:
            raise HostedResponseError(
                "every candidate at this position ends inside a UTF-8 character, which a text prompt "
                "cannot carry; pass --hosted-tokenizer so the client can send token-id prompts"
            )
        lp_e, lp_a, alignment = self._small_logprobs(candidates)
        hosted = torch.tensor([c.logprob for c in candidates], dtype=torch.float64)
        delta = torch.tensor(lp_e, dtype=torch.float64) - torch.tensor(lp_a, dtype=torch.float64)
        scores = combiner.proxy_scores(hosted, delta, p.alpha)
        probs = combiner.tuned_distribution(scores, p.temperature, p.top_p)
        index = combiner.choose(probs, self.generator)
        chosen = candidates[index]
        scoring = time.perf_counter() - started
        self.usage = self.usage + Usage(scoring_seconds=scoring, generated_tokens=0 if chosen.is_end else 1)
        trace = StepTrace(
            index=len(self.steps),
            candidates=tuple(
                CandidateTrace(
                    text=c.text,
                    hosted_logprob=c.logprob,
                    expert_logprob=lp_e[i],
                    anti_expert_logprob=lp_a[i],
                    delta=float(delta[i]),
                    score=float(scores[i]),
                    prob=float(probs[i]),
                    is_end=c.is_end,
                    token_id=c.token_id,
                )
                for i, c in enumerate(candidates)
            ),
            chosen=index,
            chosen_text=chosen.text,
            alignment=alignment,
            api_seconds=api_seconds,
            scoring_seconds=scoring,
            dropped=position.dropped,
            notes=tuple(notes),
        )
        self.steps.append(trace)
        self._append(chosen)
        return trace

    def _append(self, chosen: Candidate) -> None:
        if chosen.is_end:
            self.finish_reason = "stop"
            return
        self.continuation += chosen.data
        if self.hosted_ids is not None:
            if chosen.token_id is None:
                self.hosted_ids = None
            else:
                self.hosted_ids.append(chosen.token_id)
        if self.params.stop:
            text = self.continuation.decode("utf-8", errors="ignore")
            hits = [text.find(s) for s in self.params.stop if s and s in text]
            if hits:
                self.continuation = text[: min(hits)].encode("utf-8")
                self.finish_reason = "stop"
                return
        if len(self.steps) >= self.params.max_tokens:
            self.finish_reason = "length"
        elif self.mode == "chat":
            self.finish_reason = "length"

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.continuation.decode("utf-8", errors="replace"),
            finish_reason=self.finish_reason or "length",
            usage=self.usage,
            trace=tuple(self.steps),
            settings=self.settings,
        )
