"""The speculative strategy: one API call per chunk of drafts, walked by rejection (DESIGN.md §2.3).

The API draws a chunk of N tokens at temperature 1, top_p 1 (so the drafts follow the hosted
p_L), with top-k logprobs at every position. The walk accepts drafts with min(1, w/Z) and
replaces the first rejected one by a residual draw (Leviathan et al. 2023, Alg. 1; the terms
draft, accepted, residual draw, tail and tail probe are defined in
:mod:`blackbox_proxy.maths.rejection`). The next call starts from the new prefix. Because the
drafts are the hosted model's own samples, accepted tokens can lie outside the top-k. At
temperature 0 the API's greedy chunk is kept up to the first position whose proxy-tuned argmax
over C differs (:func:`~blackbox_proxy.maths.rejection.walk_greedy`; equal to per-step greedy).

Two sampled walks of one draft:

- *with tail probes* (same tokenizer, a host whose ``logit_bias`` biases only the draw,
  ``tail_calls`` >= 1; ``probe_walk.py``): Z is bounded without a call where the bounds decide,
  else the walk pauses for a tail probe (:mod:`blackbox_proxy.maths.tail`) that ``request``
  asks and ``observe`` takes. Probe calls are counted in ``usage.api_calls`` and
  ``usage.tail_calls`` and in each chunk's trace;
- *candidates only* (:func:`~blackbox_proxy.maths.rejection.walk_sampled`): everywhere else,
  and at any position where a probe cannot be asked or was answered wrongly.

*Several drafts per call* (``multidraft.py``): where the host returns n choices per call, a
chunk call asks for up to ``params.drafts`` drafts (greedy: adaptive, at most 4 by default;
sampling: one unless ``drafts`` is given), walked as a token tree (:mod:`blackbox_proxy.maths.tree`:
multi-round rejection, exact like one draft, with the candidates-only rule for the tail; the
greedy walk keeps the longest path that is the tuned argmax).

What this module adds to the maths: the requests (seeded from the decoder's generator), scoring
every walked position in one batched forward per model, cutting a chunk where a draft is
unknown or may be the end of text (that position is then asked alone), keeping text prompts on
whole UTF-8 characters, the end the API hides, and the chunk length, which adapts to the
acceptance rate (:func:`adaptive_chunk`).

Left out: temperatures other than 0 or 1 and top_p < 1 (they would need normalisers over the
unseen tail of p_L^(1/T); refused rather than approximated silently: use the per-step strategy).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import torch

from .._constants import PROB_FLOOR
from ..errors import HostedResponseError
from ..maths import combiner
from ..maths.rejection import PositionScore, walk_greedy, walk_sampled
from ..types import Candidate, ChunkTrace, HostedPosition, HostedRequest, HostedResult, Usage
from .base import DecoderBase, is_utf8
from .chunks import MAX_CHUNK, MAX_STALLED_CHUNKS, ChunkWalk, adaptive_chunk
from .multidraft import DEFAULT_MAX_DRAFTS, TreeStats, choose_drafts, walk_tree
from .probe_walk import TailProbes
from .streamed import StreamedWalk

__all__ = ["SpeculativeDecoder", "adaptive_chunk"]


class SpeculativeDecoder(StreamedWalk, TailProbes, DecoderBase):
    """Speculative proxy tuning: one API call per chunk of drafts. See the module docstring.

    ``params.temperature`` must be 1 (sampling) or 0 (greedy); ``params.chunk`` fixes the chunk
    length, else it adapts to the acceptance rate (:func:`adaptive_chunk`); ``params.tail_calls``
    bounds the tail-probe calls per position (0: candidates only) and ``params.tail_draws`` the
    draws per probe. Probes need ``logit_bias_cap`` > 0 (set from the hosted client).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.chunk = self.params.chunk or adaptive_chunk(0, 0)
        self.chunks: list[ChunkTrace] = []
        self.greedy = self.params.temperature == 0
        self._stalled = 0  # chunks in a row that added nothing
        self._one_step = False  # ask the next position alone (a possible end inside a chunk)
        self._walking: ChunkWalk | None = None  # a chunk paused for a tail probe
        self.tail_off: str | None = None  # why tail probes stopped for this generation
        self.tree = TreeStats()  # multi-draft walks so far (they choose the next call's drafts)

    def request(self) -> HostedRequest:
        if self._walking is not None:
            return self._probe_request(self._walking)
        if self._end_hidden or self._one_step:
            return self._request(max_tokens=1, temperature=0.0)
        drafts = self.drafts_next()
        streamed = drafts == 1 and self._streams_next()
        n = max(1, min((self.params.chunk or MAX_CHUNK) if streamed else self.chunk,
                       self.params.max_tokens - self.generated))
        if self.greedy and drafts == 1:
            return dataclasses.replace(self._request(max_tokens=n, temperature=0.0), stream=streamed)
        seed = int(torch.randint(0, 2**31 - 1, (), generator=self.generator))
        request = self._request(max_tokens=n, temperature=1.0, seed=seed)
        return dataclasses.replace(request, n=drafts, stream=streamed)

    def _streams_next(self) -> bool:
        """Whether the next chunk call is streamed and walked as it arrives (``streamed.py``): on a
        host that streams logprobs, unless its walk may pause for a tail probe (same tokenizer,
        sampling, ``tail_calls`` >= 1 and a host whose ``logit_bias`` biases only the draw)."""
        probes = (not self.greedy and self.tail_off is None and self.params.tail_calls > 0
                  and self.logit_bias_cap > 0 and self.same_vocab and self.hosted_ids is not None)
        return self.stream_chunks and self.mode != "chat" and not probes

    @property
    def prefetch_useful(self) -> bool:
        return self._walking is None  # a tail probe's answer needs no small-model scoring

    def drafts_next(self) -> int:
        """Drafts the next chunk call asks for (:func:`~blackbox_proxy.decoding.multidraft.choose_drafts`):
        1 where the host returns one choice per call or the user capped it at 1, and when
        sampling unless ``drafts`` is given: on the embedded default, sampled trees saved no
        calls and cost 3x the scoring (benchmarks/remote.py), and the single-draft walk alone
        asks tail probes."""
        cap = min(self.params.drafts or DEFAULT_MAX_DRAFTS, self.max_choices)
        if cap <= 1 or self.mode == "chat" or (self.params.drafts is None and (not self.greedy or self._streams_next())):
            return 1
        return choose_drafts(self.tree.first_accepted, self.tree.nodes, cap)

    def observe(self, results: Sequence[HostedResult], api_seconds: float) -> ChunkTrace | None:
        if self._walking is not None:
            return self._observe_probe(results, api_seconds)
        result = results[0]
        self._count_call(result, api_seconds)
        if self._end_hidden:
            # The previous chunk ended where the API hid the end; this answer has that position
            # again, with the end among the candidates: choose there like per-step.
            self._end_hidden = False
            if not result.positions:
                self.finish_reason = "stop"
                return None
            notes = ["the API ended without logprobs; re-asked that position with the end banned from its draw"]
            self._choose_per_step(result.positions[0], api_seconds, notes, 0.0 if self.greedy else 1.0, 1.0)
            return None
        if self._one_step:
            # one position asked alone (see _walk): choose there like per-step
            self._one_step = False
            if not result.positions:
                self._ended_without_logprobs()
                return None
            notes = ["a top entry that may be the end of text; this position was asked alone"]
            self._choose_per_step(result.positions[0], api_seconds, notes, 0.0 if self.greedy else 1.0, 1.0)
            return None
        self.usage = self.usage + Usage(draft_sequences=len(results))
        if self._streaming is not None:
            return self.finish_streamed(result, api_seconds)
        if len(results) > 1:
            walk = walk_tree(self, results, api_seconds, self.tree)
            if walk is not None:
                return self._finish(walk)
        if not result.positions:
            self._ended_without_logprobs()
            return None
        return self._walk(result, api_seconds)

    # ----- one chunk ----------------------------------------------------------------------------
    def _walk(self, result: HostedResult, api_seconds: float) -> ChunkTrace | None:
        started = time.perf_counter()
        notes: list[str] = []
        positions = list(result.positions)
        # Only positions whose draft is known (and among the candidates) can be walked.
        usable = []
        unresolved = False
        for pos in positions:
            reason = self._unwalkable(pos)
            if reason is not None:
                notes.append(reason)
                unresolved = pos.end_unresolved
                break
            usable.append(pos)
        if not usable and unresolved:
            self._one_step = True
            return None
        if not usable and positions[0].candidates and positions[0].sampled is None:  # a draw with no text
            notes.append("the draw at this position has no text (a special token); chosen like per-step")
            self._choose_per_step(positions[0], api_seconds, notes, 0.0 if self.greedy else 1.0, 1.0)
            return None
        if not usable:
            raise HostedResponseError(
                "the hosted API returned a chunk without the drawn tokens' logprobs; speculative decoding "
                "needs them (use --strategy per-step with this host)"
            )
        items = []
        before = self.continuation
        ids = list(self.hosted_ids) if self.hosted_ids is not None else None
        for pos in usable:
            items.append((before, list(ids) if ids is not None else None, pos.candidates))
            before += pos.sampled.data
            if ids is not None:
                ids = ids + [pos.sampled.token_id] if pos.sampled.token_id is not None else None
        scored, alignment = self._score_positions(items)
        rows, allowed, more = self._rows(scored, items, usable)
        notes += more
        chunk = ChunkWalk(result, api_seconds, usable, items, rows, allowed, self.full_scores, alignment, unresolved, notes)
        if self.greedy or not self._probes_possible(chunk):
            walk = (walk_greedy(rows, self.params.alpha, allowed) if self.greedy
                    else walk_sampled(rows, self.params.alpha, self.generator, allowed))
            chunk.notes += list(walk.notes)
            chunk.probs, chunk.log_z, chunk.tails = list(walk.accept_probs), list(walk.log_z), list(walk.tail)
            chunk.accepted, chunk.rejected_at = walk.accepted, walk.rejected_at
            if walk.rejected_at is not None and walk.replacement is not None:
                chunk.replacement = usable[walk.rejected_at].candidates[walk.replacement]
            chunk.scoring += time.perf_counter() - started
            return self._finish(chunk)
        chunk.scoring += time.perf_counter() - started
        return self._advance(chunk)

    @staticmethod
    def _unwalkable(pos: HostedPosition) -> str | None:
        """Why a chunk walk stops before ``pos`` (the position is then asked anew), or None."""
        if pos.end_unresolved:
            # an entry that may be the end is not resolved inside a chunk; the position is
            # asked alone, where the client resolves it
            return "a top entry that may be the end of text; the chunk was cut there"
        if pos.sampled is None or not pos.candidates or not any(
            c is pos.sampled or c == pos.sampled for c in pos.candidates
        ):
            return "the API did not report a drawn token's logprob; the chunk was cut there"
        return None

    def _rows(self, scored: list[tuple[list[float], list[float]]],
              items: Sequence[tuple[bytes, list[int] | None, Sequence[Candidate]]],
              usable: Sequence[HostedPosition]) -> tuple[list[PositionScore], list[torch.Tensor | None], list[str]]:
        """The walk's rows of scored positions, the candidates a text prompt can end on at each,
        and a note on candidates excluded for want of evidence."""
        rows, allowed = [], []
        for (lp_e, lp_a), (cont, _, cands), pos in zip(scored, items, usable):
            e = torch.tensor(lp_e, dtype=torch.float64)
            a = torch.tensor(lp_a, dtype=torch.float64)
            draft = next((i for i, c in enumerate(cands) if c is pos.sampled), None)
            rows.append(PositionScore(torch.tensor([c.logprob for c in cands], dtype=torch.float64), e - a, e, a,
                                      draft if draft is not None else cands.index(pos.sampled)))
            allowed.append(None if self.token_prompts else
                           torch.tensor([c.is_end or is_utf8(cont + c.data) for c in cands]))
        silent = sum(v == -math.inf for lp_e, _ in scored for v in lp_e)
        notes = ([f"{silent} candidate(s) the small models cannot say excluded (no evidence: both at the floor)"]
                 if silent else [])
        return rows, allowed, notes

    # ----- the end of a chunk ------------------------------------------------------------------
    def _finish(self, chunk: ChunkWalk) -> ChunkTrace:
        started = time.perf_counter()
        notes, usable = chunk.notes, chunk.usable
        chosen: list[Candidate] = [pos.sampled for pos in usable[: chunk.accepted]]
        if chunk.replacement is not None:
            chosen.append(chunk.replacement)
        if not self.token_prompts:
            chosen, cut = self._cut_to_characters(chosen)
            if cut:
                notes.append(f"{cut} token(s) cut to end the chunk on a whole UTF-8 character (text prompt)")
        examined = chunk.accepted + (1 if chunk.rejected_at is not None else 0)
        before_generated = self.generated
        appended = 0
        for cand in chosen:
            if self.done:
                break
            self._append(cand)
            appended += 1
        self._record_steps(chunk, appended)
        scoring = chunk.scoring + time.perf_counter() - started
        self.usage = self.usage + Usage(draft_tokens=examined, accepted_drafts=chunk.accepted, scoring_seconds=scoring,
                                        generated_tokens=self.generated - before_generated)
        if not chosen and not self.done:
            notes.append("nothing from this chunk could be kept; the next call starts from the same prefix")
            self._stalled += 1
            if self._stalled >= MAX_STALLED_CHUNKS:
                raise HostedResponseError(
                    f"{self._stalled} chunks in a row ended inside a UTF-8 character, which a text prompt cannot "
                    "carry; pass --hosted-tokenizer so the client can send token-id prompts"
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
        self._adapt()
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
        them; a greedy tree walk's top-k), their offsets and the tuned distribution, with the draft (accepted) or the residual draw (the replacement) as
        the choice. So a speculative result's trace, like per-step's, has one step per token
        returned (``serve`` reads its logprobs there); the chunk's API and scoring time go on its
        first step."""
        temperature = 0.0 if self.greedy else 1.0
        for i in range(min(appended, len(chunk.rows))):
            row, (_, _, cands), allowed = chunk.rows[i], chunk.items[i], chunk.allowed[i]
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
            data = self.continuation + b"".join(c.data for c in chosen[:keep])
            if is_utf8(data):
                return chosen[:keep], len(chosen) - keep
        return [], len(chosen)

    def _adapt(self) -> None:
        if not self.params.chunk:
            self.chunk = adaptive_chunk(self.usage.accepted_drafts, self.usage.draft_tokens)

    def result(self):
        base = super().result()
        return type(base)(text=base.text, finish_reason=base.finish_reason, usage=base.usage, trace=base.trace,
                          settings=base.settings, chunks=tuple(self.chunks))
