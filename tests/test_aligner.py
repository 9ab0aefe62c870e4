"""The byte aligner against a slow brute-force reference, and its exactness on one tokenizer.

The reference computes the same quantity as DESIGN.md §2.2 defines it, the slow obvious way:
a full forward (no cache, no tree) per path prefix, linear scans of the whole vocabulary
instead of sorted ranges, and its own search for minimal hosted extensions.
"""

import math
import random

import pytest
import torch

from blackbox_proxy import Candidate
from blackbox_proxy.tokens.aligner import Aligner
from blackbox_proxy.tokens.loaders import vocabulary_from_hf


def _probs(model, ids):
    with torch.no_grad():
        return torch.softmax(model(torch.tensor([list(ids)])).logits[0, -1].double(), -1)


def reference_logprob(model, tok, vocab, prompt_ids, continuation, cand, hosted_bytes, backoff):
    """log P_M(b | s) by brute force, written from DESIGN.md §2.2 without the library's code."""

    def complete_and_tail(data):
        for back in range(1, min(4, len(data)) + 1):
            byte = data[-back]
            if 0x80 <= byte < 0xC0:
                continue
            need = 2 if 0xC0 <= byte < 0xE0 else 3 if 0xE0 <= byte < 0xF0 else 4 if byte >= 0xF0 else 1
            return (data[:-back], data[-back:]) if need > back else (data, b"")
        return data, b""

    def canonical(data):
        """Valid runs encoded by the tokenizer, invalid bytes as single-byte tokens."""
        complete, tail = complete_and_tail(data)
        ids, run = [], ""
        for ch in complete.decode("utf-8", errors="surrogateescape"):
            if "\udc80" <= ch <= "\udcff":  # an invalid byte
                ids += tok.encode(run, add_special_tokens=False) if run else []
                run = ""
                ids.append(vocab.byte_token(ord(ch) - 0xDC00))
            else:
                run += ch
        ids += tok.encode(run, add_special_tokens=False) if run else []
        return ids, tail

    ids, tail = canonical(continuation)
    keep = max(0, len(ids) - backoff)
    ctx = list(prompt_ids) + ids[:keep]
    pending = b"".join(vocab.token_bytes[i] for i in ids[keep:]) + tail

    def path_logp(path):
        return sum(math.log(_probs(model, ctx + list(path[:d]))[t]) for d, t in enumerate(path))

    def starts(prefix, dist):
        return sum(float(dist[w]) for w in range(len(vocab.token_bytes))
                   if vocab.token_bytes[w] is not None and vocab.token_bytes[w].startswith(prefix))

    def cover(data, exts):
        t, tail_ = canonical(data)
        readings = ([(t, tail_)] if tail_ else []) + ([(t[:-1], vocab.token_bytes[t[-1]] + tail_)] if t else [])
        total = 0.0
        for path, rem in readings:
            dist = _probs(model, ctx + list(path))
            final = starts(rem, dist) - sum(starts(rem + e, dist) for e in exts)
            total += math.exp(path_logp(path)) * max(final, 0.0)
        return math.log(total) if total > 0 else -math.inf

    if cand.is_end:
        t, tail_ = canonical(pending)
        path = t + [vocab.byte_token(b) for b in tail_]
        dist = _probs(model, ctx + path)
        num = path_logp(path) + math.log(sum(float(dist[e]) for e in vocab.end_ids))
    else:
        b = cand.data
        longer = [h for h in hosted_bytes if h and h.startswith(b) and h != b] if hosted_bytes else []
        minimal = [h for h in set(longer) if not any(g != h and h.startswith(g) for g in longer)]
        num = cover(pending + b, [h[len(b):] for h in minimal])
    den = cover(pending, []) if pending else 0.0
    return min(0.0, max(math.log(1e-12), num - den))


