"""The text a generation has so far, and the prompt the hosted model continues it after.

- :class:`Prefix`: the answer so far, frozen: its bytes and, while every token's hosted id is
  known, those ids. ``extend`` gives the prefix one token longer; ``along`` the prefixes before
  each token of a draft (what scoring a drafted chunk needs at each of its positions).
- :class:`HostedPrompt`: what the hosted API continues (a text prompt, chat messages, or hosted
  token ids), which builds the :class:`~blackbox_proxy.types.HostedRequest` that continues a
  prefix, and says which candidates a request can carry on from (:meth:`HostedPrompt.allowed`):
  a text prompt holds only whole UTF-8 characters, token ids any bytes.

Left out: scoring (:mod:`.scoring`) and the strategies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..tokens.vocab import split_utf8
from ..types import Candidate, HostCapabilities, HostedRequest
from . import instructed


def is_utf8(data: bytes) -> bool:
    """Whether ``data`` is whole, valid UTF-8 (what a text prompt can carry).

    >>> is_utf8("é".encode()), is_utf8("é".encode()[:1])
    (True, False)
    """
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass(frozen=True)
class Prefix:
    """The answer so far: ``data`` (bytes) and ``ids``, its hosted token ids, or None once a token
    without a known id was appended.

    >>> p = Prefix().extend(Candidate("a", b"a", -1.0, 7)).extend(Candidate("b", b"b", -1.0, 9))
    >>> p.data, p.ids
    (b'ab', (7, 9))
    >>> [q.data for q in Prefix(b"x").along([Candidate("y", b"y", 0.0), Candidate("z", b"z", 0.0)])]
    [b'x', b'xy']
    """

    data: bytes = b""
    ids: tuple[int, ...] | None = ()

    def extend(self, token: Candidate) -> "Prefix":
        """This prefix with ``token`` appended (an end token appends nothing)."""
        if token.is_end:
            return self
        ids = self.ids + (token.token_id,) if self.ids is not None and token.token_id is not None else None
        return Prefix(self.data + token.data, ids)

    def along(self, tokens: Iterable[Candidate]) -> list["Prefix"]:
        """The prefix before each of ``tokens`` (a draft read from here)."""
        out, prefix = [], self
        for token in tokens:
            out.append(prefix)
            prefix = prefix.extend(token)
        return out

    def text(self) -> tuple[str, bytes]:
        """The prefix as text, and the incomplete UTF-8 tail that text cannot carry. (Text-prompt
        generations only hold valid UTF-8; a switch from token-id prompts mid-way may leave
        invalid bytes, which are sent as U+FFFD.)"""
        complete, tail = split_utf8(self.data)
        return complete.decode("utf-8", errors="replace"), tail


@dataclass(frozen=True)
class HostedPrompt:
    """What the hosted model continues: ``text`` (completions mode), ``messages`` (the chat modes,
    as (role, content) pairs) and ``ids``, the prompt as hosted token ids when requests carry
    token ids (completions with the hosted tokenizer known)."""

    text: str | None = None
    messages: tuple[tuple[str, str], ...] = ()
    ids: tuple[int, ...] | None = None

    def by_ids(self, prefix: Prefix) -> bool:
        """Whether the request continuing ``prefix`` carries hosted token ids (exact, any bytes)."""
        return self.ids is not None and prefix.ids is not None

    def request(self, prefix: Prefix, host: HostCapabilities, *, max_tokens: int, temperature: float,
                seed: int | None = None, n: int = 1, top_k: int | None = None,
                logit_bias: tuple[tuple[int, float], ...] = (), stream: bool = False,
                copy: bool = True, copy_bias: bool | None = None) -> HostedRequest:
        """The request continuing ``prefix``: the prompt's ids and the prefix's (token-id prompts),
        the prompt's text and the prefix's (completions), the messages and the prefix as a
        partial assistant answer (chat-prefix), or on a plain chat host, the messages asking it
        to copy the prefix first (``copy``; else to continue it: :mod:`.instructed`).
        ``copy_bias``: raise the copy's tokens (default: on greedy draws). ``top_k``: candidates
        per position (default: the host's)."""
        common = dict(mode=host.mode, max_tokens=max_tokens, top_k=host.top_k if top_k is None else top_k,
                      temperature=temperature, top_p=1.0, seed=seed, n=n, logit_bias=logit_bias, stream=stream)
        if host.mode == "completions":
            if self.by_ids(prefix):
                return HostedRequest(prompt=self.ids + prefix.ids, **common)
            return HostedRequest(prompt=(self.text or "") + prefix.text()[0], **common)
        if host.continues_prefix or not prefix.data:
            return HostedRequest(messages=self.messages, assistant_prefix=prefix.text()[0], **common)
        partial = prefix.text()[0]
        if not copy:
            return HostedRequest(messages=instructed.continue_messages(self.messages, partial), **common)
        if copy_bias if copy_bias is not None else temperature == 0:
            common["logit_bias"] = logit_bias + instructed.copy_bias(prefix.ids, host.logit_bias_cap, logit_bias)
        common.update(max_tokens=max_tokens + instructed.copy_tokens(prefix.data, prefix.ids), stream=False)
        return HostedRequest(messages=instructed.copy_messages(self.messages, partial), copy=partial, **common)

    def allowed(self, prefix: Prefix, candidates: Sequence[Candidate]) -> torch.Tensor | None:
        """Which candidates a request can carry on from after ``prefix`` (bool ``[C]``), or None
        when every one can (token-id prompts). A text prompt holds only valid UTF-8, so a candidate
        that would leave the text ending inside a character, or with a stray continuation byte, is
        left out there; ends always can."""
        if self.by_ids(prefix):
            return None
        return torch.tensor([c.is_end or is_utf8(prefix.data + c.data) for c in candidates], dtype=torch.bool)

    def consistent(self, prefix: Prefix, candidates: Sequence[Candidate]) -> tuple[list[Candidate], int]:
        """The candidates :meth:`allowed` keeps, and how many it left out."""
        mask = self.allowed(prefix, candidates)
        if mask is None:
            return list(candidates), 0
        keep = [c for c, ok in zip(candidates, mask.tolist()) if ok]
        return keep, len(candidates) - len(keep)
