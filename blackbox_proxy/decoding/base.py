"""What every decoding strategy shares: one generation's state, its requests, one tuned choice, appending.

A decoder holds one generation's state and all of its logic, and does no I/O: the sync and
async drivers (:mod:`.driver`) ask it for the next :class:`~blackbox_proxy.types.HostedRequest`,
send it themselves, and hand the answer back to ``observe``. It is built whole from what it is
asked (a :class:`~blackbox_proxy.request.GenerationRequest`), what the host allows
(:class:`~blackbox_proxy.types.HostCapabilities`), the small models' :class:`~.scoring.Scoring`
and the :class:`~.prefix.HostedPrompt`; nothing is set on it afterwards.

:class:`Decoder` has what every strategy shares: the text so far (a :class:`~.prefix.Prefix`),
requests continuing it (with the end banned when the API hid it), one proxy-tuned choice at a
position (:meth:`Decoder._choose`, the :mod:`~blackbox_proxy.maths.combiner` maths), appending
tokens (:meth:`Decoder.append`, public for teacher forcing), stop strings, usage and traces.

Left out: the strategies themselves (``per_step.py``, ``speculative.py``, ``resample.py``), the
scoring (``scoring.py``) and all maths beyond calling :mod:`blackbox_proxy.maths`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import HostedResponseError
from ..maths import combiner
from ..request import GenerationRequest, cut_at_stop
from ..tokens.vocab import split_utf8
from ..types import (Candidate, CandidateTrace, GenerationResult, HostCapabilities, HostedPosition, HostedRequest,
                     HostedResult, StepTrace, Usage)
from . import instructed, tail
from .prefix import HostedPrompt, Prefix, is_utf8
from .scoring import Offsets, Scoring

logger = logging.getLogger(__name__)


@dataclass
class ScoredPosition:
    """One position's candidates (those a request can carry on from) with their small-model
    log-probabilities, as scored (``offsets``: whole distributions too, on one tokenizer)."""

    candidates: list[Candidate]
    expert: list[float]
    anti_expert: list[float]
    offsets: Offsets
    dropped: int = 0
    seconds: float = 0.0

    def scores(self, alpha: float) -> torch.Tensor:
        """The candidates' proxy-tuned scores ``[C]``: logprob_L + alpha * (logprob_E - logprob_A)."""
        hosted = torch.tensor([c.logprob for c in self.candidates], dtype=torch.float64)
        delta = torch.tensor(self.expert, dtype=torch.float64) - torch.tensor(self.anti_expert, dtype=torch.float64)
        return combiner.proxy_scores(hosted, delta, alpha)

    def with_token(self, token: Candidate, expert: float, anti_expert: float) -> "ScoredPosition":
        """This position with one more candidate (a tail token found by a probe)."""
        return ScoredPosition([*self.candidates, token], [*self.expert, expert], [*self.anti_expert, anti_expert],
                              self.offsets, self.dropped, self.seconds)


CHARACTER_TOKENS = 4  # tokens asked to finish a character a text prompt cannot carry in pieces (UTF-8: 4 bytes)
CHARACTER_TRIES = 4  # draws of them (when sampling) before a generation gives up on one


