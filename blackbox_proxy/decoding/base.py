"""What every decoding strategy shares: settings, requests, scoring, appending (DESIGN.md §2.3).

A decoder holds one generation's state and all of its logic, and does no I/O: the sync and
async tuners ask it for the next :class:`HostedRequest`, send it themselves, and hand the answer
back to ``observe``. :class:`DecoderBase` has what every strategy shares: building requests
(text or token-id prompts, the end banned when the API hid it), scoring the candidates of one or
many positions with the expert and anti-expert (by token id when the hosted tokenizer is the
small one, else through the byte aligner), one proxy-tuned choice at a position (the
:mod:`~blackbox_proxy.maths.combiner` maths), appending tokens, stop strings, usage and traces.

Left out: the strategies themselves (``per_step.py``, ``speculative.py``, ``resample.py``) and
all maths beyond calling :mod:`blackbox_proxy.maths`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._constants import PROB_FLOOR
from ..errors import HostedResponseError
from ..maths import combiner
from ..request import cut_at_stop
from ..tokens.aligner import Aligner
from ..tokens.vocab import Vocabulary, split_utf8
from ..types import (
    Candidate,
    CandidateTrace,
    GenerationResult,
    HostedPosition,
    HostedRequest,
    HostedResult,
    StepTrace,
    Usage,
)


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
    chunk: int | None = None  # speculative: fixed chunk length, None = adaptive
    tail_calls: int = 1  # speculative: most tail-probe calls per position (0: candidates-only rule)
    tail_draws: int = 16  # speculative: draws per tail probe (over several calls when the host caps n)
    drafts: int | None = None  # speculative: most drafts per chunk call (n choices); None = greedy adaptive up to 4, sampling 1


def _same_vocab_logprobs(dist: torch.Tensor, candidates: Sequence[Candidate], vocab: Vocabulary) -> list[float]:
    """log P_M(v) by token id (same-tokenizer fast path); end tokens without an id use M's ends.
    Clamped at log(PROB_FLOOR) like the aligner, so a delta is never inf - inf."""
    floor = math.log(PROB_FLOOR)
    size = dist.shape[0]
    known = [c.token_id is not None and c.token_id < size for c in candidates]
    values = dist[[c.token_id if k else 0 for c, k in zip(candidates, known)]].double().tolist()
    if not all(known):
        ends = sorted(i for i in vocab.end_ids if i < size)
        end_value = float(torch.logsumexp(dist[ends], 0)) if ends else -math.inf
        values = [v if k else end_value for v, k in zip(values, known)]
    return [max(floor, v) for v in values]


def is_utf8(data: bytes) -> bool:
    """Whether ``data`` is whole, valid UTF-8 (what a text prompt can carry)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class DecoderBase:
    """State shared by the strategies. See the module docstring.

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
        expert: object,
        anti_expert: object,
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
        # Greedy decoding draws nothing itself; its generator only seeds the API's draws (multi-draft
        # chunks), so it is fixed: the same greedy generation sends the same requests (a response
        # cache or a recording answers them again).
        seed = params.seed if params.seed is not None else 0 if params.temperature == 0 else None
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        self.continuation = b""
        self.hosted_ids: list[int] | None = []  # None once a chosen token has no known id
        self.generated = 0
        self.steps: list[StepTrace] = []
        self.usage = Usage()
        self.finish_reason: str | None = None
        self.end_ids: tuple[int, ...] = ()  # hosted end ids, when the hosted vocabulary is known
        self._end_hidden = False  # the API ended without logprobs: ask again with the end banned
        self.whole_answers = False  # chat mode keeps one token unless a strategy appends whole answers
        # What the host allows (set by the tuner from the client): logit_bias entries honoured on
        # the draw (0: none known; the speculative strategy then asks no tail probes), choices per call.
        self.logit_bias_cap = 0
        self.max_choices = 1
        self.stream_chunks = False  # the host streams logprobs: chunk calls can be walked as they arrive
        self.full_scores: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # see _score_positions

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def token_prompts(self) -> bool:
        """Requests carry hosted token ids (exact continuation, any bytes)."""
        return self.hosted_prompt_ids is not None and self.hosted_ids is not None

    # ----- requests ------------------------------------------------------------------------------
    def _sendable_text(self, continuation: bytes | None = None) -> tuple[str, bytes]:
        """The continuation as text, and the incomplete UTF-8 tail that text cannot carry.
        (Text-prompt generations only ever hold valid UTF-8; a switch from token-id prompts
        mid-way may leave invalid bytes, which are sent as U+FFFD.)"""
        complete, tail = split_utf8(self.continuation if continuation is None else continuation)
        return complete.decode("utf-8", errors="replace"), tail

    def _request(self, *, max_tokens: int, temperature: float, seed: int | None = None,
                 after: tuple[bytes, list[int] | None] | None = None) -> HostedRequest:
        """The request continuing the text so far, or ``after`` = (continuation bytes, hosted ids)
        when given (a position inside a chunk being walked)."""
        common = dict(mode=self.mode, max_tokens=max_tokens, top_k=self.params.top_k, temperature=temperature,
                      top_p=1.0, seed=seed)
        continuation, ids = after if after is not None else (self.continuation, self.hosted_ids)
        if self._end_hidden:
            # OpenAI reports no logprobs when it samples the end; banning it for the draw (logit_bias
            # does not change returned logprobs) brings the position back with the end among the top-k.
            common["logit_bias"] = tuple((i, -100.0) for i in self.end_ids)
        if self.mode == "completions":
            if self.hosted_prompt_ids is not None and ids is not None:
                return HostedRequest(prompt=tuple(self.hosted_prompt_ids + ids), **common)
            text, _ = self._sendable_text(continuation)
            return HostedRequest(prompt=(self.prompt or "") + text, **common)
        text, _ = self._sendable_text(continuation)
        return HostedRequest(messages=self.messages, assistant_prefix=text, **common)

    def _count_call(self, result: HostedResult, api_seconds: float) -> None:
        self.usage = self.usage + Usage(
            api_calls=1 + result.extra_calls,
            prompt_tokens=result.usage.prompt_tokens,
            completion_tokens=result.usage.completion_tokens,
            api_seconds=api_seconds,
        )

    def _ended_without_logprobs(self) -> bool:
        """The API ended and reported nothing for that position. With the hosted end ids known,
        ask once more with them banned from the draw (True: not done yet); else the text ends."""
        if self.end_ids and not self._end_hidden:
            self._end_hidden = True
            return True
        self.finish_reason = "stop"
        return False

    # ----- scoring ---------------------------------------------------------------------------
    def prefetch(self) -> None:
        """Run the small models over the text committed so far, while the API call for the next
        position is in flight: their KV caches then hold the context, and the scoring that
        follows the answer computes only the candidates (all of it, for one position on the
        same tokenizer, whose distribution is now known). Changes no result; a failure here is
        left to the scoring that follows, which meets it again."""
        if self.done or not self.prefetch_useful:
            return
        started = time.perf_counter()
        if self.same_vocab and self.hosted_ids is not None:
            ids = list(self.hosted_ids)
        else:
            ids, _ = self.aligner.split_context(self.continuation)
        try:
            self.expert.distributions_groups([(ids, ())])
            self.anti_expert.distributions_groups([(ids, ())])
        except Exception:  # noqa: BLE001 - the real scoring raises it with its context
            return
        self.usage = self.usage + Usage(overlapped_seconds=time.perf_counter() - started)

    @property
    def prefetch_useful(self) -> bool:
        """Whether the next request's answer will be scored after the committed text."""
        return True

    def _consistent(self, candidates: Sequence[Candidate], before: bytes | None = None) -> tuple[list[Candidate], int]:
        """Candidates a text prompt can carry on from, and how many were excluded.

        A text prompt holds only valid UTF-8, so with text prompts a candidate that would leave
        the continuation invalid (ending inside a character, or a stray continuation byte) is
        excluded; the others are renormalised by the softmax. Token-id prompts keep every one.
        """
        if self.token_prompts:
            return list(candidates), 0
        base = self.continuation if before is None else before
        keep = [c for c in candidates if c.is_end or is_utf8(base + c.data)]
        return keep, len(candidates) - len(keep)

    def _score_positions(
        self, items: Sequence[tuple[bytes, list[int] | None, Sequence[Candidate]]]
    ) -> tuple[list[tuple[list[float], list[float]]], str]:
        """log P_E and log P_A of every candidate of several positions, in one batched forward
        per model. Each item: (continuation bytes before the position, hosted ids before it or
        None, candidates). Returns per position (expert logprobs, anti-expert logprobs), and
        the alignment used. With one tokenizer the small models' whole next-token log
        distributions of each position are kept in ``self.full_scores`` (expert, anti-expert)
        ``[V]`` each (the speculative tail probe reads the tail's weights there), else None."""
        self.full_scores = None
        ids_known = all(h is not None and all(c.token_id is not None or c.is_end for c in cands)
                        for _, h, cands in items)
        if self.same_vocab and ids_known:
            groups = [(list(h), ()) for _, h, _ in items]
            dists_e = self.expert.distributions_groups(groups)
            dists_a = self.anti_expert.distributions_groups(groups)
            vocab = self.aligner.small
            self.full_scores = [(de[()], da[()]) for de, da in zip(dists_e, dists_a)]
            out = [(_same_vocab_logprobs(de[()], cands, vocab), _same_vocab_logprobs(da[()], cands, vocab))
                   for de, da, (_, _, cands) in zip(dists_e, dists_a, items)]
            return self._exclude_silent(out, items), "token ids (same tokenizer)"
        plans = [self.aligner.plan(cont, cands) for cont, _, cands in items]
        groups = [(plan.kept_ids, plan.paths) for plan in plans]
        dists_e = self.expert.distributions_groups(groups)
        dists_a = self.anti_expert.distributions_groups(groups)
        out = [(self.aligner.evaluate(plan, de), self.aligner.evaluate(plan, da))
               for plan, de, da in zip(plans, dists_e, dists_a)]
        return self._exclude_silent(out, items), self.aligner.description

    def _exclude_silent(self, scored: list[tuple[list[float], list[float]]],
                        items: Sequence[tuple[bytes, list[int] | None, Sequence[Candidate]]]
                        ) -> list[tuple[list[float], list[float]]]:
        """Candidates neither small model can say get expert log P = -inf, i.e. tuned probability
        0 (see :func:`~blackbox_proxy.maths.combiner.without_evidence`); at alpha 0 nothing is tuned."""
        if self.params.alpha == 0:
            return scored
        floor = math.log(PROB_FLOOR)
        out = []
        for (lp_e, lp_a), (_, _, cands) in zip(scored, items):
            silent = combiner.without_evidence(lp_e, lp_a, floor, [c.is_end for c in cands])
            if silent:
                lp_e = [-math.inf if i in silent else v for i, v in enumerate(lp_e)]
            out.append((lp_e, lp_a))
        return out

    # ----- appending -------------------------------------------------------------------------
    def _append(self, chosen: Candidate) -> None:
        if chosen.is_end:
            self.finish_reason = "stop"
            return
        self.continuation += chosen.data
        self.generated += 1
        if self.hosted_ids is not None:
            if chosen.token_id is None:
                self.hosted_ids = None
            else:
                self.hosted_ids.append(chosen.token_id)
        cut = self._cut_at_stop(self.continuation)
        if cut is not None:
            self.continuation = cut.encode("utf-8")
            self.finish_reason = "stop"
            return
        if self.generated >= self.params.max_tokens:
            self.finish_reason = "length"
        elif self.mode == "chat" and not self.whole_answers:
            self.finish_reason = "length"

    def _cut_at_stop(self, text: bytes) -> str | None:
        """``text`` cut before the first stop string it holds, or None when it holds none."""
        if not self.params.stop:
            return None
        return cut_at_stop(text.decode("utf-8", errors="replace"), self.params.stop)

    def _step_trace(self, candidates: Sequence[Candidate], lp_e: Sequence[float], lp_a: Sequence[float],
                    scores: torch.Tensor, probs: torch.Tensor, index: int, alignment: str, api_seconds: float,
                    scoring_seconds: float, dropped: int, notes: Sequence[str]) -> StepTrace:
        delta = [e - a for e, a in zip(lp_e, lp_a)]
        score_list, prob_list = scores.tolist(), probs.tolist()
        return StepTrace(
            index=len(self.steps),
            candidates=tuple(
                CandidateTrace(
                    text=c.text, hosted_logprob=c.logprob, expert_logprob=lp_e[i], anti_expert_logprob=lp_a[i],
                    delta=delta[i], score=score_list[i], prob=prob_list[i], is_end=c.is_end, token_id=c.token_id,
                )
                for i, c in enumerate(candidates)
            ),
            chosen=index,
            chosen_text=candidates[index].text,
            alignment=alignment,
            api_seconds=api_seconds,
            scoring_seconds=scoring_seconds,
            dropped=dropped,
            notes=tuple(notes),
        )

    def _choose_per_step(self, position: HostedPosition, api_seconds: float, notes: list[str],
                         temperature: float, top_p: float) -> StepTrace:
        """Score one position's candidates and draw from the renormalised tuned distribution."""
        started = time.perf_counter()
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
        [(lp_e, lp_a)], alignment = self._score_positions(
            [(self.continuation, list(self.hosted_ids) if self.hosted_ids is not None else None, candidates)]
        )
        silent = [c.text for c, e in zip(candidates, lp_e) if e == -math.inf]
        if silent:
            notes.append(f"{len(silent)} candidate(s) the small models cannot say excluded (no evidence: both at "
                         f"the floor): {', '.join(repr(s) for s in silent[:3])}")
        hosted = torch.tensor([c.logprob for c in candidates], dtype=torch.float64)
        delta = torch.tensor(lp_e, dtype=torch.float64) - torch.tensor(lp_a, dtype=torch.float64)
        scores = combiner.proxy_scores(hosted, delta, self.params.alpha)
        probs = combiner.tuned_distribution(scores, temperature, top_p)
        index = combiner.choose(probs, self.generator)
        scoring = time.perf_counter() - started
        self.usage = self.usage + Usage(scoring_seconds=scoring, generated_tokens=0 if candidates[index].is_end else 1)
        trace = self._step_trace(candidates, lp_e, lp_a, scores, probs, index, alignment, api_seconds, scoring,
                                 position.dropped, notes)
        self.steps.append(trace)
        self._append(candidates[index])
        return trace

    def stable_text(self) -> str:
        """The text so far that can be shown and will not change: whole UTF-8 characters, less
        a tail that could still turn out to begin a stop string (which would be cut off)."""
        complete, _ = split_utf8(self.continuation)
        text = complete.decode("utf-8", errors="replace")
        hold = max((len(s) for s in self.params.stop), default=1) - 1
        return text[: max(0, len(text) - hold)]

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.continuation.decode("utf-8", errors="replace"),
            finish_reason=self.finish_reason or "length",
            usage=self.usage,
            trace=tuple(self.steps),
            settings=self.settings,
        )

