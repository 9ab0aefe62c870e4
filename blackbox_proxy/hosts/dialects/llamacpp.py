"""llama-cpp-python's server (``python -m llama_cpp.server``; ``owned_by: "me"`` in ``/v1/models``).

What changes there:

- the samplers it applies by default are switched off (``repeat_penalty`` 1.1, ``top_k`` 40,
  ``min_p`` 0.05: a draft drawn through them is not drawn from the model's distribution); one
  choice per call (it ignores ``n``); text prompts only (token ids get HTTP 500); no
  assistant prefix (it always opens a new turn);
- ``top_logprobs`` are keyed by a token's printed text: its bytes decoded with errors ignored.
  So the end token, other control tokens and pieces of a multi-byte character all print as
  ``""`` and share one entry, which keeps the rank of its best token and the logprob of its
  worst:

  - the ``""`` entry is taken out of each position (:func:`split_tops`); for a one-token greedy
    answer :func:`resolve_end` decides whether it is the end and reads its exact logprob, with
    one or two more calls where needed; in chunks and sampled answers it is not read as the end
    (the position says :attr:`~blackbox_proxy.types.HostedPosition.end_unresolved`, and the
    decoders ask that position again);
  - other keys that a broken token can also print (``b" \\xe2"`` prints as ``" "``) are dropped
    when their order shows that their value was overwritten;
  - drawn tokens that printed as ``""`` get their bytes back from the answer's text through the
    hosted tokenizer when only one split exists (:func:`recover_drawn`); otherwise the answer
    is cut before them.

What it leaves out: llama.cpp's own ``llama-server`` (``owned_by: "llamacpp"``), whose logprobs
carry ids and bytes: it is not this dialect.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Sequence
from typing import Any

from ...types import EmptyEntry, HostedRequest, HostedResult
from ...tokens.vocab import Vocabulary
from ..wire import ResponseParser, add_usage, decode_token_text
from . import Dialect, register


def _prints_empty(piece: bytes) -> bool:
    """How llama.cpp prints a token: its bytes decoded with errors ignored; True when nothing is left.

    >>> _prints_empty(b"\\xe2\\x82"), _prints_empty(b" \\xe2")
    (True, False)
    """
    return piece.decode("utf-8", errors="ignore") == ""


def shared_prints(parser: ResponseParser) -> frozenset[str]:
    """Non-empty strings that a token which is not valid UTF-8 on its own also prints as
    (llama.cpp drops its broken bytes: ``b" \\xe2"`` prints as ``" "``)."""
    found = parser.memo.get("shared_prints")
    if found is None:
        prints = set()
        for data in (parser.vocab.token_bytes if parser.vocab is not None else ()):
            if data:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    printed = data.decode("utf-8", errors="ignore")
                    if printed:
                        prints.add(printed)
        found = parser.memo["shared_prints"] = frozenset(prints)
    return found


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


def split_tops(parser: ResponseParser, tops: Any, sampled_text: str) -> tuple[set[str], int, EmptyEntry | None]:
    """Which keys of a position's top logprobs to skip, how many of them are dropped as
    unreadable, and its ``""`` entry (taken out; :func:`resolve_end`, which knows the request,
    resolves it). ``tops``: dict or list of entries.

    llama-cpp-python builds the dict from the top-k sorted best first, so a key shared by
    several tokens sits at the rank of its FIRST token but holds the logprob of its LAST.
    A key that another token can also print, with a later key above it, lost its value
    that way and is dropped. Where the drawn token itself printed as ``""`` (a piece of a
    character), the ``""`` entry holds its logprob, not the end's: it is dropped too.
    """
    if not tops:
        return set(), 0, None
    if isinstance(tops, dict):
        pairs = [(t, float(v)) for t, v in tops.items() if v is not None]
    else:
        pairs = [(e.token, float(e.logprob)) for e in tops if e.logprob is not None]
    shared = shared_prints(parser)
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


def recover_drawn(parser: ResponseParser, tokens: Sequence[str], text: str) -> tuple[dict[int, bytes], int | None]:
    """Bytes of drawn tokens that printed as ``""`` (pieces of a character), read back from the
    answer's text through the hosted vocabulary: ``({index: bytes}, cut)``; from index ``cut``
    on (None: nowhere) the drawn tokens' bytes are not known.

    The text holds the whole characters that a run of such tokens makes; their bytes are split
    among the run's tokens where the hosted vocabulary allows exactly one way. A run that cannot
    be read back (no vocabulary, an ambiguous split, the answer ending inside a character) and
    any token before it that could hide broken bytes (see :func:`shared_prints`) are cut: those
    positions keep no drawn token, so a speculative chunk ends before them.
    """
    if "".join(tokens) == text:
        return {}, None
    vocab = parser.vocab
    shared = shared_prints(parser)

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


def _banned_for_probes(parser: ResponseParser) -> frozenset[int]:
    """Hosted ids that print as ``""`` and do not end the text (control tokens, pieces of a
    character): banned from a probe's draw so that only the end can print so."""
    bans = parser.memo.get("probe_bans")
    if bans is None:
        vocab = parser.vocab
        bans = parser.memo["probe_bans"] = frozenset(
            i for i, data in enumerate(vocab.token_bytes) if i not in vocab.end_ids and (data is None or _prints_empty(data)))
    return bans


