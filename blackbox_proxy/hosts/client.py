"""The hosted model behind an OpenAI-compatible API: the only module that knows HTTP shapes.

Three modes (DESIGN.md §2.4):

- ``completions``: ``/v1/completions`` with a raw text prompt (or hosted token ids) and
  ``logprobs=k``. OpenAI legacy models, vLLM, llama.cpp, TGI and this project's server.
- ``chat-prefix``: chat completions that continue a partial assistant message. Dialects: vLLM
  (``continue_final_message``, also this project's server), DeepSeek and Mistral
  (``prefix: true`` on the assistant message). llama.cpp's server cannot: it always opens a
  new assistant turn.
- ``chat``: plain chat completions. The API cannot continue a partial answer, so only the first
  generated position can be tuned.

Responses become typed :class:`~blackbox_proxy.types.HostedResult` values. What real servers
send is normalised here: ``bytes`` missing or null (bytes derived from the token text, with
OpenAI's ``bytes:\\xNN`` and DeepSeek's ``\\xNN`` strings decoded), fewer top logprobs than
asked, the sampled token outside the top-k, duplicate entries, the -9999 sentinel, U+FFFD
placeholders for partial characters, ``token_id:N`` strings, and end-of-text tokens.

Dialects (:data:`DIALECTS`) are detected from ``/v1/models`` (``owned_by``) and the host name,
or given. What each changes is in :data:`DIALECT_NOTES`; in short, ``vllm`` asks for special
tokens and token ids, and ``llama.cpp`` (llama-cpp-python's server, ``owned_by: "me"``)
switches off the samplers it applies by default (``repeat_penalty`` 1.1, ``top_k`` 40,
``min_p`` 0.05: a draft drawn through them is not drawn from the model's distribution), asks
one choice per call (it ignores ``n``), and reads its string-keyed ``top_logprobs``. There a
token is printed as its bytes decoded with errors ignored, so the end token, other control
tokens and pieces of a multi-byte character all print as ``""`` and share one dict entry,
which keeps the rank of its best token and the logprob of its worst:

- the ``""`` entry is taken out of each position (:meth:`ResponseParser._split_empty`); for a
  one-token greedy answer the client decides whether it is the end and reads its exact
  logprob, with one or two more calls where needed (:meth:`_HostedBase._resolve_end`); in
  chunks and sampled answers it is not read as the end (an end drawn there ends the answer,
  and the decoders ask that position again);
- other keys that a broken token can also print (``b" \xe2"`` prints as ``" "``) are dropped
  when their order shows that their value was overwritten;
- drawn tokens that printed as ``""`` get their bytes back from the answer's text through the
  hosted tokenizer when only one split exists (:meth:`ResponseParser.recover_drawn`); otherwise
  the answer is cut before them.

Retries live here too, and only here (the SDK's own retries are turned off): connection errors,
timeouts and 408/409/429/5xx are retried with jittered exponential backoff, ``retry-after`` is
honoured, and attempts and total waiting are capped (numbers in ``_constants.py``). A 200
whose logprobs are missing or truncated is asked again once, then reported. An optional
:class:`~blackbox_proxy.hosts.cache.ResponseCache` answers identical requests without a call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Generator, Sequence
from typing import Any
from urllib.parse import urlparse

from .. import _constants as C
from .._logging import redact, register_secret
from ..errors import (
    ConfigurationError,
    HostedAPIError,
    HostedAuthenticationError,
    HostedBadRequestError,
    HostedConnectionError,
    HostedModelNotFoundError,
    HostedRateLimitError,
    HostedResponseError,
)
from .cache import ResponseCache
from ..types import MODES, Candidate, EmptyEntry, HostedPosition, HostedRequest, HostedResult, HostedUsage
from ..tokens.vocab import Vocabulary

logger = logging.getLogger(__name__)

DIALECTS = ("openai", "vllm", "llama.cpp", "deepseek", "mistral")
DIALECT_NOTES = {
    "openai": "completions: up to 5 logprobs, token-id prompts; chat: up to 20 top logprobs; no assistant prefix",
    "vllm": "skip_special_tokens false, return_tokens_as_token_ids (with the hosted tokenizer), token-id "
            "prompts, continue_final_message for chat-prefix; --max-logprobs caps k (20 by default)",
    "llama.cpp": "repeat_penalty 1.0, top_k 0, min_p 0 (its defaults 1.1/40/0.05 bend the draws), one choice per "
                 "call, text prompts only, top logprobs keyed by printed text (\"\" resolved as the end or "
                 "dropped); no assistant prefix",
    "deepseek": "chat-prefix through prefix: true on the assistant message; up to 20 top logprobs",
    "mistral": "chat-prefix through prefix: true on the assistant message",
}
# `owned_by` in /v1/models answers: llama-cpp-python's server says "me". (llama.cpp's own
# llama-server says "llamacpp"; its logprobs carry ids and bytes and are not this dialect.)
_LLAMA_CPP_OWNERS = {"me"}
_HEX_ESCAPES = re.compile(r"^(?:\\x[0-9a-fA-F]{2})+$")
_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")
_TOKEN_ID = re.compile(r"^token_id:(\d+)$")
_REPLACEMENT = "\ufffd"


# ----- conversion of token strings --------------------------------------------------------------


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
    """Add ``/v1`` to a bare host URL (``http://127.0.0.1:8000`` -> ``.../v1``)."""
    url = base_url.rstrip("/")
    parsed = urlparse(url)
    if not parsed.scheme or not parsed.netloc:
        raise ConfigurationError(f"base URL must look like http://host:port/v1, got {base_url!r}")
    if parsed.path in ("", "/"):
        url += "/v1"
    return url


class _PositionBuilder:
    """Collects one position's entries; merges duplicates; drops what cannot be used."""

    def __init__(self, parser: "ResponseParser") -> None:
        self.parser = parser
        self.by_key: dict[tuple, Candidate] = {}
        self.dropped = 0

    def add(self, text: str, raw_bytes: Sequence[int] | None, logprob: float | None) -> Candidate | None:
        return self.add_candidate(self.parser.candidate(text, raw_bytes, logprob), count_drop=True)

    def add_candidate(self, cand: Candidate | None, count_drop: bool = False) -> Candidate | None:
        if cand is None:
            self.dropped += count_drop
            return None
        key = _key(cand)
        old = self.by_key.get(key)
        if old is None:
            self.by_key[key] = cand
        elif abs(old.logprob - cand.logprob) > 1e-9:
            # Two different hosted tokens with the same bytes: the text event has both masses.
            merged = float(math_logaddexp(old.logprob, cand.logprob))
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


def math_logaddexp(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def _prints_empty(piece: bytes) -> bool:
    """How llama.cpp prints a token: its bytes decoded with errors ignored; True when nothing is left."""
    return piece.decode("utf-8", errors="ignore") == ""


def _unique_split(data: bytes, parts: int, vocab: Vocabulary) -> list[bytes] | None:
    """The one way to cut ``data`` into ``parts`` tokens of ``vocab`` that each print as ``""``
    (pieces of a character, e.g. byte-fallback ``<0xE2>``), or None (no way, or several)."""
    n = len(data)
    if not data or parts < 1 or parts > n:
        return None
    # ways[i][k]: number of ways (capped at 2) to cut data[i:] into k such tokens
    ways = [[0] * (parts + 1) for _ in range(n + 1)]
    ways[n][0] = 1
    for i in range(n - 1, -1, -1):
        for j in range(i + 1, n + 1):
            piece = data[i:j]
            if not (vocab.ids_for_bytes(piece) and _prints_empty(piece)):
                continue
            for k in range(1, parts + 1):
                ways[i][k] = min(2, ways[i][k] + ways[j][k - 1])
    if ways[0][parts] != 1:
        return None
    out, i, k = [], 0, parts
    while k:
        j = next(j for j in range(i + 1, n + 1) if vocab.ids_for_bytes(data[i:j]) and _prints_empty(data[i:j])
                 and ways[j][k - 1] == 1)
        out.append(data[i:j])
        i, k = j, k - 1
    return out


class ResponseParser:
    """Turns SDK response objects into :class:`HostedResult` values."""

    def __init__(self, vocab: Vocabulary | None = None, *, llama_cpp: bool = False) -> None:
        self.vocab = vocab
        self.llama_cpp = llama_cpp  # top logprobs keyed by printed text (see the module docstring)
        self._shared_prints: frozenset[str] | None = None

    @property
    def shared_prints(self) -> frozenset[str]:
        """Non-empty strings that a token which is not valid UTF-8 on its own also prints as
        (llama.cpp drops its broken bytes: ``b" \xe2"`` prints as ``" "``)."""
        if self._shared_prints is None:
            found = set()
            for data in (self.vocab.token_bytes if self.vocab is not None else ()):
                if data:
                    try:
                        data.decode("utf-8")
                    except UnicodeDecodeError:
                        printed = data.decode("utf-8", errors="ignore")
                        if printed:
                            found.add(printed)
            self._shared_prints = frozenset(found)
        return self._shared_prints

    def _split_empty(self, tops: Any, sampled_text: str) -> tuple[set[str], int, EmptyEntry | None]:
        """llama.cpp: which keys of a position's top logprobs to skip, how many of them are
        dropped as unreadable, and its ``""`` entry (taken out; the client, which knows the
        request, resolves it). ``tops``: dict or list of entries.

        llama-cpp-python builds the dict from the top-k sorted best first, so a key shared by
        several tokens sits at the rank of its FIRST token but holds the logprob of its LAST.
        A key that another token can also print, with a later key above it, lost its value
        that way and is dropped. Where the drawn token itself printed as ``""`` (a piece of a
        character), the ``""`` entry holds its logprob, not the end's: it is dropped too.
        """
        if not self.llama_cpp or not tops:
            return set(), 0, None
        if isinstance(tops, dict):
            pairs = [(t, float(v)) for t, v in tops.items() if v is not None]
        else:
            pairs = [(e.token, float(e.logprob)) for e in tops if e.logprob is not None]
        shared = self.shared_prints
        empty, broken = None, set()
        for rank, (text, value) in enumerate(pairs):
            if text and text not in shared:
                continue
            exact = not any(v > value + 1e-6 for _, v in pairs[rank + 1 :])
            if text == "":
                empty = EmptyEntry(rank, value, exact, tuple(t for t, _ in pairs[:rank]))
            elif not exact:
                broken.add(text)
        if sampled_text == "" or empty is None:
            return broken | ({""} if empty else set()), len(broken) + bool(empty), None
        return broken | {""}, len(broken), empty

    def recover_drawn(self, tokens: Sequence[str], text: str) -> tuple[dict[int, bytes], int | None]:
        """llama.cpp: bytes of drawn tokens that printed as ``""`` (pieces of a character), read
        back from the answer's text through the hosted vocabulary: ``({index: bytes}, cut)``;
        from index ``cut`` on (None: nowhere) the drawn tokens' bytes are not known.

        The text holds the whole characters that a run of such tokens makes; their bytes are
        split among the run's tokens where the hosted vocabulary allows exactly one way. A run
        that cannot be read back (no vocabulary, an ambiguous split, the answer ending inside a
        character) and any token before it that could hide broken bytes (see
        :attr:`shared_prints`) are cut: those positions keep no drawn token, so a speculative
        chunk ends before them.
        """
        if not self.llama_cpp or "".join(tokens) == text:
            return {}, None
        vocab = self.vocab
        shared = self.shared_prints

        def cut_at(i: int) -> int:
            while i > 0 and tokens[i - 1] in shared:
                i -= 1
            return i

        out: dict[int, bytes] = {}
        pos = i = 0
        while i < len(tokens):
            if tokens[i]:
                if not text.startswith(tokens[i], pos):
                    return out, cut_at(i)  # the pieces do not add up to the text
                pos += len(tokens[i])
                i += 1
                continue
            j = i
            while j < len(tokens) and not tokens[j]:
                j += 1
            end = len(text) if j == len(tokens) else text.find(tokens[j], pos + 1)
            split = _unique_split(text[pos:end].encode("utf-8"), j - i, vocab) if vocab is not None and end > pos else None
            if split is None:
                return out, cut_at(i)
            out.update(zip(range(i, j), split))
            pos, i = end, j
        return out, None

    def end_candidate(self, logprob: float) -> Candidate | None:
        """The end of text read from llama.cpp's ``""`` entry. It stands for every end token at
        once, so no single id is given (scoring then sums over all the end ids)."""
        if logprob is None or not math.isfinite(logprob) or logprob <= C.LOGPROB_SENTINEL:
            return None
        return Candidate("", b"", min(0.0, float(logprob)), None, True)

    def _is_end_text(self, text: str) -> bool:
        if self.vocab is not None and self.vocab.id_for_special(text) is not None:
            return self.vocab.is_end_text(text)
        return text in C.END_TOKEN_STRINGS

    def candidate(self, text: str, raw_bytes: Sequence[int] | None, logprob: float | None) -> Candidate | None:
        if logprob is None or not math.isfinite(logprob) or logprob <= C.LOGPROB_SENTINEL:
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

    def _end_placeholder(self, text: str, logprob: float | None) -> Candidate | None:
        if logprob is None or not math.isfinite(logprob) or logprob <= C.LOGPROB_SENTINEL:
            return None
        return Candidate(text, b"", min(0.0, float(logprob)), None, True)

    @staticmethod
    def _check_top(tops: Any, i: int, count: int, finish: str | None, want_top: bool) -> None:
        """A position with no top logprobs although some were asked for: a truncated answer
        (the last position of a finished answer is let through; some hosts leave it bare)."""
        if want_top and not tops and not (finish == "stop" and i == count - 1):
            raise HostedResponseError(
                f"the hosted API's answer has no top logprobs at position {i + 1} of {count} (truncated answer)"
            )

    def completion(self, response: Any, index: int = 0, *, want_top: bool = False) -> HostedResult:
        choice = response.choices[index]
        finish = getattr(choice, "finish_reason", None)
        lp = getattr(choice, "logprobs", None)
        tokens = list(getattr(lp, "tokens", None) or []) if lp is not None else []
        if not tokens:
            if finish == "stop" and not choice.text:
                return HostedResult(choice.text or "", (), finish, _usage(response))
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
            skip, builder.dropped, empty = self._split_empty(tops[i], tok)
            for text, value in (tops[i] or {}).items():
                if text not in skip:
                    builder.add(text, None, value)
            sampled = None if cut is not None and i >= cut else self.candidate(tok, recovered.get(i), token_logprobs[i])
            if sampled is None and tok == "" and finish == "stop" and i == len(tokens) - 1 and not self.llama_cpp:
                sampled = self._end_placeholder(tok, token_logprobs[i])
            positions.append(builder.finish(sampled, empty))
        return HostedResult(choice.text or "", tuple(positions), finish, _usage(response))

    def chat(self, response: Any, index: int = 0, *, want_top: bool = False) -> HostedResult:
        choice = response.choices[index]
        finish = getattr(choice, "finish_reason", None)
        text = getattr(choice.message, "content", None) or ""
        lp = getattr(choice, "logprobs", None)
        content = list(getattr(lp, "content", None) or []) if lp is not None else []
        if not content:
            if finish == "stop" and not text:
                return HostedResult("", (), finish, _usage(response))
            raise HostedResponseError(
                "the hosted API returned no logprobs in its chat answer; it must support "
                "`logprobs` and `top_logprobs` on /v1/chat/completions"
            )
        positions = []
        recovered, cut = self.recover_drawn([entry.token for entry in content], text)
        for i, entry in enumerate(content):
            self._check_top(entry.top_logprobs, i, len(content), finish, want_top)
            builder = _PositionBuilder(self)
            skip, builder.dropped, empty = self._split_empty(entry.top_logprobs, entry.token)
            for top in entry.top_logprobs or []:
                if top.token not in skip:
                    builder.add(top.token, top.bytes, top.logprob)
            sampled = (None if cut is not None and i >= cut
                       else self.candidate(entry.token, recovered.get(i, entry.bytes), entry.logprob))
            if (sampled is None and entry.token == "" and finish == "stop" and i == len(content) - 1
                    and not self.llama_cpp):
                sampled = self._end_placeholder(entry.token, entry.logprob)
            positions.append(builder.finish(sampled, empty))
        return HostedResult(text, tuple(positions), finish, _usage(response))


def _add_usage(a: HostedUsage, b: HostedUsage) -> HostedUsage:
    return HostedUsage(a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens)


def _usage(response: Any) -> HostedUsage:
    usage = getattr(response, "usage", None)
    if usage is None:
        return HostedUsage()
    return HostedUsage(int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0))


# ----- errors and retries ----------------------------------------------------------------------


def _one_line(text: str, secret: str | None) -> str:
    """One line, at most 400 characters, with the secret masked in every spelling we know."""
    text = str(text)
    if secret:
        for form in {secret, repr(secret)[1:-1], repr(secret.encode())[2:-1]}:
            text = text.replace(form, "***")
    text = redact(" ".join(text.split()))
    return text[:400]


def _server_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if body.get("message"):
            return str(body["message"])
    return str(getattr(exc, "message", None) or exc)


def _header(exc: BaseException, name: str) -> str | None:
    try:
        return exc.response.headers.get(name)  # type: ignore[attr-defined]
    except AttributeError:
        return None


def retry_delay(exc: BaseException, attempt: int, rng: random.Random) -> float | None:
    """Seconds to wait before retrying after ``exc`` (attempt 1, 2...), or None: do not retry.

    Retried: connection errors and timeouts, a 200 whose body is not valid JSON (cut off on the
    way), and the statuses in ``RETRYABLE_STATUS``. The server's ``retry-after-ms`` or
    ``retry-after`` (seconds) is honoured up to ``MAX_RETRY_AFTER``; otherwise jittered
    exponential backoff.
    """
    import openai

    if isinstance(exc, (openai.APIConnectionError, json.JSONDecodeError)):  # includes APITimeoutError
        pass
    elif isinstance(exc, openai.APIStatusError):
        if exc.status_code not in C.RETRYABLE_STATUS:
            return None
        for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
            header = _header(exc, name)
            if header:
                try:
                    return min(C.MAX_RETRY_AFTER, max(0.0, float(header) * scale))
                except ValueError:
                    pass  # an HTTP date: fall back to backoff
    else:
        return None
    base = min(C.MAX_RETRY_DELAY, C.INITIAL_RETRY_DELAY * 2 ** (attempt - 1))
    return base * (1 + C.RETRY_JITTER * (2 * rng.random() - 1))


class _HostedBase:
    """Configuration, request building, parsing and error mapping shared by both clients."""

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        mode: str = "completions",
        dialect: str | None = None,
        hosted_vocab: Vocabulary | None = None,
        timeout: float = C.DEFAULT_TIMEOUT,
        max_retries: int = C.MAX_RETRIES,
        token_prompts: bool | None = None,
        extra_body: dict[str, Any] | None = None,
        cache: "ResponseCache | str | os.PathLike | None" = None,
    ) -> None:
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if dialect is not None and dialect not in DIALECTS:
            raise ConfigurationError(f"dialect must be one of {', '.join(DIALECTS)}; got {dialect!r}")
        if not model:
            raise ConfigurationError("no hosted model name: pass --model NAME")
        if max_retries < 0:
            raise ConfigurationError(f"max_retries must be >= 0, got {max_retries}")
        self.model = model
        self.base_url = normalise_base_url(base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1")
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        key = (key or "").strip() or "no-key"
        register_secret(key)
        if any(ch.isspace() or not ch.isprintable() or not ch.isascii() for ch in key):
            raise ConfigurationError(
                "the API key holds spaces, control or non-ASCII characters; check --api-key / OPENAI_API_KEY"
            )
        self._api_key = key
        self.mode = mode
        self.parser = ResponseParser(hosted_vocab)
        self.dialect = dialect
        self.vocab = hosted_vocab
        self.timeout = timeout
        self.max_retries = max_retries
        self.extra_body = dict(extra_body or {})
        self._token_prompts = token_prompts
        self._checked = False
        self._rng = random.Random()
        self._own_cache = cache is not None and not isinstance(cache, ResponseCache)
        self.cache: ResponseCache | None = ResponseCache(cache) if self._own_cache else cache

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, mode={self.mode!r})"

    @property
    def token_prompts(self) -> bool:
        """Send hosted token ids as the completions prompt (exact continuation, no re-tokenising)."""
        if self._token_prompts is not None:
            return self._token_prompts
        # llama.cpp answers token-id prompts with HTTP 500
        return self.mode == "completions" and self.vocab is not None and self.dialect in ("vllm", "openai")

    @property
    def dialect(self) -> str | None:
        return self._dialect

    @dialect.setter
    def dialect(self, value: str | None) -> None:
        self._dialect = value
        self.parser.llama_cpp = value == "llama.cpp"

    @property
    def top_k_cap(self) -> int | None:
        """The most top logprobs this host returns in this mode (None: unknown, the server says)."""
        if self.dialect == "openai":
            return C.OPENAI_COMPLETIONS_MAX_LOGPROBS if self.mode == "completions" else C.OPENAI_CHAT_MAX_TOP_LOGPROBS
        if self.dialect == "deepseek":
            return C.OPENAI_CHAT_MAX_TOP_LOGPROBS
        return None

    @property
    def default_top_k(self) -> int:
        """The k asked when the user gives none: ``DEFAULT_TOP_K``, within the host's cap."""
        cap = self.top_k_cap
        return C.DEFAULT_TOP_K if cap is None else min(cap, C.DEFAULT_TOP_K)

    @property
    def max_choices(self) -> int:
        """The most choices (``n``) one call can return: llama.cpp ignores ``n``."""
        return 1 if self.dialect == "llama.cpp" else C.MAX_CHOICES_PER_CALL

    def _detect_dialect(self, owners: set[str]) -> None:
        if self.dialect is not None:
            return
        host = urlparse(self.base_url).netloc
        if "deepseek" in host:
            self.dialect = "deepseek"
        elif "mistral" in host:
            self.dialect = "mistral"
        elif owners & {"vllm", "blackbox-proxy"}:
            self.dialect = "vllm"
        elif owners & _LLAMA_CPP_OWNERS:
            self.dialect = "llama.cpp"
        elif "openai.com" in host:
            self.dialect = "openai"
        if self.dialect is not None:
            logger.info("hosted API dialect: %s (%s)", self.dialect, DIALECT_NOTES[self.dialect])

    def _after_models(self, models: Any) -> None:
        ids, owners = set(), set()
        for m in getattr(models, "data", None) or []:
            ids.add(getattr(m, "id", None))
            owners.add(str(getattr(m, "owned_by", "") or ""))
        self._detect_dialect(owners)
        if ids and self.model not in ids:
            shown = ", ".join(sorted(str(i) for i in ids)[:10])
            raise HostedModelNotFoundError(
                f"the hosted API at {self.base_url} does not serve model {self.model!r}; "
                f"it serves: {shown}. Pass one of them with --model",
                status_code=404,
            )
        self._checked = True

    def build(self, request: HostedRequest) -> tuple[str, dict[str, Any]]:
        """(endpoint, keyword arguments for the SDK call) for a request."""
        if request.mode != self.mode:
            raise ConfigurationError(f"request mode {request.mode!r} does not match client mode {self.mode!r}")
        if request.top_k < 0:
            raise ConfigurationError(f"top_k must be >= 0, got {request.top_k}")
        extra = dict(self.extra_body)
        common: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "n": request.n,
        }
        if request.seed is not None:
            common["seed"] = request.seed
        if request.logit_bias:
            common["logit_bias"] = {str(token): bias for token, bias in request.logit_bias}
        if self.dialect == "llama.cpp":
            # its defaults filter and penalise the draw; the logprobs it reports are the model's own
            for name, value in (("repeat_penalty", 1.0), ("top_k", 0), ("min_p", 0.0)):
                extra.setdefault(name, value)
            if request.n > 1:
                raise ConfigurationError(f"llama.cpp's server returns one choice per call; {request.n} were asked")
        if self.dialect == "vllm":
            extra.setdefault("skip_special_tokens", False)  # else end tokens print as ""
            if self.vocab is not None:
                # "token_id:N" strings: exact hosted ids, no lossy bytes for partial characters
                extra.setdefault("return_tokens_as_token_ids", True)
        if self.mode == "completions":
            prompt = list(request.prompt) if isinstance(request.prompt, tuple) else request.prompt
            if prompt is None or prompt == "" or prompt == []:
                raise ConfigurationError("completions mode needs a non-empty prompt")
            kwargs = dict(common, prompt=prompt, logprobs=request.top_k)
            endpoint = "completions"
        else:
            messages: list[dict[str, Any]] = [{"role": r, "content": c} for r, c in request.messages]
            if not messages:
                raise ConfigurationError("chat modes need at least one message")
            if request.assistant_prefix:
                if self.mode != "chat-prefix":
                    raise ConfigurationError("only chat-prefix mode can continue a partial assistant answer")
                dialect = self.dialect
                if dialect == "llama.cpp":
                    raise ConfigurationError(
                        f"{self.base_url} is a llama.cpp server, which cannot continue an assistant message (it "
                        "always opens a new turn); use --mode completions (apply the chat template to the prompt) "
                        "or --mode chat with --strategy resample"
                    )
                if dialect not in ("vllm", "deepseek", "mistral"):
                    raise ConfigurationError(
                        f"cannot tell how {self.base_url} continues an assistant prefix (a server that ignores "
                        "the request would silently start a new answer); pass --dialect vllm, deepseek or mistral"
                    )
                if dialect in ("deepseek", "mistral"):
                    messages.append({"role": "assistant", "content": request.assistant_prefix, "prefix": True})
                else:
                    messages.append({"role": "assistant", "content": request.assistant_prefix})
                    extra.update(continue_final_message=True, add_generation_prompt=False)
            kwargs = dict(common, messages=messages, logprobs=True, top_logprobs=request.top_k)
            endpoint = "chat"
        if extra:
            kwargs["extra_body"] = extra
        return endpoint, kwargs

    def parse(self, endpoint: str, response: Any, index: int = 0, *, want_top: bool = False) -> HostedResult:
        if endpoint == "completions":
            return self.parser.completion(response, index, want_top=want_top)
        return self.parser.chat(response, index, want_top=want_top)

    def parse_all(self, endpoint: str, response: Any, request: HostedRequest) -> list[HostedResult]:
        """One result per choice; :class:`HostedResponseError` for an answer that is not
        complete (missing choices, missing or truncated logprobs, an unexpected shape)."""
        try:
            choices = list(response.choices or [])
            if len(choices) < request.n:
                raise HostedResponseError(f"the hosted API returned {len(choices)} choices; {request.n} were asked")
            return [self.parse(endpoint, response, i, want_top=request.top_k > 0) for i in range(len(choices))]
        except (AttributeError, TypeError, KeyError, IndexError) as exc:
            raise HostedResponseError(
                f"the hosted API's answer does not have the OpenAI shape ({type(exc).__name__}: "
                f"{_one_line(str(exc), self._api_key)[:120]})"
            ) from None

    def _banned_for_probes(self) -> frozenset[int]:
        """Hosted ids that print as ``""`` on llama.cpp and do not end the text (control tokens,
        pieces of a character): banned from a probe's draw so that only the end can print so."""
        cached = getattr(self, "_probe_bans", None)
        if cached is None:
            vocab = self.vocab
            cached = frozenset(i for i, data in enumerate(vocab.token_bytes)
                               if i not in vocab.end_ids and (data is None or _prints_empty(data)))
            self._probe_bans = cached
        return cached

    def _ids_of_keys(self, keys: Sequence[str]) -> set[int]:
        ids: set[int] = set()
        for key in keys:
            special = self.vocab.id_for_special(key)
            if special is not None:
                ids.add(special)
            ids.update(self.vocab.ids_for_bytes(decode_token_text(key)))
        return ids

    def _resolve_end(self, request: HostedRequest, results: list[HostedResult]) -> Generator[
            HostedRequest, list[HostedResult], list[HostedResult]]:
        """llama.cpp: decide whether a one-token greedy answer's ``""`` entry is the end of text,
        and its exact logprob. A generator: it yields the further requests it needs (each sent
        back its results) and returns the results with the end among the candidates or not.

        Greedy, one token, the drawn token not ``""``: at rank 0 the entry must be a banned end
        (nothing else beats the draw). At a lower rank it may be a control token or a piece of a
        character: a probe asks again with every key above it and every other token that prints
        as ``""`` banned, so the greedy draw is the entry's best token; llama.cpp answers with
        nothing exactly when that is an end. When the value was overwritten (see
        :class:`~blackbox_proxy.types.EmptyEntry`), one more request with the end banned as well
        reads it alone. Chunks and sampled answers (and, without the hosted tokenizer, entries
        below rank 0) are never read as the end: an end drawn there is handled by the decoders.
        """
        if (self.dialect != "llama.cpp" or request.max_tokens != 1 or request.temperature != 0 or request.n != 1
                or len(results) != 1 or len(results[0].positions) != 1):
            return results
        result = results[0]
        pos = result.positions[0]
        entry = pos.empty_entry
        if entry is None or (entry.rank > 0 and self.vocab is None):
            return results
        ends = set(self.vocab.end_ids) if self.vocab is not None else set()
        base = {i: b for i, b in request.logit_bias if i not in ends}
        bans = dict(base)
        if self.vocab is not None:
            bans.update(dict.fromkeys(self._banned_for_probes() | self._ids_of_keys(entry.above), -100.0))
        narrow = dataclasses.replace(request, top_k=entry.rank + 1)
        calls, usage = 0, result.usage
        if entry.rank > 0:
            [probe] = yield dataclasses.replace(narrow, logit_bias=tuple(bans.items()))
            calls, usage = calls + 1, _add_usage(usage, probe.usage)
            if probe.positions or probe.finish_reason != "stop":
                return [dataclasses.replace(result, extra_calls=result.extra_calls + calls, usage=usage)]
        value = entry.logprob
        if not entry.exact:
            bans.update(dict.fromkeys(ends, -100.0))
            [alone] = yield dataclasses.replace(narrow, logit_bias=tuple(bans.items()))
            calls, usage = calls + 1, _add_usage(usage, alone.usage)
            read = alone.positions[0].empty_entry if alone.positions else None
            if read is not None and read.rank == entry.rank and read.exact:
                value = read.logprob
            else:  # not read back (no hosted tokenizer): a lower bound, the best key ranked below it
                value = max([entry.logprob] + [c.logprob for c in pos.candidates if c.text not in entry.above])
        end = self.parser.end_candidate(value)
        cands = tuple(sorted(pos.candidates + ((end,) if end is not None else ()), key=lambda c: -c.logprob))
        fixed = dataclasses.replace(pos, candidates=cands, empty_entry=None)
        return [dataclasses.replace(result, positions=(fixed,), extra_calls=result.extra_calls + calls, usage=usage)]

    def cache_key(self, endpoint: str, kwargs: dict[str, Any]) -> str | None:
        """The response-cache key of a call: the URL, endpoint and request body; never the key."""
        if self.cache is None:
            return None
        return self.cache.key(self.base_url, endpoint, kwargs)

    @staticmethod
    def from_cache(endpoint: str, body: str) -> Any:
        """Rebuild the SDK response object stored by :meth:`ResponseCache.put`."""
        from openai.types import Completion
        from openai.types.chat import ChatCompletion

        model = Completion if endpoint == "completions" else ChatCompletion
        return model.construct(**json.loads(body))

    def _bad_answer(self, exc: HostedResponseError, attempt: int) -> None:
        """Ask again after an incomplete answer, ``MALFORMED_RESPONSE_RETRIES`` times, then fail."""
        if attempt > C.MALFORMED_RESPONSE_RETRIES:
            raise HostedResponseError(f"{exc}; asked {attempt} times: check that the server at "
                                      f"{self.base_url} returns complete logprobs") from None
        logger.warning("incomplete answer from the hosted API (%s); asking again", exc)

    def _retry_delay_or_raise(self, exc: BaseException, attempt: int, started: float) -> float:
        """Seconds to wait before attempt ``attempt + 1``; raises the translated error when the
        failure is not retryable or the attempt/total-wait caps are reached."""
        delay = retry_delay(exc, attempt, self._rng)
        waited = time.monotonic() - started
        if delay is None or attempt > self.max_retries or waited + delay > C.MAX_TOTAL_RETRY_WAIT:
            raise self.translate(exc) from None
        logger.info("hosted API call failed (%s); retry %d in %.2f s", type(exc).__name__, attempt, delay)
        return delay

    def _after_models_error(self, exc: HostedAPIError) -> None:
        """``/v1/models`` failed: connection and key errors are fatal; a host without the
        endpoint (404) or with another failure there is checked by the first real call."""
        if isinstance(exc, (HostedConnectionError, HostedAuthenticationError)):
            raise exc
        self._checked = True
        self._detect_dialect(set())

    def translate(self, exc: BaseException) -> HostedAPIError:
        """Map an SDK exception to this library's error tree, with a message that says the fix."""
        import openai

        key = self._api_key
        where = f"the hosted API at {self.base_url}"
        if isinstance(exc, json.JSONDecodeError):
            return HostedResponseError(
                f"{where} kept answering with a body that is not valid JSON (cut off?); check the server and its proxies"
            )
        if isinstance(exc, openai.APITimeoutError):
            return HostedConnectionError(
                f"{where} did not answer within {self.timeout:g} s; check that it is up, or raise the timeout"
            )
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            return HostedConnectionError(
                f"cannot reach {where} ({_one_line(type(cause).__name__ + ': ' + str(cause), key)}); "
                "check --base-url (or OPENAI_BASE_URL) and that the server is running"
            )
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            message = _one_line(_server_message(exc), key)
            if status in (401, 403):
                return HostedAuthenticationError(
                    f"{where} rejected the API key ({status}: {message}); pass --api-key or set OPENAI_API_KEY",
                    status_code=status,
                )
            if status == 404:
                return HostedModelNotFoundError(
                    f"{where} answered 404 for model {self.model!r} ({message}); check --model, and --mode "
                    f"(this server may not have the {'/v1/completions' if self.mode == 'completions' else '/v1/chat/completions'} endpoint)",
                    status_code=status,
                )
            if status == 429:
                return HostedRateLimitError(
                    f"{where} kept rate-limiting after {self.max_retries} retries ({message}); lower the request rate or retry later",
                    status_code=status,
                )
            if status in (400, 422):
                hint = ""
                if "logprob" in message.lower():
                    hint = "; lower --top-k to what this server allows"
                return HostedBadRequestError(f"{where} refused the request ({status}: {message}){hint}", status_code=status)
            return HostedAPIError(f"{where} failed ({status}: {message}); retry later", status_code=status)
        return HostedAPIError(f"{where} failed: {_one_line(str(exc), key)}")


