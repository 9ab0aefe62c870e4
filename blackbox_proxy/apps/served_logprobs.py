"""Logprobs of the tuned distribution in OpenAI's shapes, for ``blackbox-proxy serve``.

The tuned model's distribution at a position lives on the hosted API's candidates C (DESIGN.md
§2.1): at temperature 1, log p^(v) = log_softmax over C of score(v), with score = hosted logprob
+ alpha·delta. A served token's ``logprob`` is its log p^ there and ``top_logprobs`` are the best
entries of p^: the distribution before temperature and top-p, as vLLM and this project's
``serve-model`` report theirs. Nothing is reported for mass outside C.

- :class:`TokenLogprobs`: one output token, its tuned logprob and the distribution, whatever
  produced them: :data:`READERS` maps a strategy to the function that reads them from its
  :class:`~blackbox_proxy.types.GenerationResult` (per-step and speculative: the trace's
  candidate scores, one step per token). A strategy that records per-token distributions plugs
  in there; :func:`refusal` says why the others (resample, white-box) give none. :func:`from_forced` reads teacher forcing (``echo``).
- :func:`completion_logprobs` (``tokens``, ``token_logprobs``, ``top_logprobs``,
  ``text_offset``) and :func:`chat_logprobs` (``content`` entries with ``bytes``).
- :class:`StreamedTokens`: which tokens a streamed piece of text has shown (a token goes out
  with the event that shows its last character; what is left goes with the last event).

Conventions (those of ``serve-model``): a token prints as its text, or ``bytes:\\xNN`` when its
bytes are not whole UTF-8 (OpenAI's legacy style); an end of text is a last entry with its own
text and ``bytes`` null, not part of the text; tokens a stop string cut off entirely are left
out (one that straddles the cut is kept whole); candidates of tuned probability 0 are left out
of ``top_logprobs``; completion keys that print alike are merged (log-sum-exp).

Left out: the echo requests themselves (:mod:`.served_echo`); the resample and white-box strategies
(resample draws whole answers and keeps one by weight: no per-token distribution was sampled from).
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..hosts.wire import logaddexp
from ..types import GenerationResult, StepTrace

Entry = tuple[str, "bytes | None", float]  # (printed text, bytes or None for an end of text, log-probability)


@dataclass(frozen=True)
class TokenLogprobs:
    """One output token: ``text`` as printed, ``data`` its bytes (None: an end of text),
    ``logprob`` under the tuned distribution (None: it has none, e.g. echo's first token or a
    forced token outside the candidates) and ``top``, that distribution's entries best first
    (None where there is no distribution: echo's first token)."""

    text: str
    data: bytes | None
    logprob: float | None
    top: tuple[Entry, ...] | None


def printed(data: bytes) -> str:
    """A token's bytes as OpenAI prints them.

    >>> printed(b" caf"), printed("é".encode()[:1])
    (' caf', 'bytes:\\\\xc3')
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def _log_softmax(scores: Sequence[float]) -> list[float]:
    finite = [s for s in scores if math.isfinite(s)]
    if not finite:
        return [-math.inf] * len(scores)
    top = max(finite)
    log_z = top + math.log(math.fsum(math.exp(s - top) for s in finite))
    return [s - log_z if math.isfinite(s) else -math.inf for s in scores]


def _token(text: str, data: bytes | None, logprob: float, entries: Sequence[Entry]) -> TokenLogprobs:
    ranked = tuple(sorted((e for e in entries if math.isfinite(e[2])), key=lambda e: -e[2]))
    return TokenLogprobs(text, data, logprob if math.isfinite(logprob) else None, ranked)


def from_step(step: StepTrace) -> TokenLogprobs:
    """A decoding step's token and tuned distribution (log_softmax of the candidates' scores),
    with each candidate's bytes as the trace carries them."""
    logprobs = _log_softmax([c.score for c in step.candidates])
    entries: list[Entry] = [(c.text, None, lp) if c.is_end else (printed(c.data), c.data, lp)
                            for c, lp in zip(step.candidates, logprobs)]
    text, data, lp = entries[step.chosen]
    return _token(text, data, lp, entries)


def from_per_step(result: GenerationResult) -> list[TokenLogprobs]:
    """Every generated token of a result with one trace step per token, the cut-off ones left out."""
    return trim([from_step(step) for step in result.trace], result.text)


# strategy -> reader of its per-token distributions; a strategy that records them adds itself here
# (speculative records one step per token too: the walked position's candidates and tuned
# distribution, the accepted draft or the residual draw as the choice)
READERS: dict[str, Callable[[GenerationResult], list[TokenLogprobs]]] = {"per-step": from_per_step,
                                                                         "speculative": from_per_step}


