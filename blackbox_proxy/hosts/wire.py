"""The wire format: SDK answer objects into typed :class:`~blackbox_proxy.types.HostedResult` values.

What real servers send is normalised here: ``bytes`` missing or null (bytes derived from the
token text, with OpenAI's ``bytes:\\xNN`` and DeepSeek's ``\\xNN`` strings decoded), fewer top
logprobs than asked, the sampled token outside the top-k, duplicate entries, the -9999
sentinel, U+FFFD placeholders for partial characters, ``token_id:N`` strings, and end-of-text
tokens. An answer whose logprobs are missing or truncated raises
:class:`~blackbox_proxy.errors.HostedResponseError` (the retry policy asks again). Also the one
rule on URLs (a bare host gets ``/v1``) and the SDK object of a cached JSON answer.

What it leaves out: HTTP, retries and request building (``client.py``, ``retry.py``), and every
host's own quirks. A host whose answers need more than the OpenAI shape gives the parser hooks
(:class:`ReadHooks`, carried by its dialect in ``dialects/``): how to split one position's top
logprobs, and how to read back drawn tokens the answer printed lossily.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import urlparse

from .. import _constants as C
from ..errors import ConfigurationError, HostedResponseError
from ..tokens.vocab import Vocabulary
from ..types import Candidate, EmptyEntry, HostedPosition, HostedResult, HostedUsage

_HEX_ESCAPES = re.compile(r"^(?:\\x[0-9a-fA-F]{2})+$")
_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")
_TOKEN_ID = re.compile(r"^token_id:(\d+)$")
_REPLACEMENT = "\ufffd"


def decode_token_text(text: str) -> bytes:
    """Bytes of a token string as APIs print it.

    >>> decode_token_text("bytes:\\\\xe2\\\\x82")
    b'\\xe2\\x82'
    >>> decode_token_text(" caf")
    b' caf'
    """
    if text.startswith("bytes:"):
        rest = text[len("bytes:") :]
        out = bytearray()
        pos = 0
        for match in _ESCAPE.finditer(rest):
            out += rest[pos : match.start()].encode("utf-8")
            out.append(int(match.group(1), 16))
            pos = match.end()
        out += rest[pos:].encode("utf-8")
        return bytes(out)
    if _HEX_ESCAPES.match(text):
        return bytes(int(h, 16) for h in _ESCAPE.findall(text))
    return text.encode("utf-8")


def normalise_base_url(base_url: str) -> str:
    """Add ``/v1`` to a bare host URL; refuse what is not a URL.

    >>> normalise_base_url("http://127.0.0.1:8000")
    'http://127.0.0.1:8000/v1'
    """
    url = base_url.rstrip("/")
    parsed = urlparse(url)
    if not parsed.scheme or not parsed.netloc:
        raise ConfigurationError(f"base URL must look like http://host:port/v1, got {base_url!r}")
    if parsed.path in ("", "/"):
        url += "/v1"
    return url


def answer_from_json(endpoint: str, body: "str | dict[str, Any]") -> Any:
    """The SDK answer object of a stored JSON body, or of that JSON already parsed (a streamed
    answer gathered so far); ``endpoint``: ``completions`` or ``chat``."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    model = Completion if endpoint == "completions" else ChatCompletion
    return model.construct(**(json.loads(body) if isinstance(body, str) else body))


def usage_of(response: Any) -> HostedUsage:
    """The token counts of an SDK answer (zeros where the host sends none), with the prompt tokens
    read from the host's prompt cache where it says so: OpenAI's (and vLLM's)
    ``prompt_tokens_details.cached_tokens``, DeepSeek's ``prompt_cache_hit_tokens``."""
    usage = getattr(response, "usage", None)
    if usage is None:
        return HostedUsage()
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    if cached is None:
        cached = getattr(usage, "prompt_cache_hit_tokens", None)
    prompt = int(usage.prompt_tokens or 0)
    return HostedUsage(prompt, int(usage.completion_tokens or 0), min(prompt, int(cached or 0)))


def add_usage(a: HostedUsage, b: HostedUsage) -> HostedUsage:
    """Token counts of two calls made for one answer.

    >>> add_usage(HostedUsage(3, 1), HostedUsage(4, 1, 2))
    HostedUsage(prompt_tokens=7, completion_tokens=2, cached_prompt_tokens=2)
    """
    return HostedUsage(a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens,
                       a.cached_prompt_tokens + b.cached_prompt_tokens)


def logaddexp(a: float, b: float) -> float:
    """log(e^a + e^b) without overflow.

    >>> round(math.exp(logaddexp(math.log(0.3), math.log(0.2))), 12)
    0.5
    """
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


class ReadHooks(Protocol):
    """What a host may change in how its answers are read (a dialect carries these).

    ``printed_keys``: top logprobs are keyed by the text a token prints as, so several tokens
    can share one key and a drawn ``""`` may be a piece of a character rather than the end.
    ``split_tops(parser, tops, drawn_text) -> (keys to skip, how many of them count as dropped,
    the ``""`` entry or None)``; ``recover_drawn(parser, tokens, text) -> ({index: bytes}, cut)``
    (see :meth:`ResponseParser.recover_drawn`). Either hook may be None: nothing to do.
    """

    printed_keys: bool
    split_tops: Any
    recover_drawn: Any