def _ids_of_keys(vocab: Vocabulary, keys: Sequence[str]) -> set[int]:
    ids: set[int] = set()
    for key in keys:
        special = vocab.id_for_special(key)
        if special is not None:
            ids.add(special)
        ids.update(vocab.ids_for_bytes(decode_token_text(key)))
    return ids


def resolve_end(parser: ResponseParser, request: HostedRequest, results: list[HostedResult]) -> Generator[
        HostedRequest, list[HostedResult], list[HostedResult]]:
    """Decide whether a one-token greedy answer's ``""`` entry is the end of text, and its exact
    logprob. A generator: it yields the further requests it needs (each sent back its results)
    and returns the results with the end among the candidates or not.

    Greedy, one token, the drawn token not ``""``: at rank 0 the entry must be a banned end
    (nothing else beats the draw). At a lower rank it may be a control token or a piece of a
    character: a probe asks again with every key above it and every other token that prints as
    ``""`` banned, so the greedy draw is the entry's best token; llama.cpp answers with nothing
    exactly when that is an end. When the value was overwritten (see
    :class:`~blackbox_proxy.types.EmptyEntry`), one more request with the end banned as well
    reads it alone. Chunks and sampled answers (and, without the hosted tokenizer, entries below
    rank 0) are never read as the end: an end drawn there is handled by the decoders.
    """
    if (request.max_tokens != 1 or request.temperature != 0 or request.n != 1
            or len(results) != 1 or len(results[0].positions) != 1):
        return results
    vocab = parser.vocab
    result = results[0]
    pos = result.positions[0]
    entry = pos.empty_entry
    if entry is None or (entry.rank > 0 and vocab is None):
        return results
    ends = set(vocab.end_ids) if vocab is not None else set()
    bans = {i: b for i, b in request.logit_bias if i not in ends}
    if vocab is not None:
        bans.update(dict.fromkeys(_banned_for_probes(parser) | _ids_of_keys(vocab, entry.above), -100.0))
    narrow = dataclasses.replace(request, top_k=entry.rank + 1)
    calls, usage = 0, result.usage
    if entry.rank > 0:
        [probe] = yield dataclasses.replace(narrow, logit_bias=tuple(bans.items()))
        calls, usage = calls + 1, add_usage(usage, probe.usage)
        if probe.positions or probe.finish_reason != "stop":
            return [dataclasses.replace(result, extra_calls=result.extra_calls + calls, usage=usage)]
    value = entry.logprob
    if not entry.exact:
        bans.update(dict.fromkeys(ends, -100.0))
        [alone] = yield dataclasses.replace(narrow, logit_bias=tuple(bans.items()))
        calls, usage = calls + 1, add_usage(usage, alone.usage)
        read = alone.positions[0].empty_entry if alone.positions else None
        if read is not None and read.rank == entry.rank and read.exact:
            value = read.logprob
        else:  # not read back (no hosted tokenizer): a lower bound, the best key ranked below it
            value = max([entry.logprob] + [c.logprob for c in pos.candidates if c.text not in entry.above])
    end = parser.end_placeholder("", value)  # every end token at once: no single id
    cands = tuple(sorted(pos.candidates + ((end,) if end is not None else ()), key=lambda c: -c.logprob))
    fixed = dataclasses.replace(pos, candidates=cands, empty_entry=None)
    return [dataclasses.replace(result, positions=(fixed,), extra_calls=result.extra_calls + calls, usage=usage)]


register(Dialect(
    name="llama.cpp",
    note="repeat_penalty 1.0, top_k 0, min_p 0 (its defaults 1.1/40/0.05 bend the draws), one choice per "
         "call, text prompts only, top logprobs keyed by printed text (\"\" resolved as the end or "
         "dropped); no assistant prefix",
    owners=frozenset({"me"}),
    detect_order=40,
    # its defaults filter and penalise the draw; the logprobs it reports are the model's own
    body_defaults=lambda vocab: {"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0},
    max_choices=1,
    prefix_refusal=("{base_url} is a llama.cpp server, which cannot continue an assistant message (it always "
                    "opens a new turn); use --mode completions (apply the chat template to the prompt) or --mode "
                    "chat with --strategy resample"),
    printed_keys=True,
    split_tops=split_tops,
    recover_drawn=recover_drawn,
    resolve_end=resolve_end,
))