def test_partial_character_known_answer():
    """Hand-built vocabulary and distributions: pending ' caf', hosted candidate b'\\xc3'."""
    from blackbox_proxy.tokens.vocab import Vocabulary

    words = [b" caf", b" caf\xc3\xa9", b"\xc3", b"\xc3\xa9", b"\xa9", b" the", b"x"]
    vocab = Vocabulary(words, encode=lambda s: {" caf": [0], " café": [1]}[s], end_ids=[])
    aligner = Aligner(vocab, None, backoff=1)
    plan = aligner.plan(" caf".encode(), [Candidate("", b"\xc3", -1.0)])
    assert plan.kept_ids == () and plan.pending == b" caf"
    root = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.0, 0.1, 0.0]).log()   # after the context
    after_caf = torch.tensor([0.0, 0.0, 0.3, 0.3, 0.0, 0.4, 0.0]).log()  # after " caf"
    got = aligner.evaluate(plan, {(): root, (0,): after_caf})[0]
    # P(" caf" then a token starting with \xc3) + P(a token starting with " caf\xc3")
    numerator = 0.5 * (0.3 + 0.3) + 0.2
    denominator = 0.5 + 0.2  # tokens starting with " caf"
    assert math.exp(got) == pytest.approx(numerator / denominator)


CONTEXTS = [
    b"",
    "The café costs 1".encode(),
    "naïve 日本".encode(),
    "emoji ".encode() + "🙂".encode()[:2],  # ends inside a character
    "Question: what is 12 + 30? Answer: 4".encode(),
]


@pytest.mark.parametrize("continuation", CONTEXTS)
@pytest.mark.parametrize("backoff", [1, 2])
def test_cross_tokenizer_matches_brute_force(tok_a, tok_b, scorers_b, continuation, backoff):
    """Hosted tokenizer = tok_a, small tokenizer = tok_b (different merges, split digits)."""
    expert = scorers_b[0]
    hosted = vocabulary_from_hf(tok_a)
    small = expert.vocab
    rng = random.Random(len(continuation) * 7 + backoff)
    pool = [i for i, b in enumerate(hosted.token_bytes) if b]
    chosen = rng.sample(pool, 40) + [hosted.ids_for_bytes(b" ")[0], hosted.ids_for_bytes(b"t")[0], hosted.ids_for_bytes(b"\xf0")[0]]
    candidates = [Candidate(hosted.token_bytes[i].decode("utf-8", "replace"), hosted.token_bytes[i], -1.0, i) for i in chosen]
    candidates.append(Candidate("<|endoftext|>", b"", -2.0, None, True))
    aligner = Aligner(small, hosted, backoff=backoff)
    prompt_ids = expert.prompt_ids(prompt="A café: ")
    session = expert.session(prompt_ids)
    plan = aligner.plan(continuation, candidates)
    fast = aligner.evaluate(plan, session.distributions(plan.kept_ids, plan.paths))
    for cand, got in zip(candidates, fast):
        want = reference_logprob(expert.model, tok_b, small, prompt_ids, continuation, cand, hosted.token_bytes, backoff)
        assert math.exp(got) == pytest.approx(math.exp(want), rel=1e-3, abs=1e-7), (cand.data, got, want)


def per_term_evaluate(aligner: Aligner, plan, dists) -> list[float]:
    """The definition Aligner.evaluate batches: each term read on its own, one tensor element at
    a time (the slow obvious oracle of the batched reads)."""
    ends = sorted(aligner.small.end_ids)
    cumsums = {}

    def cumsum(path):
        if path not in cumsums:
            ordered = dists[path].double().exp().cpu()[torch.tensor(aligner.small.sorted_ids)]
            cumsums[path] = torch.cat([ordered.new_zeros(1), ordered.cumsum(0)])
        return cumsums[path]

    def log_term(term, end):
        logp = sum(float(dists[term.path[:depth]][token]) for depth, token in enumerate(term.path))
        if end:
            final = float(dists[term.path][ends].double().exp().sum())
        elif term.remainder:
            c = cumsum(term.path)
            lo, hi = aligner.small.prefix_range(term.remainder)
            final = float(c[hi] - c[lo])
            for sub in term.subtract:
                s_lo, s_hi = aligner.small.prefix_range(sub)
                if s_hi > s_lo:
                    final -= float(c[s_hi] - c[s_lo])
        else:
            final = 1.0
        return logp + math.log(final) if final > 0 else -math.inf

    def log_prob(query):
        if query.impossible or not query.terms:
            return -math.inf
        values = [log_term(t, query.end) for t in query.terms]
        top = max(values)
        return top if top == -math.inf else top + math.log(sum(math.exp(v - top) for v in values))

    den = log_prob(plan.denominator) if plan.denominator is not None else 0.0
    return [min(0.0, max(math.log(1e-12), log_prob(q) - den if den > -math.inf else -math.inf))
            for q in plan.queries]