class _PositionBuilder:
    """Collects one position's entries; merges duplicates; drops what cannot be used."""

    def __init__(self, parser: "ResponseParser") -> None:
        self.parser = parser
        self.by_key: dict[tuple, Candidate] = {}
        self.dropped = 0

    def add(self, text: str, raw_bytes: Sequence[int] | None, logprob: float | None) -> Candidate | None:
        cand = self.parser.candidate(text, raw_bytes, logprob)
        if cand is None:
            self.dropped += 1
            return None
        key = _key(cand)
        old = self.by_key.get(key)
        if old is None:
            self.by_key[key] = cand
        elif abs(old.logprob - cand.logprob) > 1e-9:
            # Two different hosted tokens with the same bytes: the text event has both masses.
            merged = float(logaddexp(old.logprob, cand.logprob))
            self.by_key[key] = Candidate(old.text, old.data, merged, old.token_id, old.is_end)
        return cand

    def finish(self, sampled: Candidate | None, empty_entry: EmptyEntry | None = None) -> HostedPosition:
        if sampled is not None:
            key = _key(sampled)
            if key in self.by_key:
                sampled = self.by_key[key]
            else:
                self.by_key[key] = sampled
        ordered = sorted(self.by_key.values(), key=lambda c: -c.logprob)
        return HostedPosition(candidates=tuple(ordered), sampled=sampled, dropped=self.dropped,
                              empty_entry=empty_entry)


def _key(cand: Candidate) -> tuple:
    """Entries with the same key are the same event: same bytes, or the same end token."""
    return ("end", cand.text) if cand.is_end else ("bytes", cand.data)


def _usable(logprob: float | None) -> bool:
    return logprob is not None and math.isfinite(logprob) and logprob > C.LOGPROB_SENTINEL


