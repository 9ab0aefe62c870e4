"""Typed values that cross module boundaries. Raw JSON and SDK objects stop at ``hosts/``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["completions", "chat-prefix", "chat"]
MODES: tuple[str, ...] = ("completions", "chat-prefix", "chat")


@dataclass(frozen=True)
class Candidate:
    """One hosted token the API reported at a position.

    ``data`` is the token's exact UTF-8 bytes (``b""`` for an end-of-text token).
    ``token_id`` is the hosted id when it is known (hosted vocabulary given, or the server
    reported ids). ``logprob`` is the hosted model's log-probability.
    """

    text: str
    data: bytes
    logprob: float
    token_id: int | None = None
    is_end: bool = False


@dataclass(frozen=True)
class HostedPosition:
    """Everything the API said about one generated position.

    ``candidates`` are unique by bytes, sorted by logprob (highest first) and include the sampled
    token when its logprob is known. ``sampled`` is the token the server drew (may lie outside the
    top-k). ``dropped`` counts entries that could not be used (unknown bytes, non-end special
    tokens, sentinel logprobs). ``empty_entry``: llama.cpp only, its ``""`` entry, which the
    client resolves (see ``hosts/``).
    """

    candidates: tuple[Candidate, ...]
    sampled: Candidate | None
    dropped: int = 0
    empty_entry: "EmptyEntry | None" = None

    @property
    def end_unresolved(self) -> bool:
        """An entry here may be the end of text and the client could not tell from this answer
        (llama.cpp's shared ``""`` entry inside a chunk): ask this position alone, as a one-token
        greedy request, which the client resolves."""
        return self.empty_entry is not None


@dataclass(frozen=True)
class EmptyEntry:
    """llama.cpp's ``""`` top-logprob entry: every token that prints as an empty string (the end
    of text, other control tokens, pieces of a character) shares it. ``rank``: where its best
    token ranks; ``logprob``: the value it holds (its WORST token's in the top-k); ``exact``:
    no later entry is above it, so the value is its best token's unless two shared adjacent
    ranks; ``above``: the keys ranked above it."""

    rank: int
    logprob: float
    exact: bool
    above: tuple[str, ...]


@dataclass(frozen=True)
class HostedUsage:
    """The token counts the host reported for one call. ``cached_prompt_tokens``: the part of the
    prompt the host read from its prompt cache (OpenAI's ``usage.prompt_tokens_details.cached_tokens``,
    DeepSeek's ``prompt_cache_hit_tokens``), billed at a discount; included in ``prompt_tokens``."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class HostedResult:
    """One choice of one API response, converted from the wire format."""

    text: str
    positions: tuple[HostedPosition, ...]
    finish_reason: str | None
    usage: HostedUsage
    extra_calls: int = 0  # further API calls the client made to complete this answer (llama.cpp's end)
    copy_failed: bool = False  # asked to begin with a copy of the answer so far, the host wrote something else


@dataclass(frozen=True)
class HostedRequest:
    """What the decoder asks of the hosted API; the client turns it into HTTP.

    ``prompt`` is raw text or hosted token ids (``completions`` mode). ``messages`` is the chat
    conversation (chat modes). ``assistant_prefix`` is the partial answer to continue
    (``chat-prefix`` mode). ``copy``: the answer so far, which a plain chat host is asked to
    write first and go on from (continuation by instruction, :mod:`blackbox_proxy.hosts.copying`):
    the client returns only the positions after it.
    """

    mode: str
    max_tokens: int
    top_k: int
    prompt: str | tuple[int, ...] | None = None
    messages: tuple[tuple[str, str], ...] = ()
    assistant_prefix: str = ""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    logit_bias: tuple[tuple[int, float], ...] = ()
    stream: bool = False  # a speculative chunk the decoder can walk as it arrives (hosts/streaming.py)
    copy: str = ""

    @property
    def length(self) -> int:
        """How long the text sent is, in the units it comes in (ids or characters): the prompt,
        messages (a copy's text among them) and partial answer. Within one generation it only grows."""
        return len(self.prompt or ()) + len(self.assistant_prefix) + sum(len(c) for _, c in self.messages)


@dataclass(frozen=True)
class HostCapabilities:
    """What a hosted API allows, as the client found it (``HostedClient.capabilities``): decoders
    read this and never a host's name.

    ``mode``: completions, chat-prefix or chat; ``top_k``: candidates asked per position (the
    tuner's ``top_k``, else the host's default, within its cap); ``max_choices``: the most
    choices (``n``) one call returns; ``logit_bias_cap``: the most ``logit_bias`` entries the host
    honours on the draw while returning the model's own logprobs (0: not known to; no tail
    probes then); ``streams_logprobs``: chunk calls can be streamed and walked as they arrive;
    ``end_ids``: the hosted end-of-text ids, when the hosted tokenizer is known (a host that
    hides the end is asked again with them banned).
    """

    mode: str = "completions"
    top_k: int = 20
    max_choices: int = 1
    logit_bias_cap: int = 0
    streams_logprobs: bool = False
    end_ids: tuple[int, ...] = ()

    @property
    def continues_prefix(self) -> bool:
        """The host continues a partial answer (completions, chat-prefix), so a generation can be
        asked token by token or chunk by chunk; plain chat starts a new answer every call, and is
        continued by instruction (:mod:`blackbox_proxy.decoding.instructed`)."""
        return self.mode != "chat"


@dataclass(frozen=True)
class CandidateTrace:
    """One candidate of one step, as the trace shows it (``data``: its exact bytes)."""

    text: str
    hosted_logprob: float
    expert_logprob: float
    anti_expert_logprob: float
    delta: float
    score: float
    prob: float
    is_end: bool = False
    token_id: int | None = None
    data: bytes = b""


@dataclass(frozen=True)
class StepTrace:
    """One decoding step: what the API offered, the offsets, and the choice."""

    index: int
    candidates: tuple[CandidateTrace, ...]
    chosen: int
    chosen_text: str
    alignment: str
    api_seconds: float
    scoring_seconds: float
    dropped: int = 0
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChunkTrace:
    """One speculative chunk: what the API drew, how much was accepted, what replaced the rest.

    ``drawn`` are the drafted tokens' texts, in order; ``accept_probs`` min(1, w(y)/Z) at each
    position examined; ``accepted`` how many drafts were kept; ``rejected_at`` the index of the
    first rejected draft (None if none); ``replacement`` the token drawn there from the residual
    (or the tuned argmax, greedy); ``log_z`` and ``tail`` the normaliser of each examined
    position and how its unseen tail was weighted (bounds, or what a tail probe found);
    ``tail_calls`` the tail probes' API calls made while walking this chunk.
    """

    index: int
    drawn: tuple[str, ...]
    accept_probs: tuple[float, ...]
    accepted: int
    rejected_at: int | None
    replacement: str | None
    log_z: tuple[float, ...]
    tail: tuple[str, ...]
    alignment: str
    api_seconds: float
    scoring_seconds: float
    notes: tuple[str, ...] = ()
    tail_calls: int = 0


@dataclass(frozen=True)
class Usage:
    """Totals of one generation. ``draft_tokens``/``accepted_drafts``: speculative drafts
    examined and accepted (multi-draft: tree nodes); ``tail_calls``: speculative tail probes, API
    calls also counted in ``api_calls`` (:mod:`blackbox_proxy.maths.tail`); ``draft_sequences``:
    drafts drawn by chunk calls (n per call, 1 for a single draft; every draft's tokens are billed);
    ``overlapped_seconds``: small-model work done while an API call was in flight (not in
    ``scoring_seconds``: it adds no wall time when the API is remote); ``cached_prompt_tokens``:
    the part of ``prompt_tokens`` the host billed as read from its prompt cache;
    ``untrusted_tail_calls``: tail probes whose answers showed that the host does not honour
    ``logit_bias`` as probes need (probes then stop for the generation: the candidates-only rule)."""

    api_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generated_tokens: int = 0
    api_seconds: float = 0.0
    scoring_seconds: float = 0.0
    draft_tokens: int = 0
    accepted_drafts: int = 0
    tail_calls: int = 0
    draft_sequences: int = 0
    overlapped_seconds: float = 0.0
    cached_prompt_tokens: int = 0  # of prompt_tokens, those the host read from its prompt cache
    untrusted_tail_calls: int = 0  # of tail_calls, those whose answers showed the host ignores logit_bias

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    @classmethod
    def of_call(cls, result: "HostedResult", api_seconds: float, **more: Any) -> "Usage":
        """One answered call: its API calls (with those the client added to complete it), the
        host's token counts and the seconds waited; ``more``: other fields."""
        u = result.usage
        return cls(api_calls=1 + result.extra_calls, prompt_tokens=u.prompt_tokens,
                   completion_tokens=u.completion_tokens, cached_prompt_tokens=u.cached_prompt_tokens,
                   api_seconds=api_seconds, **more)

    @property
    def calls_per_token(self) -> float:
        return self.api_calls / max(1, self.generated_tokens)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_drafts / self.draft_tokens if self.draft_tokens else None


@dataclass(frozen=True)
class SampleTrace:
    """One of the resample strategy's answers: its SIR log weight and normalised weight."""

    text: str
    log_weight: float
    weight: float
    tokens: int
    finish_reason: str | None
    picked: bool
    token_ids: tuple[int | None, ...] = ()  # hosted ids of the scored positions, when reported


@dataclass(frozen=True)
class GenerationResult:
    """Proxy-tuned text with its usage and trace: ``trace`` has one step per token chosen (per-step
    and speculative: the position's candidates, offsets and tuned distribution), ``chunks`` one
    entry per speculative chunk, ``samples`` the resample strategy's answers."""

    text: str
    finish_reason: str
    usage: Usage
    trace: tuple[StepTrace, ...] = field(default=())
    settings: dict[str, Any] = field(default_factory=dict)
    chunks: tuple[ChunkTrace, ...] = field(default=())
    samples: tuple[SampleTrace, ...] = field(default=())  # resample strategy: every answer drawn
    ess: float | None = None  # resample strategy: effective sample size of the answers
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``blackbox-proxy generate --json`` prints); a candidate's bytes
        are a list of integers, as OpenAI's ``bytes`` field."""
        out = dataclasses.asdict(self)
        for step in out["trace"]:
            for candidate in step["candidates"]:
                candidate["data"] = list(candidate["data"])
        out["usage"]["calls_per_token"] = self.usage.calls_per_token
        out["usage"]["acceptance_rate"] = self.usage.acceptance_rate
        return out


@dataclass(frozen=True)
class StreamEvent:
    """A piece of a streamed generation: ``text`` is new since the previous event (whole
    characters, never taken back); ``steps``: the per-step trace entries decided since the
    previous event (their tokens may lie past ``text``, held back); the last event has ``result`` set."""

    text: str
    result: GenerationResult | None = None
    steps: tuple[StepTrace, ...] = ()