class Decoder:
    """One generation's state, shared by the strategies. See the module docstring.

    Args:
        params: what the generation is asked (alpha, temperature, top_p, max_tokens, stop, seed,
            and the strategy's own options).
        host: what the hosted API allows (mode, k, choices per call, ``logit_bias``, streaming).
        scoring: the small models' scoring for this generation.
        prompt: what the hosted model continues.
        settings: shown in the result (the tuner's summary of the run).

    Subclasses implement ``request()`` and ``observe(results, api_seconds)``.
    """

    redraws_chunks = False  # a strategy that can draw another chunk where a character was not finished

    def __init__(self, params: GenerationRequest, *, host: HostCapabilities, scoring: Scoring,
                 prompt: HostedPrompt, settings: dict[str, Any] | None = None) -> None:
        self.params = params
        self.host = host
        self.scoring = scoring
        self.prompt = prompt
        self.settings = dict(settings or {})
        self.generator = torch.Generator()
        # Greedy decoding draws nothing itself; its generator only seeds the API's draws (multi-draft
        # chunks), so it is fixed: the same greedy generation sends the same requests (a response
        # cache or a recording answers them again).
        seed = params.seed if params.seed is not None else 0 if params.temperature == 0 else None
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        self.prefix = Prefix()
        self.generated = 0
        self.steps: list[StepTrace] = []
        self.usage = Usage()
        self.finish_reason: str | None = None
        self._end_hidden = False  # the API ended without logprobs: ask again with the end banned
        self.tail_off: str | None = None  # why tail probes stopped for this generation (an untrusted answer)
        self._longest_answered = -1  # the longest text the host answered a request for
        self.copies = instructed.CopyFallback(host.max_choices)  # copies a plain chat host did not make

    @classmethod
    def check(cls, params: GenerationRequest, host: HostCapabilities) -> None:
        """Refuse, before any call, a generation this strategy cannot make on ``host``
        (a :class:`~blackbox_proxy.errors.ModeNotSupportedError` that says what would work)."""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def stop(self, reason: str = "length") -> None:
        """End the generation here (a driver that met a context limit after paid calls)."""
        self.finish_reason = reason

    def answered(self, request: HostedRequest) -> None:
        """The host answered ``request`` (the drivers say so after each call)."""
        self._longest_answered = max(self._longest_answered, request.length)

    def outgrew(self, request: HostedRequest) -> bool:
        """Whether ``request`` carries a longer text than any the host answered in this generation:
        a 400 to it after answered calls is then read as the host's context, however it words it."""
        return 0 <= self._longest_answered < request.length

    # ----- requests ------------------------------------------------------------------------------
    def _request(self, *, max_tokens: int, temperature: float, seed: int | None = None, n: int = 1,
                 stream: bool = False) -> HostedRequest:
        """The request continuing the text so far. After the API ended without logprobs, the end
        is banned from its draw: OpenAI reports no logprobs when it samples the end, and banning it
        (logit_bias does not change returned logprobs) brings the position back with the end among
        the top-k. After a plain chat host did not copy the answer so far (:mod:`.instructed`):
        that position alone, from several sampled copies, then by the 'continue' instruction."""
        ban = tuple((i, -100.0) for i in self.host.end_ids) if self._end_hidden else ()
        if self.copies.level == instructed.SAMPLED_COPIES:
            seed = int(torch.randint(0, 2**31 - 1, (), generator=self.generator))
            return self.prompt.request(self.prefix, self.host, max_tokens=1, temperature=1.0, seed=seed,
                                       n=self.copies.draws, logit_bias=ban, copy_bias=True)
        return self.prompt.request(self.prefix, self.host, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                   n=n, logit_bias=ban, stream=stream,
                                   copy=self.copies.level != instructed.CONTINUE_ASKED)

    def _not_copied(self, results: Sequence[HostedResult], api_seconds: float) -> bool:
        """A plain chat host asked to copy the answer so far wrote something else in every choice
        (:class:`~.instructed.CopyFallback`): count the call, ask that position next by the
        fallback or end the generation (True); False for any other answer."""
        if not self.copies.missed(results):
            return False
        self._count_call(results[0], api_seconds)
        if self.copies.gave_up:
            logger.warning(self.copies.gave_up)
            self.ended_because, self.finish_reason = self.copies.gave_up, "length"
        return True

    def _count_call(self, result: HostedResult, api_seconds: float, **more: int) -> None:
        self.usage = self.usage + Usage.of_call(result, api_seconds, **more)

    def _ended_without_logprobs(self) -> bool:
        """The API ended and reported nothing for that position. With the hosted end ids known,
        ask once more with them banned from the draw (True: not done yet); else the text ends."""
        if self.host.end_ids and not self._end_hidden:
            self._end_hidden = True
            return True
        self.finish_reason = "stop"
        return False

    # ----- scoring ---------------------------------------------------------------------------
    def prefetch(self) -> None:
        """Run the small models over the text committed so far while the API call for the next
        position is in flight (:meth:`Scoring.prefetch`). Changes no result; a failure here is
        left to the scoring that follows, which meets it again."""
        if self.done or not self.prefetch_useful:
            return
        started = time.perf_counter()
        try:
            self.scoring.prefetch(self.prefix)
        except Exception:  # noqa: BLE001 - the real scoring raises it with its context
            return
        self.usage = self.usage + Usage(overlapped_seconds=time.perf_counter() - started)

    @property
    def prefetch_useful(self) -> bool:
        """Whether the next request's answer will be scored after the committed text."""
        return True

    # ----- appending -------------------------------------------------------------------------
    def append(self, chosen: Candidate) -> None:
        """Append ``chosen`` (an end token ends the text); stop strings and ``max_tokens`` end it
        too. Public for teacher forcing, which appends the reference's tokens."""
        if chosen.is_end:
            self.finish_reason = "stop"
            return
        self.prefix = self.prefix.extend(chosen)
        self.generated += 1
        cut = self._cut_at_stop(self.prefix.data)
        if cut is not None:
            self.prefix = Prefix(cut.encode("utf-8"), self.prefix.ids)
            self.finish_reason = "stop"
            return
        if self.generated >= self.params.max_tokens:
            self.finish_reason = "length"

    def _cut_at_stop(self, text: bytes) -> str | None:
        """``text`` cut before the first stop string it holds, or None when it holds none."""
        if not self.params.stop:
            return None
        return cut_at_stop(text.decode("utf-8", errors="replace"), self.params.stop)

    def _step_trace(self, candidates: Sequence[Candidate], lp_e: Sequence[float], lp_a: Sequence[float],
                    scores: torch.Tensor, probs: torch.Tensor, index: int, alignment: str, api_seconds: float,
                    scoring_seconds: float, dropped: int, notes: Sequence[str]) -> StepTrace:
        score_list, prob_list = scores.tolist(), probs.tolist()
        return StepTrace(
            index=len(self.steps),
            candidates=tuple(
                CandidateTrace(
                    text=c.text, hosted_logprob=c.logprob, expert_logprob=lp_e[i], anti_expert_logprob=lp_a[i],
                    delta=lp_e[i] - lp_a[i], score=score_list[i], prob=prob_list[i], is_end=c.is_end,
                    token_id=c.token_id, data=c.data,
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

    def _choose(self, position: HostedPosition, api_seconds: float, notes: list[str], temperature: float,
                top_p: float) -> StepTrace | None:
        """Score one position's candidates and draw from the tuned distribution renormalised over
        them (the per-step rule); append the choice. Greedy, where a token outside the candidates
        may be the argmax (:mod:`.tail`), ask the host first: None, and :meth:`_asking_tail`
        is the next request, :meth:`_settle_tail` takes its answer."""
        scored = self._scored(position, notes)
        if scored is None:
            self._character = notes
            return None
        if temperature == 0 and self.tail_off is None and self.host.continues_prefix:
            best = int(combiner.tuned_distribution(scored.scores(self.params.alpha), 0.0).argmax())
            asking = tail.check(self.prefix, scored.candidates, scored.offsets,
                                self.prompt.allowed(self.prefix, scored.candidates), best, host=self.host,
                                prompt=self.prompt, vocab=self.scoring.vocab, alpha=self.params.alpha,
                                exhaustive=not scored.dropped)
            if asking is not None:
                self._tail = (asking, scored, notes, api_seconds)
                return None
        return self._pick(scored, api_seconds, notes, temperature, top_p)

    _tail: tuple[tail.TailCheck, "ScoredPosition", list[str], float] | None = None  # a greedy step asking the tail
    _character: list[str] | None = None  # a position whose candidates all end inside a character
    _character_misses = 0  # draws that did not finish one (a generation's total)

    # ----- a character that a text prompt cannot carry in pieces ------------------------------
    def give_up_on_character(self) -> None:
        """End the generation with the text so far (``finish_reason`` length, a note and a
        warning): the host's next character cannot be carried by a text prompt and its own draws
        did not finish it. What was paid for is kept, as at a context limit."""
        why = ("the hosted model's next character could not be carried by a text prompt (its tokens end inside it "
               "and its own draws did not finish it); the generation ends here: use --mode completions with "
               "--hosted-tokenizer (token-id prompts carry any bytes)")
        logger.warning(why)
        self.ended_because = why
        self.finish_reason = "length"

    ended_because: str | None = None  # why a generation ended early (a note on the result)

    def _asking_character(self) -> HostedRequest | None:
        """After a position whose candidates all end inside a UTF-8 character on a text prompt
        (a request cannot carry half a character, so none can be continued from): the host's own
        next few tokens, drawn at the generation's temperature, to take up to the character's end."""
        if self._character is None:
            return None
        seed = int(torch.randint(0, 2**31 - 1, (), generator=self.generator)) if self.params.temperature > 0 else None
        return self._request(max_tokens=CHARACTER_TOKENS, temperature=self.params.temperature, seed=seed)

    def _settle_character(self, results: Sequence[HostedResult], api_seconds: float) -> None:
        """Append the host's tokens up to the first point where the text is whole UTF-8 again. They
        are the host's draw, not tuned (the small models cannot be asked between a character's
        pieces through a text prompt); their steps say so, with the hosted logprobs as scores."""
        notes, self._character = self._character, None
        self._count_call(results[0], api_seconds)
        taken: list[HostedPosition] = []
        data, finished = self.prefix.data, False
        for position in results[0].positions:
            if position.sampled is None or position.sampled.is_end:
                break
            taken.append(position)
            data += position.sampled.data
            if is_utf8(data):
                finished = True
                break
        if not finished:
            self._character_misses += 1
            if self.params.temperature > 0 and self._character_misses < CHARACTER_TRIES:
                self._character = notes  # another draw may finish it
                return
            if self.redraws_chunks:
                return  # the next chunk is drawn anew (its own stall count gives up in the end)
            self.give_up_on_character()
            return
        if len(taken) > self.params.max_tokens - self.generated:
            self.finish_reason = "length"  # the character does not fit in max_tokens: the text ends before it
            return
        notes = [*notes, f"every candidate ended inside a character: the host's own {len(taken)} token(s) up to "
                 "its end were taken, untuned"]
        for position in taken:
            candidates = list(position.candidates) or [position.sampled]
            index = next((i for i, c in enumerate(candidates) if c == position.sampled), None)
            if index is None:
                candidates, index = [*candidates, position.sampled], len(candidates)
            hosted = torch.tensor([c.logprob for c in candidates], dtype=torch.float64)
            zeros = [0.0] * len(candidates)
            self.steps.append(self._step_trace(candidates, zeros, zeros, hosted, torch.softmax(hosted, -1), index,
                                               "untuned", api_seconds, 0.0, position.dropped, notes))
            api_seconds, notes = 0.0, []
            self.append(position.sampled)
            if self.done:
                return

    def _asking_tail(self) -> HostedRequest | None:
        """The tail probe a greedy step waits for, or None."""
        return self._tail[0].request(self.prompt, self.host) if self._tail is not None else None

    def _settle_tail(self, results: Sequence[HostedResult], api_seconds: float) -> StepTrace:
        """A greedy step's tail probe answered: the argmax over its candidates and the tail token
        the probe found."""
        asking, scored, notes, first_seconds = self._tail
        self._tail = None
        untrusted = asking.distrust(results)
        self._count_call(results[0], api_seconds, tail_calls=1, untrusted_tail_calls=int(untrusted is not None))
        token, note = asking.decide(results, self.scoring.vocab)
        notes.append(note)
        if untrusted is not None:
            self.tail_off = untrusted
            notes.append(f"tail probes stopped: {untrusted}; the candidates' argmax from here on")
        if token is not None:
            scored = scored.with_token(token, *asking.offsets(token))
        return self._pick(scored, first_seconds + api_seconds, notes, 0.0, 1.0)

    def _scored(self, position: HostedPosition, notes: list[str]) -> "ScoredPosition | None":
        """One position's candidates a request can carry on from, and their offsets; None when a
        text prompt can carry none of them (every one ends inside a character)."""
        started = time.perf_counter()
        if not position.candidates:
            raise HostedResponseError(
                "the hosted API returned no usable top logprobs at this position; "
                "raise --top-k or check that the server fills `top_logprobs`"
            )
        candidates, excluded = self.prompt.consistent(self.prefix, position.candidates)
        if excluded:
            notes.append(f"{excluded} candidate(s) ending inside a UTF-8 character excluded (text prompt)")
        if not candidates:
            return None
        [offsets] = self.scoring.score([(self.prefix, candidates)])
        silent = [c.text for c, e in zip(candidates, offsets.expert) if e == -math.inf]
        if silent:
            notes.append(f"{len(silent)} candidate(s) the small models cannot say excluded (no evidence: both at "
                         f"the floor): {', '.join(repr(s) for s in silent[:3])}")
        return ScoredPosition(candidates, list(offsets.expert), list(offsets.anti_expert), offsets, position.dropped,
                              time.perf_counter() - started)

    def _pick(self, scored: "ScoredPosition", api_seconds: float, notes: list[str], temperature: float,
              top_p: float) -> StepTrace:
        """Draw from the tuned distribution over a scored position's candidates; append the choice."""
        started = time.perf_counter()
        candidates, lp_e, lp_a = scored.candidates, scored.expert, scored.anti_expert
        scores = scored.scores(self.params.alpha)
        probs = combiner.tuned_distribution(scores, temperature, top_p)
        index = combiner.choose(probs, self.generator)
        scoring = scored.seconds + time.perf_counter() - started
        self.usage = self.usage + Usage(scoring_seconds=scoring, generated_tokens=0 if candidates[index].is_end else 1)
        trace = self._step_trace(candidates, lp_e, lp_a, scores, probs, index, scored.offsets.alignment, api_seconds,
                                 scoring, scored.dropped, notes)
        self.steps.append(trace)
        self.append(candidates[index])
        return trace

    def stable_text(self) -> str:
        """The text so far that can be shown and will not change: whole UTF-8 characters, less
        a tail that could still turn out to begin a stop string (which would be cut off)."""
        complete, _ = split_utf8(self.prefix.data)
        text = complete.decode("utf-8", errors="replace")
        hold = max((len(s) for s in self.params.stop), default=1) - 1
        return text[: max(0, len(text) - hold)]

    def _result_notes(self) -> tuple[str, ...]:
        notes = []
        if self.tail_off:
            notes.append(f"tail probes stopped: {self.tail_off}; the candidates-only rule was used from there")
        if self.ended_because:
            notes.append(self.ended_because)
        if self.copies.note():
            notes.append(self.copies.note())
        return tuple(notes)

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.prefix.data.decode("utf-8", errors="replace"),
            finish_reason=self.finish_reason or "length",
            usage=self.usage,
            trace=tuple(self.steps),
            settings={**self.settings, "tail_off": self.tail_off} if self.tail_off else self.settings,
            notes=self._result_notes(),
        )
