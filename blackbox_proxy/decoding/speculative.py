"""The speculative strategy: one API call per chunk of drafts, walked by rejection (DESIGN.md §2.3).

The API draws a chunk of N tokens at temperature 1, top_p 1 (so the drafts follow the hosted
p_L), with top-k logprobs at every position. The walk accepts drafts with min(1, w/Z) and
replaces the first rejected one by a residual draw (Leviathan et al. 2023, Alg. 1; the terms
draft, accepted, residual draw, tail and tail probe are defined in
:mod:`blackbox_proxy.maths.rejection`). The next call starts from the new prefix. Because the
drafts are the hosted model's own samples, accepted tokens can lie outside the top-k. At
temperature 0 the API's greedy chunk is kept up to the first position whose proxy-tuned argmax
over C differs (:func:`~blackbox_proxy.maths.rejection.walk_greedy`; equal to per-step greedy).

Each chunk call is walked by a :class:`~.walks.ChunkWalker` chosen for it (:mod:`.walks`):

- several drafts per call where the host returns n choices (greedy: adaptive, at most 4 by
  default; sampling: one unless ``drafts`` is given): a :class:`~.walks.tree.TreeWalk`;
- greedy, where the tail can be asked about (one tokenizer, ``logit_bias`` honoured): a
  :class:`~.walks.greedy.GreedyWalk`, streamed or whole, which pauses for greedy's tail probe
  where a token outside the top-k may be the argmax (:mod:`.tail`);
- one draft streamed, on a host that streams logprobs, unless the walk may pause for a tail
  probe: a streamed :class:`~.walks.draft.DraftWalk`;
- sampled, where tail probes may be asked (``tail_calls`` >= 1, a host whose ``logit_bias``
  biases only the draw): a :class:`~.walks.probes.ProbeWalk`; probe calls are counted in
  ``usage.api_calls`` and ``usage.tail_calls`` and in each chunk's trace;
- otherwise a whole :class:`~.walks.draft.DraftWalk` (greedy, or the candidates-only rule).

On a plain chat host (no continuation) every chunk after the first is asked by instruction
(:mod:`.instructed`): the host copies the answer so far and drafts on, and the positions after
the copy are walked as a continuing host's; such chunks are asked whole, with one draft, and
greedy walks there do not probe the tail.

What this module adds: the chunk requests (seeded from the decoder's generator) and their length,
which adapts to the acceptance rate (:func:`~.walks.adaptive_chunk`); a chunk whose first position
cannot be walked (unknown draft, a possible end of text: that position is asked alone; a draw
with no text: chosen like per-step); appending what a walk kept (cut to whole UTF-8 characters
for text prompts), the end the API hides, and one trace step per token returned.

Left out: temperatures other than 0 or 1 and top_p < 1 (they would need normalisers over the
unseen tail of p_L^(1/T); refused rather than approximated silently: use the per-step strategy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from .._constants import PROB_FLOOR
from ..errors import HostedResponseError
from ..maths import combiner
from ..maths.tail import DEFAULT_DRAWS
from ..request import GenerationRequest
from ..types import Candidate, ChunkTrace, HostCapabilities, HostedRequest, HostedResult, Usage
from . import instructed
from .base import Decoder
from .prefix import HostedPrompt, is_utf8
from .scoring import Scoring
from .walks import (MAX_CHUNK, MAX_STALLED_CHUNKS, ChunkWalk, ChunkWalker, WalkContext, adaptive_chunk,
                    unwalkable)
from .walks.draft import DraftWalk
from .walks.greedy import GreedyWalk
from .walks.probes import ProbeWalk
from .walks.tree import DEFAULT_MAX_DRAFTS, TreeStats, TreeWalk, choose_drafts

__all__ = ["SpeculativeDecoder", "adaptive_chunk"]


class SpeculativeDecoder(Decoder):
    """Speculative proxy tuning: one API call per chunk of drafts. See the module docstring.

    ``params.temperature`` must be 1 (sampling) or 0 (greedy); ``params.chunk`` fixes the chunk
    length, else it adapts to the acceptance rate; ``params.tail_calls`` bounds the tail-probe
    calls per position (0: candidates only) and ``tail_draws`` the draws per probe; probes need
    ``host.logit_bias_cap`` > 0. ``params.drafts`` caps the drafts per call.
    """

    redraws_chunks = True  # an unfinished character: the next chunk is drawn anew

    def __init__(self, params: GenerationRequest, *, host: HostCapabilities, scoring: Scoring,
                 prompt: HostedPrompt, settings: dict[str, Any] | None = None, tail_draws: int = DEFAULT_DRAWS) -> None:
        super().__init__(params, host=host, scoring=scoring, prompt=prompt, settings=settings)
        self.greedy = params.temperature == 0
        self.chunk = params.chunk or adaptive_chunk(0, 0)
        self.chunks: list[ChunkTrace] = []
        self.tree = TreeStats()  # multi-draft walks so far (they choose the next call's drafts)
        self._context = WalkContext(params, host, scoring, prompt, self.generator, tail_draws)
        self._walker: ChunkWalker | None = None  # the walk of the chunk call in flight
        self._stalled = 0  # chunks in a row that added nothing
        self._one_step = False  # ask the next position alone (a possible end inside a chunk)

    # ----- requests -------------------------------------------------------------------------------
    def request(self) -> HostedRequest:
        asking = self._asking_tail() or self._asking_character()  # a position chosen like per-step asks more
        if asking is not None:
            return asking
        if self._walker is not None and self._walker.probing:
            return self._walker.request()
        self._walker = None
        if self._end_hidden or self._one_step or self.copies.level:
            return self._request(max_tokens=1, temperature=0.0)
        drafts = self.drafts_next()
        streamed = drafts == 1 and self._streams_next()
        n = max(1, min((self.params.chunk or MAX_CHUNK) if streamed else self.chunk,
                       self.params.max_tokens - self.generated))
        if self.greedy and drafts == 1:
            request = self._request(max_tokens=n, temperature=0.0, stream=streamed)
        else:
            seed = int(torch.randint(0, 2**31 - 1, (), generator=self.generator))
            request = self._request(max_tokens=n, temperature=1.0, seed=seed, n=drafts, stream=streamed)
        self._walker = self._walker_for(drafts, streamed)
        return request

    def _walker_for(self, drafts: int, streamed: bool) -> ChunkWalker:
        if drafts > 1:
            tree = TreeWalk(self._context, self.prefix, self.tree)
            tree.tail_off = self.tail_off  # no probes after an untrusted answer
            return tree
        if self.greedy and self._tail_checked():
            return GreedyWalk(self._context, self.prefix)
        if not streamed and not self.greedy and self._probes_allowed():
            return ProbeWalk(self._context, self.prefix)
        return DraftWalk(self._context, self.prefix)

    def _probes_allowed(self) -> bool:
        return (self.tail_off is None and self.params.tail_calls > 0 and self.host.logit_bias_cap > 0
                and self.host.continues_prefix)

    def _tail_checked(self) -> bool:
        """Greedy walks check the tail (:mod:`.tail`): one tokenizer, ids known, ``logit_bias`` honoured."""
        return (self.host.logit_bias_cap > 0 and self.scoring.same_vocab and self.prefix.ids is not None
                and self.tail_off is None and self.host.continues_prefix)

    def _streams_next(self) -> bool:
        """Whether the next chunk call is streamed and walked as it arrives: on a host that streams
        logprobs, unless its walk may pause for a tail probe (same tokenizer, sampling,
        ``tail_calls`` >= 1 and a host whose ``logit_bias`` biases only the draw)."""
        probes = (not self.greedy and self._probes_allowed() and self.scoring.same_vocab
                  and self.prefix.ids is not None)
        return self.host.streams_logprobs and self.host.continues_prefix and not probes

    @property
    def prefetch_useful(self) -> bool:  # a probe's answer needs no scoring
        return self._tail is None and self._character is None and (self._walker is None or not self._walker.probing)

    def drafts_next(self) -> int:
        """Drafts the next chunk call asks for (:func:`~.walks.tree.choose_drafts`): 1 where the
        host returns one choice per call or the user capped it at 1, and when sampling unless
        ``drafts`` is given: on the embedded default, sampled trees saved no calls and cost 3x the
        scoring (benchmarks/remote.py), and the single-draft walk alone asks tail probes."""
        cap = min(self.params.drafts or DEFAULT_MAX_DRAFTS, self.host.max_choices)
        if cap <= 1 or not self.host.continues_prefix or (
                self.params.drafts is None and (not self.greedy or self._streams_next())):
            return 1
        return choose_drafts(self.tree.first_accepted, self.tree.nodes, cap)

    # ----- answers ---------------------------------------------------------------------------------
    def take(self, result: HostedResult) -> bool:
        """A streamed chunk's positions so far (see :class:`~.walks.draft.DraftWalk`); True: close."""
        return self._walker.take(result)

    def observe(self, results: Sequence[HostedResult], api_seconds: float) -> ChunkTrace | None:
        if self._tail is not None:
            self._settle_tail(results, api_seconds)
            return None
        if self._character is not None:
            self._settle_character(results, api_seconds)
            return None
        walker = self._walker
        if walker is not None and walker.probing:
            self._count_call(results[0], api_seconds, tail_calls=1)  # one call: n choices share its usage
            return self._walked(walker, walker.observe(results, api_seconds))
        self._walker = None
        if self._not_copied(results, api_seconds):
            return None
        result = instructed.first_copied(results)
        self._count_call(result, api_seconds)
        if self._end_hidden or self._one_step or self.copies.level:
            self._observe_alone(result, api_seconds)
            return None
        self.usage = self.usage + Usage(draft_sequences=len(results))
        if not any(r.positions and unwalkable(r.positions[0]) is None for r in results):
            return self._unwalkable_chunk(result, api_seconds)
        self._walker = walker = walker or self._walker_for(len(results), False)  # (answers to no request())
        return self._walked(walker, walker.observe(results, api_seconds))

    def _observe_alone(self, result: HostedResult, api_seconds: float) -> None:
        """One position asked alone, chosen there like per-step: after the API hid the end (the
        end is now among the candidates), or at an entry that may be the end."""
        if self.copies.level:
            note = self.copies.settle()
            if not result.positions:
                self._ended_without_logprobs()
                return
        elif self._end_hidden:
            self._end_hidden = False
            if not result.positions:
                self.finish_reason = "stop"
                return
            note = "the API ended without logprobs; re-asked that position with the end banned from its draw"
        else:
            self._one_step = False
            if not result.positions:
                self._ended_without_logprobs()
                return
            note = "a top entry that may be the end of text; this position was asked alone"
        self._choose(result.positions[0], api_seconds, [note], 0.0 if self.greedy else 1.0, 1.0)

    def _walked(self, walker: ChunkWalker, walk: ChunkWalk | None) -> ChunkTrace | None:
        self.tail_off = self.tail_off or walker.tail_off
        if walk is None:
            return None  # paused for a tail probe: request() asks it
        self._walker = None
        return self._finish(walk)

    def _unwalkable_chunk(self, result: HostedResult, api_seconds: float) -> None:
        """A chunk whose first position no walk can take: an end the API hid, a possible end (asked
        alone next), a draw with no text (chosen like per-step), else a host that omits drafts."""
        if not result.positions:
            self._ended_without_logprobs()
            return None
        first = result.positions[0]
        if first.end_unresolved:
            self._one_step = True
            return None
        if first.candidates and first.sampled is None:
            notes = [unwalkable(first), "the draw at this position has no text (a special token); chosen like per-step"]
            self._choose(first, api_seconds, notes, 0.0 if self.greedy else 1.0, 1.0)
            return None
        raise HostedResponseError(
            "the hosted API returned a chunk without the drawn tokens' logprobs; speculative decoding "
            "needs them (use --strategy per-step with this host)"
        )

    # ----- the end of a chunk ------------------------------------------------------------------
    def _finish(self, chunk: ChunkWalk) -> ChunkTrace:
        started = time.perf_counter()
        notes, usable = chunk.notes, chunk.usable
        chosen: list[Candidate] = [pos.sampled for pos in usable[: chunk.accepted]]
        if chunk.replacement is not None:
            chosen.append(chunk.replacement)
        text_prompt = not self.prompt.by_ids(self.prefix)
        if text_prompt:
            chosen, cut = self._cut_to_characters(chosen)
            if cut:
                notes.append(f"{cut} token(s) cut to end the chunk on a whole UTF-8 character (text prompt)")
        examined = chunk.accepted + (1 if chunk.rejected_at is not None else 0)
        before_generated = self.generated
        appended = 0
        for cand in chosen:
            if self.done:
                break
            self.append(cand)
            appended += 1
        self._record_steps(chunk, appended)
        if chunk.context_full and chunk.rejected_at is None and not self.done:
            self.stop("length")  # every position that fits was accepted (after a rejection the next chunk goes on)
        scoring = chunk.scoring + time.perf_counter() - started
        self.usage = self.usage + Usage(draft_tokens=examined, accepted_drafts=chunk.accepted, scoring_seconds=scoring,
                                        generated_tokens=self.generated - before_generated,
                                        overlapped_seconds=chunk.overlapped,
                                        untrusted_tail_calls=chunk.untrusted_calls)
        if not chosen and not self.done:
            self._stalled += 1
            first = chunk.allowed[0] if chunk.allowed else None
            if text_prompt and ((first is not None and not bool(first.any())) or self._stalled >= 2):
                # what could be kept ends inside a character a text prompt cannot carry (at once when no
                # candidate of the first position can be carried): the host's own tokens up to its end next
                notes.append("nothing from this chunk could be kept (it ends inside a character a text prompt "
                             "cannot carry); the host's own next tokens are taken up to the character's end")
                self._character = []
            else:
                notes.append("nothing from this chunk could be kept; the next call starts from the same prefix")
            if self._stalled >= MAX_STALLED_CHUNKS and text_prompt:
                self.give_up_on_character()
            elif self._stalled >= MAX_STALLED_CHUNKS:
                raise HostedResponseError(
                    f"{self._stalled} chunks in a row could not be kept; check that the host returns the drawn "
                    "tokens' logprobs (or use --strategy per-step with this host)"
                )
        else:
            self._stalled = 0
        if not self.done and chunk.rejected_at is None and chunk.unresolved:
            self._one_step = True
        if (not self.done and chunk.rejected_at is None and chunk.result.finish_reason == "stop"
                and len(usable) == len(chunk.result.positions)):
            # The API stopped after the last draft without reporting that position (OpenAI hides
            # the end token): ask that position again with the end banned from its draw.
            if not self._ended_without_logprobs():
                notes.append("the API ended the text; no logprobs for the end to tune it")
        if not self.params.chunk:
            self.chunk = adaptive_chunk(self.usage.accepted_drafts, self.usage.draft_tokens)
        trace = ChunkTrace(
            index=len(self.chunks),
            drawn=tuple(pos.sampled.text for pos in usable),
            accept_probs=tuple(chunk.probs),
            accepted=chunk.accepted,
            rejected_at=chunk.rejected_at,
            replacement=chunk.replacement.text if chunk.replacement is not None else None,
            log_z=tuple(chunk.log_z),
            tail=tuple(chunk.tails),
            alignment=chunk.alignment,
            api_seconds=chunk.api_seconds,
            scoring_seconds=scoring,
            notes=tuple(notes),
            tail_calls=chunk.tail_calls,
        )
        self.chunks.append(trace)
        return trace

    def _record_steps(self, chunk: ChunkWalk, appended: int) -> None:
        """One :class:`~blackbox_proxy.types.StepTrace` per token the chunk appended: that position's
        candidates as the walk chose among them (those a text prompt can carry, as per-step keeps
        them; a greedy tree walk's top-k), their offsets and the tuned distribution, with the draft
        (accepted) or the residual draw (the replacement) as the choice. So a speculative result's
        trace, like per-step's, has one step per token returned (``serve`` reads its logprobs
        there); the chunk's API and scoring time go on its first step."""
        temperature = 0.0 if self.greedy else 1.0
        for i in range(min(appended, len(chunk.rows))):
            row, (_, cands), allowed = chunk.rows[i], chunk.items[i], chunk.allowed[i]
            notes = ["speculative chunk {}: {}".format(len(self.chunks), "accepted draft" if i < chunk.accepted
                                                        else "residual draw at the rejected draft")]
            index = row.draft if i < chunk.accepted else next(
                (j for j, c in enumerate(cands) if c is chunk.replacement or c == chunk.replacement), None)
            keep = [j for j in range(len(cands)) if allowed is None or bool(allowed[j]) or j == index]
            chosen = [cands[j] for j in keep]
            hosted, lp_e, lp_a = row.hosted_logprobs[keep], row.lp_e[keep], row.lp_a[keep]
            if index is None:  # a residual draw from a tail probe: a token outside the candidates
                extra = chunk.replacement
                e, a = self._tail_logprobs(chunk, i, extra, notes)
                chosen.append(extra)
                hosted = torch.cat([hosted, hosted.new_tensor([extra.logprob])])
                lp_e, lp_a = torch.cat([lp_e, lp_e.new_tensor([e])]), torch.cat([lp_a, lp_a.new_tensor([a])])
                at = len(chosen) - 1
            else:
                at = keep.index(index)
            scores = combiner.proxy_scores(hosted, lp_e - lp_a, self.params.alpha)
            probs = combiner.tuned_distribution(scores, temperature, 1.0)
            self.steps.append(self._step_trace(
                chosen, lp_e.tolist(), lp_a.tolist(), scores, probs, at, chunk.alignment,
                chunk.api_seconds if i == 0 else 0.0, chunk.scoring if i == 0 else 0.0, chunk.usable[i].dropped, notes))

    @staticmethod
    def _tail_logprobs(chunk: ChunkWalk, i: int, token: Candidate, notes: list[str]) -> tuple[float, float]:
        """log P_E and log P_A of a token outside position ``i``'s candidates, from the small models'
        whole distributions there (tail probes need one tokenizer, so they are kept)."""
        floor = math.log(PROB_FLOOR)
        if chunk.full is None or token.token_id is None or token.token_id >= chunk.full[i][0].shape[0]:
            notes.append("the drawn tail token's offset is unknown; its score is its hosted logprob")
            return floor, floor
        e, a = (float(dist[token.token_id]) for dist in chunk.full[i])
        return max(floor, e), max(floor, a)

    def _cut_to_characters(self, chosen: list[Candidate]) -> tuple[list[Candidate], int]:
        """Text prompts cannot hold half a character: keep the longest run ending on a whole one."""
        for keep in range(len(chosen), -1, -1):
            data = self.prefix.data + b"".join(c.data for c in chosen[:keep])
            if is_utf8(data):
                return chosen[:keep], len(chosen) - keep
        return [], len(chosen)

    def result(self):
        base = super().result()
        return type(base)(text=base.text, finish_reason=base.finish_reason, usage=base.usage, trace=base.trace,
                          settings=base.settings, notes=base.notes, chunks=tuple(self.chunks))