def refusal(strategy: str) -> str | None:
    """Why ``strategy`` cannot return logprobs (None: it can)."""
    if strategy in READERS:
        return None
    return (f"logprobs of the tuned distribution are returned with strategy {' or '.join(READERS)}; the {strategy} "
            "strategy does not record a distribution for every token it returns: leave logprobs out, or send "
            "\"strategy\": \"per-step\" or \"speculative\"")


def from_forced(steps: Sequence[Any], head: Sequence[bytes]) -> list[TokenLogprobs]:
    """Echo's tokens: the ``head`` tokens (bytes) without a logprob (the first has no context),
    then each :class:`~blackbox_proxy.decoding.forcing.ForcedStep`: the reference token's tuned logprob
    (None for a miss) and the tuned distribution over the candidates (ends print as their text)."""
    out = [TokenLogprobs(printed(b), b, None, None) for b in head]
    for step in steps:
        entries = [(c.text, None, lp) if c.is_end else (printed(c.data), c.data, lp) for c, lp in step.top]
        data = step.appended.data
        out.append(_token(printed(data), data, -math.inf if step.logprob is None else step.logprob, entries))
    return out


def _offsets(tokens: Sequence[TokenLogprobs], start: int = 0) -> list[int]:
    """The character offset where each token begins (a token that begins inside a character
    gets that character's offset), counted from ``start``."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, at = [], start
    for t in tokens:
        out.append(at)
        at += len(decoder.decode(t.data or b""))
    return out


def trim(tokens: list[TokenLogprobs], text: str) -> list[TokenLogprobs]:
    """``tokens`` less those that begin after ``text`` ends (a stop string cut them off); an end
    of text right after it stays."""
    offsets = _offsets(tokens)
    return [t for t, at in zip(tokens, offsets) if at < len(text) or (t.data is None and at == len(text))]


def _top_dict(entries: Sequence[Entry] | None, n: int) -> dict[str, float] | None:
    if entries is None:
        return None
    merged: dict[str, float] = {}
    for text, _, lp in entries:
        merged[text] = lp if text not in merged else logaddexp(merged[text], lp)
    return dict(sorted(merged.items(), key=lambda kv: -kv[1])[:n])


def completion_logprobs(tokens: Sequence[TokenLogprobs], n: int, start: int = 0,
                        offsets: Sequence[int] | None = None) -> dict[str, Any]:
    """OpenAI's completions ``logprobs`` object with ``n`` top entries per token; ``text_offset``
    counted from ``start`` (the prompt's length when the text follows it), the tokens' own
    ``offsets`` in the text when given (a streamed piece), else from their bytes."""
    at = [start + o for o in offsets] if offsets is not None else _offsets(tokens, start)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [_top_dict(t.top, n) for t in tokens], "text_offset": at}


def chat_logprobs(tokens: Sequence[TokenLogprobs], n: int) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` object: ``content`` entries with ``n`` top entries each."""
    def item(text: str, data: bytes | None, logprob: float | None) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": None if data is None else list(data)}

    return {"content": [dict(item(t.text, t.data, t.logprob), top_logprobs=[item(*e) for e in (t.top or ())[:n]])
                        for t in tokens], "refusal": None}


class StreamedTokens:
    """Hands a stream's tokens out with the text that shows them.

    ``add(steps, shown)``: the per-step trace steps new in an event and the length (characters)
    of the text shown so far; returns the tokens whose last character is shown, with their
    offsets. ``finish(result)`` returns the rest, less what a stop string cut off. A strategy
    other than per-step (a :data:`READERS` entry without per-step traces) hands all of its
    tokens out at ``finish``.
    """

    def __init__(self, strategy: str) -> None:
        self.strategy = strategy
        self.pending: list[tuple[TokenLogprobs, int, int]] = []  # (token, first char, one past its last char)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def add(self, steps: Sequence[StepTrace], shown: int) -> list[tuple[TokenLogprobs, int]]:
        if self.strategy != "per-step":
            return []
        for step in steps:
            token = from_step(step)
            begin = self._chars
            self._chars += len(self._decoder.decode(token.data or b""))
            partial = bool(self._decoder.getstate()[0])  # it ends inside a character
            self.pending.append((token, begin, self._chars + partial))
        ready = []
        while self.pending and self.pending[0][2] <= shown and self.pending[0][0].data is not None:
            token, begin, _ = self.pending.pop(0)
            ready.append((token, begin))
        return ready

    def finish(self, result: GenerationResult) -> list[tuple[TokenLogprobs, int]]:
        if self.strategy != "per-step":
            tokens = READERS[self.strategy](result)
            return list(zip(tokens, _offsets(tokens)))
        text = result.text
        rest = [(t, begin) for t, begin, _ in self.pending
                if begin < len(text) or (t.data is None and begin == len(text))]
        self.pending = []
        return rest
