"""Greedy choices that reach the tail: one position's check, its probe request and its answer.

At temperature 0 the per-step decoder and the greedy speculative walk choose the tuned argmax;
over the API's top-k alone, a token the expert wants but the hosted model ranks below k is never
chosen. :func:`check` asks the bound of :mod:`blackbox_proxy.maths.greedy_tail` whether a tail
token may beat the best candidate c*: None when it may not (no call), else a :class:`TailCheck`
whose :meth:`~TailCheck.request` is the one probe call that settles it and whose
:meth:`~TailCheck.decide` reads the answer into the exact argmax: c*, or the tail token that
beats it (a :class:`~blackbox_proxy.types.Candidate` with its hosted logprob).

Where it applies: the small models share the hosted tokenizer (log w is known for every id), the
host honours ``logit_bias`` on the draw (``HostCapabilities.logit_bias_cap`` > 0) and reports
token ids. Elsewhere the choice stays the candidates' argmax, as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._constants import PROB_FLOOR
from ..maths import greedy_tail
from ..maths.tail import log_weights
from ..types import Candidate, HostCapabilities, HostedRequest, HostedResult
from .prefix import HostedPrompt, Prefix, is_utf8
from .scoring import Offsets


@dataclass(frozen=True)
class TailCheck:
    """A greedy position whose tail may hold a better token than c* (``candidates[best]``)."""

    prefix: Prefix
    candidates: tuple[Candidate, ...]
    best: int
    s_best: float  # c*'s tuned score
    probe: greedy_tail.GreedyProbe
    full: tuple[torch.Tensor, torch.Tensor]
    alpha: float

    def request(self, prompt: HostedPrompt, host: HostCapabilities) -> HostedRequest:
        """One token at temperature 0 with c* and the suspects lifted by their log w (the other
        candidates banned): the host's greedy pick is the tuned argmax among them."""
        return prompt.request(self.prefix, host, max_tokens=1, temperature=0.0, logit_bias=self.probe.logit_bias())

    def decide(self, results: Sequence[HostedResult], vocab) -> tuple[Candidate | None, str]:
        """The tail token that beats c* (None: c* is the argmax over the whole vocabulary, or the
        answer decided nothing), and a note for the trace."""
        pos = results[0].positions[0] if results and results[0].positions else None
        picked = pos.sampled if pos is not None else None
        top = {c.token_id: c.logprob for c in (pos.candidates if pos is not None else ()) if c.token_id is not None}
        c_star = self.candidates[self.best]
        answer = greedy_tail.read_probe(self.probe, c_star.logprob, picked.token_id if picked else None,
                                        picked.logprob if picked else None, top)
        asked = f"{len(self.probe.asked)} suspect(s)" + (f", {self.probe.left_out} left out (logit_bias cap)"
                                                          if self.probe.left_out else "")
        if answer.winner is None:
            return None, f"tail probe ({asked}) decided nothing; the candidates' argmax stands"
        if answer.winner == self.probe.best:
            return None, f"tail probe ({asked}): no tail token beats the best candidate"
        w = answer.winner
        data = vocab.token_bytes[w] or b""
        logprob = answer.logprob if answer.logprob is not None else picked.logprob
        how = "after the bias" if answer.biased_report else "unbiased"
        token = Candidate(text=data.decode("utf-8", errors="replace"), data=data, logprob=logprob, token_id=w,
                          is_end=w in vocab.end_ids)
        e, a = self.offsets(token)
        if logprob + self.alpha * (e - a) < self.s_best:  # the biases are rounded: a near tie went the other way
            return None, f"tail probe ({asked}): its pick is just below the best candidate; the candidate stands"
        return token, f"tail probe ({asked}): a token outside the top-k is the argmax (its logprob read {how})"

    def distrust(self, results: Sequence[HostedResult]) -> str | None:
        """Why the probe's answer cannot be trusted (None: it can): the host picked a token the
        probe neither lifted nor left as c*, so it does not honour ``logit_bias`` on its draw."""
        pos = results[0].positions[0] if results and results[0].positions else None
        picked = pos.sampled.token_id if pos is not None and pos.sampled is not None else None
        if picked is None or picked == self.probe.best or picked in self.probe.asked:
            return None
        return "the host picked a token the tail probe did not lift (it does not honour logit_bias)"

    def offsets(self, token: Candidate) -> tuple[float, float]:
        """log P_E and log P_A of a tail token, from the small models' whole distributions."""
        floor = math.log(PROB_FLOOR)
        return tuple(max(floor, float(dist[token.token_id])) for dist in self.full)  # type: ignore[return-value]


def check(prefix: Prefix, candidates: Sequence[Candidate], offsets: Offsets, allowed: torch.Tensor | None,
          best: int, *, host: HostCapabilities, prompt: HostedPrompt, vocab, alpha: float,
          exhaustive: bool = True, top: int | None = None) -> TailCheck | None:
    """The tail check at a greedy position whose candidates' tuned argmax is ``candidates[best]``
    (among those ``allowed``): None when no tail token can beat it, or none can be asked about
    (see the module docstring), else the :class:`TailCheck` to ask. ``top``: the API's top-k are
    the first ``top`` candidates (the others, drafted tokens seen elsewhere, are known but do not
    bound the tail); default all."""
    if host.logit_bias_cap <= 0 or offsets.full is None or alpha == 0:
        return None
    ids = [c.token_id for c in candidates]
    if ids[best] is None or any(i is None and not c.is_end for i, c in zip(ids, candidates)):
        return None
    full_e, full_a = offsets.full
    size = min(vocab.size, full_e.numel())
    log_w = log_weights(full_e[:size], full_a[:size], alpha, math.log(PROB_FLOOR), [i for i in vocab.end_ids if i < size])
    textless = [i for i in vocab.textless_ids if i < size]
    if textless:
        log_w = log_w.clone()
        log_w[textless] = -math.inf
    known = [i for i in ids if i is not None and i < size]
    hosted = torch.tensor([c.logprob for c in candidates], dtype=torch.float64)
    s_best = float(hosted[best]) + alpha * (offsets.expert[best] - offsets.anti_expert[best])
    found = greedy_tail.suspects(torch.tensor(known, dtype=torch.long), s_best=s_best,
                                 cap=greedy_tail.tail_cap(hosted[:top], exhaustive), log_w=log_w)
    if allowed is not None:  # a text prompt carries whole characters only
        found = torch.tensor([i for i in found.tolist() if i in vocab.end_ids
                              or is_utf8(prefix.data + (vocab.token_bytes[i] or b""))], dtype=torch.long)
    if found.numel() == 0:
        return None
    probe = greedy_tail.greedy_probe(known, ids[best], found, log_w, cap=host.logit_bias_cap)
    return TailCheck(prefix, tuple(candidates), best, s_best, probe, (full_e, full_a), alpha)