class ResponseParser:
    """Turns SDK response objects into :class:`HostedResult` values.

    ``vocab``: the hosted tokenizer's byte view, when known (token ids, special tokens, exact
    bytes of partial characters). ``host``: the dialect's :class:`ReadHooks`, or None for the
    plain OpenAI shape. ``memo``: tables a host's hooks derive once from ``vocab``.
    """

    def __init__(self, vocab: Vocabulary | None = None, *, host: ReadHooks | None = None) -> None:
        self.vocab = vocab
        self.host = host
        self.memo: dict[str, Any] = {}

    @property
    def printed_keys(self) -> bool:
        """Top logprobs keyed by printed text (see :class:`ReadHooks`)."""
        return bool(self.host is not None and self.host.printed_keys)

    def split_tops(self, tops: Any, drawn_text: str) -> tuple[set[str], int, EmptyEntry | None]:
        hook = self.host.split_tops if self.host is not None else None
        return hook(self, tops, drawn_text) if hook is not None else (set(), 0, None)

    def recover_drawn(self, tokens: Sequence[str], text: str) -> tuple[dict[int, bytes], int | None]:
        """Bytes of drawn tokens that printed lossily, read back from the answer's text:
        ``({index: bytes}, cut)``; from index ``cut`` on (None: nowhere) the drawn tokens'
        bytes are not known and those positions keep no drawn token."""
        hook = self.host.recover_drawn if self.host is not None else None
        return hook(self, tokens, text) if hook is not None else ({}, None)

    def end_placeholder(self, text: str, logprob: float | None) -> Candidate | None:
        """An end of text known only by its logprob: no single hosted id (scoring then sums
        over all the end ids)."""
        if not _usable(logprob):
            return None
        return Candidate(text, b"", min(0.0, float(logprob)), None, True)

    def _is_end_text(self, text: str) -> bool:
        if self.vocab is not None and self.vocab.id_for_special(text) is not None:
            return self.vocab.is_end_text(text)
        return text in C.END_TOKEN_STRINGS

    def candidate(self, text: str, raw_bytes: Sequence[int] | None, logprob: float | None) -> Candidate | None:
        """One entry as a :class:`Candidate`, or None when it cannot be used."""
        if not _usable(logprob):
            return None
        logprob = min(0.0, float(logprob))
        vocab = self.vocab
        token_id: int | None = None
        match = _TOKEN_ID.match(text)
        if match and vocab is not None:
            token_id = int(match.group(1))
            if not 0 <= token_id < vocab.size:
                return None
            data = vocab.token_bytes[token_id]
            if data is None:
                if token_id in vocab.end_ids:
                    return Candidate(vocab.special_text.get(token_id, text), b"", logprob, token_id, True)
                return None
            return Candidate(data.decode("utf-8", "replace"), data, logprob, token_id, False)
        if self._is_end_text(text):
            end_id = vocab.id_for_special(text) if vocab is not None else None
            return Candidate(text, b"", logprob, end_id, True)
        if vocab is not None and vocab.id_for_special(text) is not None:
            return None  # a special token that does not end the text: no bytes to align
        data = bytes(raw_bytes) if raw_bytes is not None else decode_token_text(text)
        if _REPLACEMENT in text and not (vocab is not None and vocab.ids_for_bytes(data)):
            # A partial character printed as U+FFFD (vLLM fills `bytes` from that text too):
            # the true bytes are unknown unless the hosted vocabulary has such a token.
            return None
        if not data:
            return None
        if vocab is not None:
            token_id = vocab.canonical_id(data)
        return Candidate(text, data, logprob, token_id, False)

    @staticmethod
    def _check_top(tops: Any, i: int, count: int, finish: str | None, want_top: bool) -> None:
        """A position with no top logprobs although some were asked for: a truncated answer
        (the last position of a finished answer is let through; some hosts leave it bare)."""
        if want_top and not tops and not (finish == "stop" and i == count - 1):
            raise HostedResponseError(
                f"the hosted API's answer has no top logprobs at position {i + 1} of {count} (truncated answer)"
            )

    def _drawn(self, text: str, raw_bytes: Sequence[int] | None, logprob: float | None, *, known: bool,
               last: bool, finish: str | None) -> Candidate | None:
        """The drawn token of a position (``known``: its bytes can be told, see :meth:`recover_drawn`)."""
        sampled = self.candidate(text, raw_bytes, logprob) if known else None
        if sampled is None and text == "" and finish == "stop" and last and not self.printed_keys:
            # the end token printed as "" (skipped special tokens); where keys are printed
            # text a "" may as well be a piece of a character, so no end is invented there
            sampled = self.end_placeholder(text, logprob)
        return sampled

    def completion(self, response: Any, index: int = 0, *, want_top: bool = False) -> HostedResult:
        """One choice of a ``/v1/completions`` answer."""
        choice = response.choices[index]
        finish = getattr(choice, "finish_reason", None)
        lp = getattr(choice, "logprobs", None)
        tokens = list(getattr(lp, "tokens", None) or []) if lp is not None else []
        if not tokens:
            if finish == "stop" and not choice.text:
                return HostedResult(choice.text or "", (), finish, usage_of(response))
            raise HostedResponseError(
                "the hosted API returned no logprobs; it must support `logprobs` on /v1/completions "
                "(use --mode chat-prefix or chat if it only has chat logprobs)"
            )
        token_logprobs = list(lp.token_logprobs or [None] * len(tokens))
        tops = list(lp.top_logprobs or [None] * len(tokens))
        positions = []
        if len(tops) != len(tokens) or len(token_logprobs) != len(tokens):
            raise HostedResponseError(
                f"the hosted API's logprobs are truncated ({len(tokens)} tokens, {len(token_logprobs)} logprobs, "
                f"{len(tops)} top-logprob entries)"
            )
        recovered, cut = self.recover_drawn(tokens, choice.text or "")
        for i, tok in enumerate(tokens):
            self._check_top(tops[i], i, len(tokens), finish, want_top)
            builder = _PositionBuilder(self)
            skip, builder.dropped, empty = self.split_tops(tops[i], tok)
            for text, value in (tops[i] or {}).items():
                if text not in skip:
                    builder.add(text, None, value)
            sampled = self._drawn(tok, recovered.get(i), token_logprobs[i], known=cut is None or i < cut,
                                  last=i == len(tokens) - 1, finish=finish)
            positions.append(builder.finish(sampled, empty))
        return HostedResult(choice.text or "", tuple(positions), finish, usage_of(response))

    def chat(self, response: Any, index: int = 0, *, want_top: bool = False) -> HostedResult:
        """One choice of a ``/v1/chat/completions`` answer."""
        choice = response.choices[index]
        finish = getattr(choice, "finish_reason", None)
        text = getattr(choice.message, "content", None) or ""
        lp = getattr(choice, "logprobs", None)
        content = list(getattr(lp, "content", None) or []) if lp is not None else []
        if not content:
            if finish == "stop" and not text:
                return HostedResult("", (), finish, usage_of(response))
            raise HostedResponseError(
                "the hosted API returned no logprobs in its chat answer; it must support "
                "`logprobs` and `top_logprobs` on /v1/chat/completions"
            )
        positions = []
        recovered, cut = self.recover_drawn([entry.token for entry in content], text)
        for i, entry in enumerate(content):
            self._check_top(entry.top_logprobs, i, len(content), finish, want_top)
            builder = _PositionBuilder(self)
            skip, builder.dropped, empty = self.split_tops(entry.top_logprobs, entry.token)
            for top in entry.top_logprobs or []:
                if top.token not in skip:
                    builder.add(top.token, top.bytes, top.logprob)
            sampled = self._drawn(entry.token, recovered.get(i, entry.bytes), entry.logprob,
                                  known=cut is None or i < cut, last=i == len(content) - 1, finish=finish)
            positions.append(builder.finish(sampled, empty))
        return HostedResult(text, tuple(positions), finish, usage_of(response))
