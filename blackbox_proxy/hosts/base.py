"""What both hosted clients share: everything that is not I/O (the clients: ``client.py``).

Three modes (DESIGN.md §2.4):

- ``completions``: ``/v1/completions`` with a raw text prompt (or hosted token ids) and
  ``logprobs=k``: OpenAI's legacy models, most self-hosted servers and this project's own.
- ``chat-prefix``: chat completions that continue a partial assistant message, where the host's
  dialect says how (``hosts/dialects/``).
- ``chat``: plain chat completions. The API cannot continue a partial answer: after the first
  position, requests ask it to copy the answer so far and go on (``HostedRequest.copy``), and
  :mod:`.copying` gives back the positions after the copy.

:class:`HostedBase` holds everything that is not I/O: configuration, dialect detection from
``/v1/models`` (``owned_by``) and the host name, request building, parsing into typed
:class:`~blackbox_proxy.types.HostedResult` values (``wire.py``) and the cache key,
and one call path (:meth:`HostedBase._call`: read the cache, make the call under the retry policy
with the whole-answer or the streamed reader, write the cache), written once as a generator of
I/O steps. :class:`~.client.HostedClient` and :class:`~.client.AsyncHostedClient` only carry those steps out (the
SDK's own retries are off; ``retry.py`` has the one policy). An optional
:class:`~blackbox_proxy.hosts.cache.ResponseCache` answers identical requests without a call.

What it leaves out: what any one host does differently. That is data and hooks on its dialect
(``dialects/``): this module asks them and never compares a host's name.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Generator
from typing import Any, TypeAlias
from urllib.parse import urlparse

from .. import _constants as C
from .._logging import register_secret
from ..errors import (ConfigurationError, HostedAPIError, HostedAuthenticationError, HostedConnectionError,
                      HostedModelNotFoundError, HostedResponseError)
from ..tokens.vocab import Vocabulary
from ..types import MODES, HostCapabilities, HostedRequest, HostedResult
from . import copying, dialects, streaming
from .cache import ResponseCache
from .dialects import UNKNOWN, Dialect
from .retry import Site, one_line
from .wire import ResponseParser, answer_from_json, normalise_base_url

logger = logging.getLogger(__name__)
Plan: TypeAlias = Generator[tuple, Any, list[HostedResult]]  # a call path's I/O steps (see HostedBase._call)


def _either(names: tuple[str, ...]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


class HostedBase:
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
        stream_chunks: bool | None = None,
    ) -> None:
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if dialect is not None:
            dialects.get(dialect)
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
        self.stream_chunks = stream_chunks  # None: where the dialect streams logprobs (streaming.py)
        self.stream_off = False  # the host streamed text without logprobs
        self._own_cache = cache is not None and not isinstance(cache, ResponseCache)
        self.cache: ResponseCache | None = ResponseCache(cache) if self._own_cache else cache

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, mode={self.mode!r})"

    def use_vocabulary(self, vocab: Vocabulary) -> None:
        """Adopt the hosted tokenizer found after construction (``hosts/discover.py``)."""
        parser = ResponseParser(vocab)
        parser.host = self.parser.host
        self.parser, self.vocab = parser, vocab

    def api_key_for_probes(self) -> str:
        """The key, for this package's own unbilled probes of the same host (tokenizer discovery)."""
        return self._api_key

    # ----- what the host allows (its dialect's data) -----------------------------------------

    @property
    def dialect(self) -> str | None:
        """The host's dialect name, or None while unknown (detected by :meth:`check`)."""
        return self._host.name or None

    @dialect.setter
    def dialect(self, value: str | None) -> None:
        self._host: Dialect = UNKNOWN if value is None else dialects.get(value)
        self.parser.host = self._host  # how its answers are read

    @property
    def token_prompts(self) -> bool:
        """Send hosted token ids as the completions prompt (exact continuation, no re-tokenising)."""
        if self._token_prompts is not None:
            return self._token_prompts
        return self.mode == "completions" and self.vocab is not None and self._host.token_prompts

    @property
    def top_k_cap(self) -> int | None:
        """The most top logprobs this host returns in this mode (None: unknown, the server says)."""
        return self._host.top_k_caps.get(self.mode)

    @property
    def default_top_k(self) -> int:
        """The k asked when the user gives none: ``DEFAULT_TOP_K``, within the host's cap."""
        cap = self.top_k_cap
        return C.DEFAULT_TOP_K if cap is None else min(cap, C.DEFAULT_TOP_K)

    @property
    def logit_bias_cap(self) -> int:
        """The most ``logit_bias`` entries this host honours on the draw while returning the
        model's own logprobs; 0 when not known to (the speculative strategy then asks no tail
        probes and keeps its candidates-only rule)."""
        return self._host.logit_bias_cap

    @property
    def max_choices(self) -> int:
        """The most choices (``n``) one call can return."""
        return self._host.max_choices or C.MAX_CHOICES_PER_CALL

    @property
    def streams_logprobs(self) -> bool:
        """Speculative chunks are streamed, closed at the first rejection (``streaming.py``): where
        the user asked (``stream_chunks``), else where the dialect streams logprobs; never in chat
        mode, on hosts that may need more than one call to read an answer (a dialect's
        ``resolve_end`` or ``recover_drawn``), nor after the host streamed text without logprobs."""
        host = self._host
        wanted = host.streams_logprobs if self.stream_chunks is None else self.stream_chunks
        return (bool(wanted) and not self.stream_off and self.mode != "chat" and host.resolve_end is None
                and host.recover_drawn is None)

    def _stop_streaming(self) -> None:
        logger.warning("the hosted API at %s streams text without logprobs; chunks are asked whole from now on",
                       self.base_url)
        self.stream_off = True

    stream_options = property(lambda self: dict(self._host.stream_options))  # of a streamed call

    def capabilities(self, top_k: int | None = None) -> HostCapabilities:
        """What this host allows, as one frozen value for a decoder; ``top_k``: the candidates to
        ask per position (None: :attr:`default_top_k`), refused above the host's cap."""
        cap = self.top_k_cap
        if top_k is None:
            top_k = self.default_top_k
        elif cap is not None and top_k > cap:
            raise ConfigurationError(f"top_k {top_k} is above what {self.dialect} allows in {self.mode} mode ({cap}); "
                                     f"pass --top-k {cap} or less")
        return HostCapabilities(mode=self.mode, top_k=top_k, max_choices=self.max_choices,
                                logit_bias_cap=self.logit_bias_cap, streams_logprobs=self.streams_logprobs,
                                end_ids=tuple(sorted(self.vocab.end_ids)) if self.vocab is not None else ())

    def streams(self, request: HostedRequest) -> bool:
        """Whether ``complete_streamed`` streams this request (else it is one whole call)."""
        return request.stream and request.n == 1 and self.streams_logprobs

    # ----- /v1/models ----------------------------------------------------------------------

    def _detect_dialect(self, owners: set[str]) -> None:
        if self.dialect is not None:
            return
        found = dialects.detect(urlparse(self.base_url).netloc, owners)
        if found is not None:
            self.dialect = found.name
            logger.info("hosted API dialect: %s (%s)", found.name, found.note)

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

    def _after_models_error(self, exc: HostedAPIError) -> None:
        """``/v1/models`` failed: connection and key errors are fatal; a host without the
        endpoint (404) or with another failure there is checked by the first real call."""
        if isinstance(exc, (HostedConnectionError, HostedAuthenticationError)):
            raise exc
        self._checked = True
        self._detect_dialect(set())

    # ----- requests and answers ------------------------------------------------------------

    def build(self, request: HostedRequest) -> tuple[str, dict[str, Any]]:
        """(endpoint, keyword arguments for the SDK call) for a request."""
        if request.mode != self.mode:
            raise ConfigurationError(f"request mode {request.mode!r} does not match client mode {self.mode!r}")
        if request.top_k < 0:
            raise ConfigurationError(f"top_k must be >= 0, got {request.top_k}")
        host = self._host
        extra = dict(self.extra_body)
        common: dict[str, Any] = {"model": self.model, "max_tokens": request.max_tokens,
                                  "temperature": request.temperature, "top_p": request.top_p, "n": request.n}
        if request.seed is not None:
            common["seed"] = request.seed
        if request.logit_bias:
            if host.logit_bias_cap and len(request.logit_bias) > host.logit_bias_cap:
                raise ConfigurationError(f"{host.name} takes at most {host.logit_bias_cap} logit_bias entries; "
                                         f"{len(request.logit_bias)} were asked")
            common["logit_bias"] = {str(token): bias for token, bias in request.logit_bias}
        for name, value in host.body_defaults(self.vocab).items():
            extra.setdefault(name, value)  # the user's own extra body wins
        if host.max_choices is not None and request.n > host.max_choices:
            most = "one choice" if host.max_choices == 1 else f"at most {host.max_choices} choices"
            raise ConfigurationError(f"{host.name}'s server returns {most} per call; {request.n} were asked")
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
                message, fields = self._continue(request.assistant_prefix)
                messages.append(message)
                extra.update(fields)
            kwargs = dict(common, messages=messages, logprobs=True, top_logprobs=request.top_k)
            endpoint = "chat"
        if extra:
            kwargs["extra_body"] = extra
        return endpoint, kwargs

    def _continue(self, prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The assistant message that continues ``prefix``, and the body fields it needs."""
        if self.mode != "chat-prefix":
            raise ConfigurationError("only chat-prefix mode can continue a partial assistant answer")
        host = self._host
        if host.continue_prefix is not None:
            return host.continue_prefix(prefix)
        if host.prefix_refusal is not None:
            raise ConfigurationError(host.prefix_refusal.format(base_url=self.base_url))
        raise ConfigurationError(
            f"cannot tell how {self.base_url} continues an assistant prefix (a server that ignores "
            f"the request would silently start a new answer); pass --dialect {_either(dialects.prefix_capable())}"
        )

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
            results = [self.parse(endpoint, response, i, want_top=request.top_k > 0) for i in range(len(choices))]
        except (AttributeError, TypeError, KeyError, IndexError) as exc:
            raise HostedResponseError(
                f"the hosted API's answer does not have the OpenAI shape ({type(exc).__name__}: "
                f"{one_line(str(exc), self._api_key)[:120]})"
            ) from None
        if request.copy:  # continuation by instruction: the positions after the copy
            copy = request.copy.encode("utf-8")
            results = [copying.after_copy(r, copy) for r in results]
        return results

    # ----- the one call path ----------------------------------------------------------------

    def _answer(self, request: HostedRequest) -> Plan:
        """A whole answer: one call, then whatever more the dialect needs to complete it (its
        ``resolve_end`` hook, itself a generator of further requests)."""
        results = yield from self._call(request)
        follow = self._resolve_end(request, results)
        try:
            ask = next(follow)
            while True:
                ask = follow.send((yield from self._call(ask)))
        except StopIteration as done:
            return done.value

    def _resolve_end(self, request: HostedRequest, results: list[HostedResult]) -> Generator[
            HostedRequest, list[HostedResult], list[HostedResult]]:
        """Complete the answer where the host's dialect may hide the end of text (see its
        ``resolve_end``). A generator: it yields the further requests it needs (each sent back
        its results) and returns the results; with no such hook, at once."""
        if self._host.resolve_end is None:
            return results
        return (yield from self._host.resolve_end(self.parser, request, results))

    def _call(self, request: HostedRequest, watch: streaming.Watch | None = None) -> Plan:
        """One call: the cache's answer if it has one, else the call under the retry policy, read
        whole (``watch`` None) or streamed, and its answer stored. Yields the I/O steps
        (``("get", key)``, ``("call", endpoint, kwargs, request, watch)`` -> (results, JSON to
        store or None), ``("put", key, json)``) that each twin carries out."""
        endpoint, kwargs = self.build(request)
        key = self.cache.key(self.base_url, endpoint, kwargs) if self.cache is not None else None
        if key is not None:
            body = yield ("get", key)
            if body is not None:
                return self.parse_all(endpoint, answer_from_json(endpoint, body), request)
        results, stored = yield ("call", endpoint, kwargs, request, watch)
        if key is not None and stored is not None:
            yield ("put", key, stored)
        return results

    def _whole(self, endpoint: str, request: HostedRequest, response: Any) -> tuple[list[HostedResult], str | None]:
        """The whole-answer reader: the results, and the answer as the cache stores it (None
        without a cache, or when it cannot be written)."""
        results = self.parse_all(endpoint, response, request)
        return results, self.cache_body(response) if self.cache is not None else None

    @staticmethod
    def cache_body(response: Any) -> str | None:
        """The answer as the cache stores it, or None when it cannot be written (a lone surrogate
        in the host's text): the paid answer is still used, only not cached."""
        try:
            return response.model_dump_json()
        except (UnicodeError, ValueError) as exc:
            logger.warning("a hosted answer could not be cached (%s); it is used, not stored", type(exc).__name__)
            return None

    def _streamed(self, endpoint: str, request: HostedRequest, watch: streaming.Watch) -> tuple[
            streaming.Reader, dict[str, Any]]:
        """A fresh reader for one streamed attempt, and the SDK arguments of the streamed call."""
        return streaming.Reader(self, endpoint, request, watch), dict(stream=True,
                                                                    stream_options=dict(self._host.stream_options))

    def _site(self) -> Site:
        return Site(self.base_url, self.model, self.mode, self.timeout, self.max_retries, self._api_key)

    def _create(self, endpoint: str) -> Callable[..., Any]:
        sdk = self._client  # type: ignore[attr-defined]
        return sdk.completions.create if endpoint == "completions" else sdk.chat.completions.create