class HostedClient(_HostedBase):
    """Synchronous client (``openai.OpenAI``). See the module docstring for the modes.

    Example::

        client = HostedClient(base_url="http://127.0.0.1:8000/v1", model="tiny", mode="completions")
        result = client.complete(HostedRequest(mode="completions", prompt="Hello", max_tokens=1, top_k=5))
        result.positions[0].candidates[0].data
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import openai

        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=self._api_key, timeout=self.timeout, max_retries=0
        )

    def _with_retries(self, fn: Any, accept: Any = None) -> Any:
        """``fn()`` under the retry policy; ``accept(response)`` turns the answer into the result,
        and an incomplete answer (:class:`HostedResponseError`) is asked again (``_bad_answer``)."""
        import openai

        started = time.monotonic()
        attempt = bad = 0
        while True:
            try:
                response = fn()
            except (openai.OpenAIError, json.JSONDecodeError) as exc:
                attempt += 1
                time.sleep(self._retry_delay_or_raise(exc, attempt, started))
                continue
            try:
                return accept(response) if accept is not None else response
            except HostedResponseError as exc:
                bad += 1
                self._bad_answer(exc, bad)

    def check(self) -> None:
        """Ask ``/v1/models`` once: fail fast on a bad URL, key or model name; detect the dialect."""
        if self._checked:
            return
        try:
            models = self._with_retries(lambda: self._client.models.list())
        except HostedAPIError as exc:
            self._after_models_error(exc)
            return
        self._after_models(models)

    def complete(self, request: HostedRequest) -> list[HostedResult]:
        """One API call (llama.cpp: sometimes more, see :meth:`_resolve_end`); one
        :class:`HostedResult` per choice (``request.n`` of them)."""
        results = self._call(request)
        steps = self._resolve_end(request, results)
        try:
            ask = next(steps)
            while True:
                ask = steps.send(self._call(ask))
        except StopIteration as done:
            return done.value

    def _call(self, request: HostedRequest) -> list[HostedResult]:
        self.check()
        endpoint, kwargs = self.build(request)
        key = self.cache_key(endpoint, kwargs)
        body = self.cache.get(key) if key else None
        if body is not None:
            results = self.parse_all(endpoint, self.from_cache(endpoint, body), request)
        else:
            create = (self._client.completions.create if endpoint == "completions"
                      else self._client.chat.completions.create)
            results, response = self._with_retries(lambda: create(**kwargs),
                                                   lambda r: (self.parse_all(endpoint, r, request), r))
            if key:
                self.cache.put(key, response.model_dump_json())
        return results

    def close(self) -> None:
        self._client.close()
        if self._own_cache:
            self.cache.close()


class AsyncHostedClient(_HostedBase):
    """Asynchronous twin of :class:`HostedClient` (``openai.AsyncOpenAI``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import openai

        self._client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self._api_key, timeout=self.timeout, max_retries=0
        )

    async def _with_retries(self, fn: Any, accept: Any = None) -> Any:
        """See :meth:`HostedClient._with_retries`."""
        import openai

        started = time.monotonic()
        attempt = bad = 0
        while True:
            try:
                response = await fn()
            except (openai.OpenAIError, json.JSONDecodeError) as exc:
                attempt += 1
                await asyncio.sleep(self._retry_delay_or_raise(exc, attempt, started))
                continue
            try:
                return accept(response) if accept is not None else response
            except HostedResponseError as exc:
                bad += 1
                self._bad_answer(exc, bad)

    async def check(self) -> None:
        if self._checked:
            return
        try:
            models = await self._with_retries(lambda: self._client.models.list())
        except HostedAPIError as exc:
            self._after_models_error(exc)
            return
        self._after_models(models)

    async def complete(self, request: HostedRequest) -> list[HostedResult]:
        results = await self._call(request)
        steps = self._resolve_end(request, results)
        try:
            ask = next(steps)
            while True:
                ask = steps.send(await self._call(ask))
        except StopIteration as done:
            return done.value

    async def _call(self, request: HostedRequest) -> list[HostedResult]:
        await self.check()
        endpoint, kwargs = self.build(request)
        key = self.cache_key(endpoint, kwargs)
        body = await asyncio.to_thread(self.cache.get, key) if key else None
        if body is not None:
            results = self.parse_all(endpoint, self.from_cache(endpoint, body), request)
        else:
            create = (self._client.completions.create if endpoint == "completions"
                      else self._client.chat.completions.create)
            results, response = await self._with_retries(lambda: create(**kwargs),
                                                         lambda r: (self.parse_all(endpoint, r, request), r))
            if key:
                await asyncio.to_thread(self.cache.put, key, response.model_dump_json())
        return results

    async def close(self) -> None:
        await self._client.close()
        if self._own_cache:
            self.cache.close()
