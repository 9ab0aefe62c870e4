"""The part of a chat answer that comes after the copy it was asked to begin with.

A host that cannot continue a partial answer (plain chat) is asked to begin its answer with
exactly the text so far and go on (:mod:`blackbox_proxy.decoding.instructed` writes the request;
``HostedRequest.copy`` holds that text). The positions of its answer up to the end of the copy
are the copy: paid for (they stay in the call's usage), not kept. The positions after it are the
host's continuation of the answer so far, which it has written itself, with their top-k
logprobs as usual. Alignment is by bytes, at a token boundary: a copy tokenised differently from
the answer so far is still a copy.

An answer that leaves the copy (a different byte, a preamble, an end, or ``max_tokens`` reached
inside it) comes back with no positions and ``copy_failed``; the decoder then asks that position
another way (:class:`~blackbox_proxy.decoding.base.Decoder`).

Left out: streamed copies (copy requests are asked whole).
"""

from __future__ import annotations

import dataclasses

from ..types import HostedResult


def after_copy(result: HostedResult, copy: bytes) -> HostedResult:
    """``result`` with its positions up to the end of ``copy`` dropped, or no positions and
    ``copy_failed`` when the answer does not begin with ``copy`` at a token boundary. A host that
    copied and then ended without reporting the end keeps its ``finish_reason`` "stop" and no
    positions (the decoder asks that position again with the end banned, as anywhere else).

    >>> from blackbox_proxy.types import Candidate, HostedPosition, HostedUsage
    >>> def pos(t): return HostedPosition((Candidate(t, t.encode(), -0.1),), Candidate(t, t.encode(), -0.1))
    >>> answer = HostedResult("ab c", (pos("a"), pos("b"), pos(" c")), "length", HostedUsage())
    >>> [p.sampled.text for p in after_copy(answer, b"ab").positions]
    [' c']
    >>> after_copy(answer, b"ax").copy_failed, after_copy(answer, b"a").copy_failed
    (True, False)
    """
    data = b""
    for i, position in enumerate(result.positions):
        if data == copy:
            rest = result.positions[i:]
            text = b"".join(p.sampled.data for p in rest if p.sampled is not None).decode("utf-8", errors="replace")
            return dataclasses.replace(result, positions=rest, text=text)
        token = position.sampled
        if token is None or token.is_end:
            break
        data += token.data
        if not copy.startswith(data):
            break
    else:
        if data == copy and result.finish_reason == "stop":
            return dataclasses.replace(result, positions=(), text="")
    return dataclasses.replace(result, positions=(), text="", copy_failed=True)
