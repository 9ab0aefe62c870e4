"""Hosts, registered by name: what each OpenAI-compatible server does differently.

A host is a :class:`Dialect`: data (which models list names it, which body fields it wants,
what it caps) and a few hooks (how it continues an assistant prefix, how its answers are read,
what more calls an answer may need). Each lives in its own file in this folder and registers
itself with :func:`register`; every module here is imported when the registry is first read
(the built-in ones first, in :data:`DIALECTS` order), so adding a host is adding a file.

Detection (:func:`detect`) reads the host name of the base URL and the ``owned_by`` fields of
``/v1/models``, trying dialects in ``detect_order``; a dialect can always be given instead.

What it leaves out: HTTP, parsing and retries (``client.py``, ``wire.py``, ``retry.py``), which
ask the dialect and never compare its name.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ...errors import ConfigurationError

if TYPE_CHECKING:
    from ...tokens.vocab import Vocabulary
    from ...types import HostedRequest, HostedResult
    from ..wire import ResponseParser

    # A follow-up hook: a generator that yields the further requests an answer needs (each is
    # sent back its results) and returns the completed results.
    FollowUp = Callable[[ResponseParser, HostedRequest, list[HostedResult]],
                        Generator[HostedRequest, list[HostedResult], list[HostedResult]]]


OPENAI_MAX_LOGIT_BIAS = 300  # entries OpenAI accepts in one request's logit_bias


def _no_body(vocab: "Vocabulary | None") -> dict[str, Any]:
    return {}


@dataclass(frozen=True, eq=False)  # eq=False: one object per host, hashed by identity
class Dialect:
    """One host's differences from the plain OpenAI wire format (every field has that default).

    Detection: ``host_words`` (any of them in the base URL's host name) or ``owners`` (any of
    them an ``owned_by`` in ``/v1/models``) select it; ``detect_order``: lower is tried first.

    Requests: ``body_defaults(vocab)``: extra body fields sent unless the user's ``extra_body``
    sets them (``vocab``: the hosted tokenizer, or None); ``token_prompts``: the completions
    prompt may be hosted token ids; ``max_choices``: the most choices (``n``) one call returns,
    None when the host honours ``n``; ``top_k_caps``: the most top logprobs per mode (a mode
    left out: unknown, the server says); ``logit_bias_cap``: the most ``logit_bias`` entries the
    host honours on the draw while returning the model's own logprobs (0: not known to, so the
    speculative strategy asks no tail probes there); ``continue_prefix(text) -> (assistant message, body
    fields)``: how chat-prefix continues a partial answer, or ``prefix_refusal``, a message
    (``{base_url}`` filled in) for a host that cannot.

    Answers: ``printed_keys``, ``split_tops`` and ``recover_drawn`` are the parser's
    :class:`~blackbox_proxy.hosts.wire.ReadHooks`; ``resolve_end`` a :data:`FollowUp` that may
    ask more to tell whether an entry is the end of text
    (:attr:`~blackbox_proxy.types.HostedPosition.end_unresolved` is what decoders see).

    Streaming (:mod:`~blackbox_proxy.hosts.streaming`): ``streams_logprobs``, the host streams
    logprobs with each event (speculative chunks are then streamed by default);
    ``stream_options``, the ``stream_options`` body field of a streamed call.

    ``note``: one line for ``-v`` logs, what the dialect changes.
    """

    name: str
    note: str = "the plain OpenAI wire format"
    host_words: tuple[str, ...] = ()
    owners: frozenset[str] = frozenset()
    detect_order: int = 100
    body_defaults: Callable[["Vocabulary | None"], dict[str, Any]] = _no_body
    token_prompts: bool = False
    max_choices: int | None = None
    top_k_caps: Mapping[str, int] = field(default_factory=dict)
    logit_bias_cap: int = 0
    continue_prefix: Callable[[str], tuple[dict[str, Any], dict[str, Any]]] | None = None
    prefix_refusal: str | None = None
    printed_keys: bool = False
    split_tops: Callable[..., Any] | None = None
    recover_drawn: Callable[..., Any] | None = None
    resolve_end: "FollowUp | None" = None
    streams_logprobs: bool = False
    stream_options: Mapping[str, Any] = field(default_factory=lambda: {"include_usage": True})

    def __post_init__(self) -> None:
        object.__setattr__(self, "top_k_caps", MappingProxyType(dict(self.top_k_caps)))  # read-only
        object.__setattr__(self, "stream_options", MappingProxyType(dict(self.stream_options)))

    def matches(self, host: str, owners: set[str]) -> bool:
        return any(word in host for word in self.host_words) or bool(owners & self.owners)


UNKNOWN = Dialect(name="")  # a host no dialect matched: the plain OpenAI wire format

_REGISTRY: dict[str, Dialect] = {}
_BUILTIN = ("openai", "vllm", "llamacpp", "prefix")  # imported first: DIALECTS keeps this order
_loaded = False


def register(dialect: Dialect) -> Dialect:
    """Add a host (a later registration of the same name replaces the earlier one)."""
    if not dialect.name:
        raise ConfigurationError("a dialect needs a name: pass Dialect(name=...)")
    _REGISTRY[dialect.name] = dialect
    return dialect


def _load() -> None:
    """Import every module of this folder once; each registers its dialects."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    found = sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))
    for name in [*_BUILTIN, *(n for n in found if n not in _BUILTIN)]:
        importlib.import_module(f"{__name__}.{name}")


def names() -> tuple[str, ...]:
    """Every registered dialect name, built-in ones first."""
    _load()
    return tuple(_REGISTRY)


def get(name: str) -> Dialect:
    """The dialect registered as ``name``."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigurationError(f"dialect must be one of {', '.join(_REGISTRY)}; got {name!r}") from None


def detect(host: str, owners: set[str]) -> Dialect | None:
    """The dialect of a server, from the host name of its URL and the ``owned_by`` fields of its
    ``/v1/models`` answer; None when nothing matches.

    >>> detect("api.deepseek.com", set()).name, detect("127.0.0.1:8000", {"vllm"}).name
    ('deepseek', 'vllm')
    >>> detect("127.0.0.1:8000", {"llamacpp"}) is None
    True
    """
    _load()
    for dialect in sorted(_REGISTRY.values(), key=lambda d: d.detect_order):
        if dialect.matches(host, owners):
            return dialect
    return None


def prefix_capable() -> tuple[str, ...]:
    """Names of the dialects that can continue an assistant prefix."""
    _load()
    return tuple(name for name, d in _REGISTRY.items() if d.continue_prefix is not None)


DIALECTS: tuple[str, ...] = names()
