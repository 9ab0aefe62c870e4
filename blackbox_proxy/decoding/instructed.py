"""Continuation by instruction: how a plain chat host is asked to go on from a partial answer.

OpenAI's chat models (and most proprietary chat APIs) do not continue a partial answer: a
trailing assistant message is taken as a finished turn. After the first position, each request
to such a host (``--mode chat``) is the conversation with one more instruction, in the system
message: *begin your answer with exactly this text, then continue it*, followed by the answer so
far (:func:`copy_messages`). The host's answer copies the text and goes on; the client drops the
copied positions (:mod:`blackbox_proxy.hosts.copying`) and the decoder walks the positions after
it as it walks a continuing host's (per-step, speculative).

What this is exact with respect to: the host's distribution after the copy, given the
instruction and the answer so far *written by the host itself*, q(x | instruction, copy), which
is not the distribution a continuing host gives, p(x | answer so far). The tuned distribution
is q · (p_E / p_A)^alpha; benchmarks/chat_only.py measures how far q is from p on a host that
can do both.

Where a greedy call's drafts come from does not matter to the greedy walk (it keeps a draft only
where it is the tuned argmax), so greedy copy requests also raise the answer so far's own tokens
by :data:`COPY_BIAS` in ``logit_bias`` (hosted tokenizer known, a host that honours it on the
draw and returns its model's own logprobs), which makes a small host copy far more often.
Sampled copy requests carry no bias (their drafts must be the host's own draws).

When the host does not copy (``copy_failed``), that position is read instead from the host's
answer to the conversation with the partial answer as an assistant turn and a user turn asking
it to continue (:func:`continue_messages`): one position, chosen like per-step, noted in the
trace (first from a few sampled copies, where the host gives ``n`` choices: :class:`CopyFallback`);
after :data:`UNCOPIED_IN_A_ROW` such positions in a row, one more ends the
generation with its text. The copied tokens are paid for on every call
(``usage.completion_tokens``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..types import HostedResult

COPY_INSTRUCTION = "Begin your answer with exactly this text, then continue it:\n"
CONTINUE_INSTRUCTION = "Continue your answer from exactly where it stops. Reply with the continuation only."
COPY_BIAS = 5.0  # logit_bias on the answer so far's tokens in greedy copy requests
COPY_SLACK = 2  # tokens asked beyond the copy's own (the hosted tokenizer may split it differently)


def copy_messages(messages: Sequence[tuple[str, str]], partial: str) -> tuple[tuple[str, str], ...]:
    """The conversation asking the host to begin its answer with ``partial``: the instruction
    joins a leading system message, or becomes one.

    >>> copy_messages([("user", "2+2?")], "2 + 2 =")
    (('system', 'Begin your answer with exactly this text, then continue it:\\n2 + 2 ='), ('user', '2+2?'))
    >>> copy_messages([("system", "Be brief."), ("user", "2+2?")], "4")[0]
    ('system', 'Be brief.\\n\\nBegin your answer with exactly this text, then continue it:\\n4')
    """
    instruction = COPY_INSTRUCTION + partial
    if messages and messages[0][0] == "system":
        return (("system", f"{messages[0][1]}\n\n{instruction}"), *messages[1:])
    return (("system", instruction), *messages)


def continue_messages(messages: Sequence[tuple[str, str]], partial: str) -> tuple[tuple[str, str], ...]:
    """The fallback where the host did not copy: the partial answer as an assistant turn, then a
    user turn asking to continue it."""
    return (*messages, ("assistant", partial), ("user", CONTINUE_INSTRUCTION))


def copy_tokens(data: bytes, ids: Sequence[int] | None) -> int:
    """Tokens to allow for the copy: its hosted ids' count (and a little slack) when known, else
    its bytes (no token is shorter than a byte)."""
    return len(ids) + COPY_SLACK if ids is not None else len(data)


def copy_bias(ids: Sequence[int] | None, cap: int, taken: Sequence[tuple[int, float]]) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` entries raising the copy's own tokens, within the host's ``cap`` with the
    entries already ``taken`` (which win); none when the ids are unknown or do not fit."""
    if ids is None or cap <= 0:
        return ()
    banned = {token for token, _ in taken}
    raise_ = sorted(set(ids) - banned)
    if len(raise_) + len(taken) > cap:
        return ()
    return tuple((token, COPY_BIAS) for token in raise_)


# After a failed copy the position is asked from COPY_DRAWS sampled copies in one call (a host with
# n choices), then by 'continue'; UNCOPIED_IN_A_ROW positions read by 'continue' in a row, and one
# more ends the generation.
SAMPLED_COPIES, CONTINUE_ASKED = 1, 2
COPY_DRAWS = 4
UNCOPIED_IN_A_ROW = 2


def first_copied(results: Sequence[HostedResult]) -> HostedResult:
    """The first choice that copied the answer so far (any choice, for other requests)."""
    return next((r for r in results if not r.copy_failed), results[0])


class CopyFallback:
    """One generation's copies that a plain chat host did not make: ``level`` is how the next
    request asks the position where it failed (0: a copy as usual, :data:`SAMPLED_COPIES`,
    :data:`CONTINUE_ASKED`), ``misses`` how many calls did not copy, ``gave_up`` why the
    generation ends (None while it goes on)."""

    def __init__(self, max_choices: int) -> None:
        self.draws = min(COPY_DRAWS, max_choices)
        self.level = 0
        self.misses = 0
        self.in_a_row = 0  # positions in a row read by 'continue'
        self.gave_up: str | None = None

    def missed(self, results: Sequence[HostedResult]) -> bool:
        """Whether every choice of an answer failed to copy; if so, the next level is asked."""
        if not results or not all(r.copy_failed for r in results):
            if self.level != CONTINUE_ASKED:
                self.in_a_row = 0  # copied (or asked plainly)
            return False
        self.misses += 1
        self.level = SAMPLED_COPIES if self.level == 0 and self.draws > 1 else CONTINUE_ASKED
        if self.level == CONTINUE_ASKED:
            self.in_a_row += 1
            if self.in_a_row > UNCOPIED_IN_A_ROW:
                self.level = 0
                self.gave_up = (f"the host did not copy the answer so far at {UNCOPIED_IN_A_ROW + 1} positions in a "
                                "row (continuation by instruction); the generation ends with the text so far")
        return True

    def settle(self) -> str:
        """Said on the position read by the fallback (which is then over)."""
        level, self.level = self.level, 0
        if level == SAMPLED_COPIES:
            return ("the host did not copy the answer so far greedily; this position is read after one of its "
                    f"{self.draws} sampled copies")
        return ("the host did not copy the answer so far; this position is its answer to 'continue' "
                "(continuation by instruction without the copy: an approximation)")

    def note(self) -> str | None:
        """The result's note, when any copy was not made."""
        if not self.misses:
            return None
        return (f"continuation by instruction: the host did not copy the answer so far {self.misses} time(s); those "
                "positions were read after a sampled copy or from its answer to 'continue' (an approximation; "
                "each step's notes say which)")