@pytest.mark.parametrize("continuation", CONTEXTS)
def test_batched_reads_equal_per_term_reads(tok_a, scorers_b, continuation):
    """The batched reads give bit-for-bit the per-term definition's numbers on CPU (the same float64
    ops in the same order; on a GPU to rounding), on plans with end queries, UTF-8 tails,
    extensions and impossible text."""
    expert = scorers_b[0]
    hosted = vocabulary_from_hf(tok_a)
    rng = random.Random(len(continuation))
    pool = [i for i, b in enumerate(hosted.token_bytes) if b]
    chosen = rng.sample(pool, 60) + [hosted.ids_for_bytes(b"\xf0")[0], hosted.ids_for_bytes(b" ")[0]]
    candidates = [Candidate("", hosted.token_bytes[i], -1.0, i) for i in chosen]
    candidates.append(Candidate("<|endoftext|>", b"", -2.0, None, True))
    for backoff in (0, 1, 2):
        aligner = Aligner(expert.vocab, hosted, backoff=backoff)
        plan = aligner.plan(continuation, candidates)
        dists = expert.session(expert.prompt_ids(prompt="A café: ")).distributions(plan.kept_ids, plan.paths)
        fast, slow = aligner.evaluate(plan, dists), per_term_evaluate(aligner, plan, dists)
        if next(iter(dists.values())).device.type == "cpu":
            assert fast == slow
        else:  # the batched float64 sums run on the GPU there
            assert fast == pytest.approx(slow, rel=1e-9, abs=1e-12)


def test_unknown_hosted_vocabulary_uses_prefix_cover(tok_b, scorers_b):
    """Without the hosted vocabulary, ' t' also counts ' the', ' them'...: a larger probability."""
    expert = scorers_b[0]
    session = expert.session(expert.prompt_ids(prompt="Hello"))
    cand = [Candidate(" t", b" t", -1.0)]
    with_vocab = Aligner(expert.vocab, expert.vocab, backoff=1)
    without = Aligner(expert.vocab, None, backoff=1)
    cont = b"There are many words here:"
    p1 = with_vocab.plan(cont, cand)
    p2 = without.plan(cont, cand)
    lp_with = with_vocab.evaluate(p1, session.distributions(p1.kept_ids, p1.paths))[0]
    lp_without = without.evaluate(p2, session.distributions(p2.kept_ids, p2.paths))[0]
    assert lp_without > lp_with
    assert "unknown" in without.description


def test_same_tokenizer_recovers_token_probabilities_exactly(tok_a, scorers_a):
    """One shared tokenizer, stable boundary (backoff 0): aligned P_M(v) = P_M(v) for every v
    whose bytes tokenise to v itself (DESIGN.md §2.2 step 3)."""
    expert = scorers_a[0]
    vocab = expert.vocab
    aligner = Aligner(vocab, vocab, backoff=0)
    prompt_ids = expert.prompt_ids(prompt="The quick brown")
    continuation = " fox jumps".encode()
    cands, exact_ids = [], []
    for i, b in enumerate(vocab.token_bytes):
        if b and vocab.encode_bytes(b) == [i]:
            cands.append(Candidate("", b, -1.0, i))
            exact_ids.append(i)
    assert len(exact_ids) > 0.9 * sum(1 for b in vocab.token_bytes if b)
    cands.append(Candidate("<|endoftext|>", b"", -1.0, None, True))
    session = expert.session(prompt_ids)
    plan = aligner.plan(continuation, cands)
    got = aligner.evaluate(plan, session.distributions(plan.kept_ids, plan.paths))
    with torch.no_grad():
        truth = torch.log_softmax(
            expert.model(torch.tensor([prompt_ids + vocab.encode_text(" fox jumps")])).logits[0, -1].double(), -1
        )
    for i, lp in zip(exact_ids, got):
        assert lp == pytest.approx(float(truth[i]), abs=2e-4)
    end_truth = float(torch.logsumexp(truth[sorted(vocab.end_ids)], 0))
    assert got[-1] == pytest.approx(end_truth, abs=2e-4)
