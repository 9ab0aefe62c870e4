"""Speculative resampling: known answers on hand-built numbers, a statistical test of the
drawn distribution against exact proxy tuning, and end-to-end runs over loopback HTTP."""

import math
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from decoders import build
from tiny import concentrated  # noqa: F401 - the other statistical tests import it from here

from blackbox_proxy import ConfigurationError, ProxyTuner
from blackbox_proxy.decoding import speculative as spec
from blackbox_proxy.decoding import PerStepDecoder
from blackbox_proxy.decoding.speculative import SpeculativeDecoder
from blackbox_proxy.maths import rejection
from blackbox_proxy.maths.rejection import PositionScore, walk_greedy, walk_sampled
from blackbox_proxy.types import Candidate, HostedPosition, HostedResult, HostedUsage

LOG = math.log


def row(p, delta, draft, lp_small=None):
    lp = torch.tensor([LOG(x) for x in p], dtype=torch.float64)
    d = torch.tensor(delta, dtype=torch.float64)
    small = torch.full_like(lp, -50.0) if lp_small is None else torch.tensor(lp_small, dtype=torch.float64)
    return PositionScore(lp, d, small + d, small, draft)


def test_normaliser_acceptance_and_residual_known_answers():
    # p_L = (.5, .3, .2), w = (1, 2, .5): Z = 1.2, target = (.4167, .5, .0833)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    log_w = torch.tensor([0.0, LOG(2), LOG(0.5)], dtype=torch.float64)
    log_z = rejection.log_normaliser(p.log(), log_w, 0.0)
    assert math.exp(log_z) == pytest.approx(1.2)
    assert [rejection.accept_probability(float(x), log_z) for x in log_w] == pytest.approx([1 / 1.2, 1.0, 0.5 / 1.2])
    # residual ∝ p max(0, w/Z - 1): only the second candidate is under-drafted
    assert rejection.residual_distribution(p.log(), log_w, log_z).tolist() == pytest.approx([0.0, 1.0, 0.0])
    # a tail of 0.2 outside C weighted 3: Z = .5 + .6 + .2*3 over covered (.5, .3) only
    log_z_tail = rejection.log_normaliser(p[:2].log(), log_w[:2], LOG(3))
    assert math.exp(log_z_tail) == pytest.approx(0.5 + 0.6 + 0.2 * 3)


def test_tail_weight_estimate():
    lp_e = torch.tensor([LOG(0.5), LOG(0.3)])  # expert leaves 0.2 outside C
    lp_a = torch.tensor([LOG(0.7), LOG(0.2)])  # anti-expert leaves 0.1
    value, how = rejection.tail_log_weight(lp_e, lp_a, 1.0)
    assert math.exp(value) == pytest.approx(2.0) and "outside the candidates" in how
    value, _ = rejection.tail_log_weight(lp_e, lp_a, 0.5)
    assert math.exp(value) == pytest.approx(2.0 ** 0.5)
    full = torch.tensor([LOG(0.999), LOG(0.0005)])
    assert rejection.tail_log_weight(full, lp_a, 1.0)[0] == 0.0  # a ratio of tiny numbers is not trusted


def test_rejects_at_position_3():
    """Drafts with w/Z >= 1 are always accepted; a draft the expert rules out (delta = -inf) is
    always rejected, and the residual puts everything on the under-drafted candidate."""
    gen = torch.Generator().manual_seed(0)
    sure = row([0.6, 0.4], [LOG(2), 0.0], 0)  # w(draft)=2 > Z=1.6: accept prob 1
    ruled_out = row([0.6, 0.4], [-math.inf, LOG(3)], 0)  # draft impossible under the target
    walk = walk_sampled([sure, sure, sure, ruled_out, sure], 1.0, gen)
    assert walk.accepted == 3 and walk.rejected_at == 3 and walk.replacement == 1
    assert walk.accept_probs == pytest.approx([1.0, 1.0, 1.0, 0.0])
    assert len(walk.log_z) == 4  # positions after the rejection are not examined
    # +inf weight on the draft: the target lives there, accepted
    walk = walk_sampled([row([0.9, 0.1], [math.inf, 0.0], 0)], 1.0, gen)
    assert walk.rejected_at is None and walk.accepted == 1
    # +inf weight elsewhere: the draft is rejected and the residual picks the +inf candidate
    walk = walk_sampled([row([0.9, 0.1], [0.0, math.inf], 0)], 1.0, gen)
    assert walk.rejected_at == 0 and walk.replacement == 1


def test_greedy_walk():
    agree = row([0.7, 0.3], [0.0, 0.0], 0)
    flips = row([0.6, 0.4], [0.0, 1.0], 0)  # tuned argmax is candidate 1
    walk = walk_greedy([agree, agree, flips, agree], 1.0)
    assert (walk.accepted, walk.rejected_at, walk.replacement) == (2, 2, 1)
    assert walk_greedy([agree, agree], 1.0).rejected_at is None


def test_text_prompt_masks():
    """With text prompts (``allowed``): greedy takes the argmax over the candidates a text prompt
    can end on, as per-step greedy does (a draft outside them is rejected, whatever its score);
    sampling may accept a draft ending inside a character (the chunk is cut back to a whole
    character later), and its replacement must end on a whole one; when none can, the walk
    stops at the rejection with no replacement."""
    none = torch.tensor([False, False])
    both = torch.tensor([True, True])
    agree = row([0.7, 0.3], [0.0, 0.0], 0)
    flips = row([0.6, 0.4], [0.0, 1.0], 0)
    walk = walk_greedy([agree, flips], 1.0, [both, none])  # t=0 kept; at t=1 nothing can end a character
    assert (walk.accepted, walk.rejected_at, walk.replacement) == (1, 1, None)
    walk = walk_greedy([agree, row([0.6, 0.4], [0.0, -1.0], 1)], 1.0, [both, torch.tensor([True, False])])
    assert (walk.accepted, walk.rejected_at, walk.replacement) == (1, 1, 0)
    # the draft is the argmax over C but leaves half a character: rejected, the best whole one replaces it
    walk = walk_greedy([agree], 1.0, [torch.tensor([False, True])])
    assert (walk.accepted, walk.rejected_at, walk.replacement) == (0, 0, 1)
    gen = torch.Generator().manual_seed(0)
    ruled_out = row([0.6, 0.4], [-math.inf, LOG(3)], 0)
    walk = walk_sampled([ruled_out], 1.0, gen, [none])
    assert (walk.accepted, walk.rejected_at, walk.replacement) == (0, 0, None) and "UTF-8" in walk.notes[0]
    # every allowed candidate is over-drafted: the residual is empty; drawn from the masked target
    over = row([0.5, 0.3, 0.2], [LOG(3), -math.inf, 0.0], 1)
    walk = walk_sampled([over], 1.0, gen, [torch.tensor([False, False, True])])
    assert walk.replacement == 2


def test_text_prompts_with_byte_pieces_never_crash(server_a, tok_a, scorers_a):
    """Random tiny models draw lone UTF-8 pieces; without a hosted tokenizer every chunk must
    still end on a whole character (found by a batch run that crashed in the residual draw)."""
    t = make(server_a, scorers_a, top_k=8, hosted_tokenizer="none")  # text prompts, as asked
    for i in range(12):
        result = t.generate(f"Question: {i}", max_tokens=6, temperature=1.0, seed=i, strategy="speculative")
        assert "\ufffd" not in result.text  # the continuation is whole UTF-8


# ----- statistical test: draws vs exact proxy tuning ------------------------------------------------



class MemoSession:
    """A scorer session over a real model, memoised by context (the statistical test repeats
    the same few contexts ten thousand times)."""

    def __init__(self, model, prompt_ids):
        self.model, self.prompt_ids, self.memo = model, list(prompt_ids), {}

    def logprobs(self, ids):
        key = tuple(ids)
        if key not in self.memo:
            with torch.no_grad():
                out = self.model(torch.tensor([list(key)])).logits[0, -1].double()
            self.memo[key] = torch.log_softmax(out, -1)
        return self.memo[key]

    def distributions_groups(self, groups):
        return [{(): self.logprobs(self.prompt_ids + list(c))} for c, _ in groups]

    def close(self):
        pass


@pytest.fixture(scope="module")
def concentrated_models(tok_a):
    from tiny import tiny_llama

    vocab_ids = [tok_a.convert_tokens_to_ids(t) for t in ["a", "b", "c", "d", "e", "f"]]
    models = [concentrated(tiny_llama(tok_a, s, hidden=32), vocab_ids, s) for s in (10, 11, 12)]
    return models, vocab_ids


def run_draws(tok_a, models, n, seed0, alpha=1.0):
    from blackbox_proxy.tokens.loaders import vocabulary_from_hf

    large, expert, anti = models
    vocab = vocabulary_from_hf(tok_a)
    prompt = tok_a.encode("The quick brown")
    hosted, e, a = MemoSession(large, []), MemoSession(expert, prompt), MemoSession(anti, prompt)
    firsts = draw_pairs(vocab, every_candidate(hosted, vocab), e, a, prompt, n, seed0, alpha=alpha)
    return firsts, (hosted, e, a)


def every_candidate(hosted, vocab):
    """``position(ids)``: the hosted model's probabilities after ``ids`` ([V]), every token with
    text as a candidate (k = the vocabulary), and the candidates by id; memoised."""
    memo = {}

    def position(ids):
        key = tuple(ids)
        if key not in memo:
            lp = hosted.logprobs(ids)
            cands = tuple(Candidate("", vocab.token_bytes[t], float(lp[t]), t) for t in range(len(vocab.token_bytes))
                          if vocab.token_bytes[t])
            memo[key] = (lp.exp().float(), cands, {c.token_id: c for c in cands})
        return memo[key]

    return position


def draw_pairs(vocab, position_candidates, e, a, prompt, n, seed0, *, alpha=1.0, top_k=400):
    """The first two tokens of ``n`` speculative generations (chunks of 2, temperature 1) over a
    simulated hosted model: ``position_candidates(ids)`` gives (probabilities [V], the candidates
    the API would return, candidates by id) after ``ids``; each chunk's tokens are drawn from
    those probabilities with one seeded generator. ``e`` and ``a`` are the expert's and
    anti-expert's sessions over ``prompt`` (any scoring backend's)."""
    gen = torch.Generator().manual_seed(seed0)
    firsts = []
    for i in range(n):
        dec = build(SpeculativeDecoder, e, a, vocab, prompt_ids=prompt, top_k=top_k, alpha=alpha, temperature=1.0,
                    max_tokens=2, chunk=2, seed=seed0 + i)
        while not dec.done:
            dec.observe([draw_draft(dec.request(), position_candidates, gen)], 0.0)
        firsts.append(tuple(list(dec.prefix.ids)[:2]))
    return firsts


def draw_draft(req, position_candidates, gen):
    """A simulated hosted answer to ``req``: ``req.max_tokens`` tokens, each drawn with ``gen``
    from ``position_candidates(ids)`` after the prompt and the tokens drawn before it."""
    ids, positions = list(req.prompt), []
    for _ in range(req.max_tokens):
        probs, cands, by_id = position_candidates(ids)
        token = int(torch.multinomial(probs, 1, generator=gen))
        positions.append(HostedPosition(candidates=cands, sampled=by_id[token]))
        ids.append(token)
    return HostedResult("", tuple(positions), "length", HostedUsage())


def exact_joint(sessions, prompt, live, alpha=1.0):
    hosted, e, a = sessions
    table = {}
    lp1 = hosted.logprobs(prompt) + alpha * (e.logprobs(prompt) - a.logprobs(prompt))
    p1 = torch.softmax(lp1, 0)
    for x in live:
        ctx = prompt + [x]
        p2 = torch.softmax(hosted.logprobs(ctx) + alpha * (e.logprobs(ctx) - a.logprobs(ctx)), 0)
        for y in live:
            table[(x, y)] = float(p1[x] * p2[y])
    return table


def chi2_pvalue(firsts, table):
    counts = Counter(firsts)
    n = len(firsts)
    cells = sorted(table, key=lambda k: -table[k])
    observed, expected, rest_o, rest_e = [], [], 0, 0.0
    for cell in cells:
        if table[cell] * n >= 5:
            observed.append(counts.get(cell, 0))
            expected.append(table[cell] * n)
        else:
            rest_o += counts.get(cell, 0)
            rest_e += table[cell] * n
    observed.append(rest_o + sum(c for k, c in counts.items() if k not in table))
    expected.append(max(rest_e, 1e-9))
    expected = [x * n / sum(expected) for x in expected]
    return chisquare(observed, expected).pvalue


@pytest.mark.slow
def test_speculative_draws_match_exact_proxy_tuning(tok_a, concentrated_models, monkeypatch):
    models, live = concentrated_models
    prompt = tok_a.encode("The quick brown")
    firsts, sessions = run_draws(tok_a, models, 10_000, seed0=1)
    table = exact_joint(sessions, prompt, live)
    assert sum(table.values()) > 0.999  # all mass on the live tokens
    p_right = chi2_pvalue(firsts, table)
    print(f"speculative joint of the first two tokens vs exact proxy tuning: chi-square p = {p_right:.3f}")
    assert p_right > 0.01
    # the hosted model alone is a different distribution: the test can tell them apart
    plain = exact_joint(sessions, prompt, live, alpha=0.0)
    assert chi2_pvalue(firsts, plain) < 1e-6
    # a deliberately wrong acceptance rule (forgetting the normaliser Z) fails the same test
    # (patched where walk_sampled looks it up, so the decoder's walk uses the wrong rule)
    monkeypatch.setattr(rejection, "accept_probability", lambda log_w, log_z: min(1.0, math.exp(min(0.0, log_w))))
    wrong, _ = run_draws(tok_a, models, 10_000, seed0=1)
    p_wrong = chi2_pvalue(wrong, table)
    print(f"with the acceptance rule missing Z: p = {p_wrong:.2g}")
    assert p_wrong < 0.01


# ----- end to end over loopback HTTP -------------------------------------------------------------


def make(server, scorers, **kw):
    args = dict(base_url=server.base_url, model="tiny", expert=scorers[0], anti_expert=scorers[1], max_retries=0)
    args.update(kw)
    return ProxyTuner(**args)


@pytest.mark.parametrize("which", ["same", "cross"])
def test_greedy_speculative_equals_per_step_greedy(server_a, tok_a, scorers_a, scorers_b, which):
    scorers = scorers_a if which == "same" else scorers_b
    t = make(server_a, scorers, top_k=20, hosted_tokenizer=tok_a)
    for prompt in ["The quick brown", "A café in Zürich sells", "Numbers: 1 2"]:
        per_step = t.generate(prompt, max_tokens=16, strategy="per-step")
        spec_result = t.generate(prompt, max_tokens=16, strategy="speculative")
        assert spec_result.text == per_step.text
        assert spec_result.usage.api_calls < per_step.usage.api_calls
        assert spec_result.chunks and spec_result.usage.draft_tokens >= spec_result.usage.accepted_drafts


def test_seeded_speculative_sampling_repeats(server_a, tok_a, scorers_b):
    t = make(server_a, scorers_b, top_k=10, hosted_tokenizer=tok_a)
    a = t.generate("A café in", max_tokens=12, temperature=1.0, seed=4, strategy="speculative")
    b = t.generate("A café in", max_tokens=12, temperature=1.0, seed=4, strategy="speculative", chunk=None)
    assert a.text == b.text
    assert a.usage.acceptance_rate is not None and 0 <= a.usage.acceptance_rate <= 1
    chunk = a.chunks[0]
    assert len(chunk.accept_probs) == chunk.accepted + (chunk.rejected_at is not None)
    assert all(0 <= p <= 1 for p in chunk.accept_probs)
    texts = {t.generate("A café in", max_tokens=12, temperature=1.0, seed=s, strategy="speculative").text
             for s in range(4)}
    assert len(texts) > 1


def test_fixed_chunk_and_refusals(server_a, tok_a, scorers_a):
    t = make(server_a, scorers_a, top_k=10, hosted_tokenizer=tok_a)
    r = t.generate("The quick brown", max_tokens=9, strategy="speculative", chunk=3)
    assert all(len(c.drawn) <= 3 for c in r.chunks)
    with pytest.raises(ConfigurationError, match="temperature 1 .* use --strategy per-step"):
        t.generate("Hi", temperature=0.7, strategy="speculative")
    with pytest.raises(ConfigurationError, match="top_p"):
        t.generate("Hi", temperature=1.0, top_p=0.9, strategy="speculative")
    with pytest.raises(ConfigurationError, match="chunk must be an integer from 1 to 64"):
        t.generate("Hi", strategy="speculative", chunk=0)


def test_adaptive_chunk_follows_the_acceptance_rate():
    assert spec.adaptive_chunk(0, 0) == 8  # prior: 3 of 4 accepted
    assert spec.adaptive_chunk(45, 50) == 18  # a = 48/54 with the prior: 2 / (1 - a) = 18
    assert spec.adaptive_chunk(2, 20) == 4  # low acceptance: the floor
    assert spec.adaptive_chunk(500, 500) == 32  # everything accepted: the ceiling


def test_async_speculative_equals_sync(server_a, tok_a, scorers_b):
    import asyncio

    from blackbox_proxy import AsyncProxyTuner

    kw = dict(top_k=10, hosted_tokenizer=tok_a)
    sync = make(server_a, scorers_b, **kw).generate("A café in", max_tokens=10, temperature=1.0, seed=7,
                                                     strategy="speculative")

    async def run():
        async with AsyncProxyTuner(base_url=server_a.base_url, model="tiny", expert=scorers_b[0],
                                   anti_expert=scorers_b[1], max_retries=0, **kw) as tuner:
            return await tuner.generate("A café in", max_tokens=10, temperature=1.0, seed=7, strategy="speculative")

    assert asyncio.run(run()).text == sync.text


def test_a_possible_end_inside_a_chunk_is_asked_alone(tok_a, concentrated_models):
    """llama.cpp's "" entry (it may be the end of text) is not resolved inside a chunk: the walk
    stops before that position, which is then asked alone (greedy, one token), where the
    client resolves it, and the choice there is made like per-step."""
    from blackbox_proxy.types import EmptyEntry
    from blackbox_proxy.tokens.loaders import vocabulary_from_hf

    models, live = concentrated_models
    large, expert, anti = models
    vocab = vocabulary_from_hf(tok_a)
    prompt = tok_a.encode("The quick brown")
    e, a = MemoSession(expert, prompt), MemoSession(anti, prompt)
    dec = build(SpeculativeDecoder, e, a, vocab, prompt_ids=prompt, top_k=400, alpha=1.0, temperature=0.0,
                max_tokens=8, chunk=3)
    cands = tuple(Candidate("", vocab.token_bytes[t], math.log(1 / len(live)), t) for t in live)
    by_id = {c.token_id: c for c in cands}
    lp_e = e.logprobs(prompt)
    best = max(live, key=lambda t: float(lp_e[t] - a.logprobs(prompt)[t]))  # the tuned argmax at position 1
    first = HostedPosition(candidates=cands, sampled=by_id[best])
    maybe_end = HostedPosition(candidates=cands, sampled=cands[0], empty_entry=EmptyEntry(1, -1.0, True, ("a",)))
    assert dec.request().max_tokens == 3
    dec.observe([HostedResult("", (first, maybe_end, maybe_end), "length", HostedUsage())], 0.0)
    assert list(dec.prefix.ids) == [best]  # the first draft was walked and accepted, the rest cut
    alone = dec.request()
    assert (alone.max_tokens, alone.temperature, alone.logit_bias) == (1, 0.0, ())
    # the client resolved it as the end, which the hosted model now puts nearly all its mass on
    end = Candidate("", b"", math.log(0.999), None, True)
    rest = tuple(Candidate("", c.data, math.log(0.001 / len(live)), c.token_id) for c in cands)
    resolved = HostedPosition(candidates=(end,) + rest, sampled=rest[0])
    dec.observe([HostedResult("", (resolved,), "length", HostedUsage())], 0.0)
    assert dec.done and dec.finish_reason == "stop" and list(dec.prefix.ids) == [best]
    # a chunk whose very first position is unresolved is not an error: that position is asked alone
    dec = build(SpeculativeDecoder, e, a, vocab, prompt_ids=prompt, top_k=400, alpha=1.0, temperature=0.0,
                max_tokens=8, chunk=3)
    dec.observe([HostedResult("", (maybe_end, first), "length", HostedUsage())], 0.0)
    assert list(dec.prefix.ids) == [] and dec.request().max_tokens == 1


def test_a_chunk_whose_first_draw_has_no_text_is_chosen_like_per_step(server_a, scorers_a, tok_a):
    """Tiny models at temperature 1 sometimes draw <|im_start|>, which has no text: the API shows
    no drawn token there. Found by the batch fault test once tail probes shifted the draws: the
    generation used to fail ("a chunk without the drawn tokens' logprobs")."""
    from test_batch import WORDS

    t = make(server_a, scorers_a, top_k=8, hosted_tokenizer=tok_a)
    result = t.generate(f"{WORDS[131 % len(WORDS)]} 131", strategy="speculative", temperature=1.0, seed=131, max_tokens=6)
    notes = [n for c in result.chunks for n in c.notes] + [n for s in result.trace for n in s.notes]
    assert any("has no text" in n for n in notes), notes


# ----- a character a text prompt cannot carry in pieces ------------------------------------------------


@pytest.mark.parametrize("cls", [PerStepDecoder, SpeculativeDecoder])
def test_a_position_whose_candidates_all_end_inside_a_character_takes_the_hosts_character(tok_a, models_a, cls):
    """On a text prompt (chat-prefix, or completions without the hosted tokenizer) a request cannot
    end inside a UTF-8 character. Where every candidate does (found by fuzzing the server with odd
    text), the decoder asks the host for its next few tokens and takes them up to the character's
    end, untuned and said so, then goes on token by token; where the host never finishes the
    character the generation ends with what it has (length), and a note says which mode carries
    any bytes."""
    from blackbox_proxy.tokens.loaders import vocabulary_from_hf

    vocab = vocabulary_from_hf(tok_a)
    byte = {vocab.token_bytes[i]: i for i in range(len(vocab.token_bytes))}
    piece = lambda data, lp: Candidate(data.decode("latin-1"), data, lp, byte[data])  # noqa: E731
    lead, other = piece(b"\xc3", -0.1), piece(b"\xc5", -2.5)
    prompt = tok_a.encode("Caf")
    e, a = MemoSession(models_a[1], prompt), MemoSession(models_a[2], prompt)

    def decoder():
        dec = build(cls, e, a, vocab, prompt=None, mode="chat-prefix", messages=[{"role": "user", "content": "Caf"}],
                    temperature=0.0, max_tokens=5)
        first = dec.request()
        assert first.max_tokens >= 1 and first.assistant_prefix == ""
        # no drawn text at the first position (as a special token): chosen like per-step
        dec.observe([HostedResult("", (HostedPosition((lead, other), None if cls is SpeculativeDecoder else lead),),
                                  "length", HostedUsage())], 0.0)
        assert dec.prefix.data == b"" and not dec.done
        asked = dec.request()
        assert (asked.max_tokens, asked.temperature, asked.assistant_prefix) == (4, 0.0, "")
        return dec

    dec = decoder()
    tail = piece(b"\xa9", -0.2)
    dec.observe([HostedResult("", (HostedPosition((lead, other), lead), HostedPosition((tail,), tail),
                                   HostedPosition((lead,), lead)), "length", HostedUsage(3, 3))], 0.0)
    assert dec.prefix.data == "é".encode() and dec.generated == 2 and dec.usage.api_calls == 2
    assert [s.alignment for s in dec.steps] == ["untuned", "untuned"] and "untuned" in dec.steps[0].notes[-1]
    assert dec.request().assistant_prefix == "é"  # back to proxy tuning, after the whole character

    dec = decoder()
    never = [HostedResult("", (HostedPosition((lead,), lead),) * 4, "length", HostedUsage())]
    if cls is SpeculativeDecoder:  # it draws the next chunk anew (its own stall count gives up in the end)
        dec.observe(never, 0.0)
        assert dec.prefix.data == b"" and dec.request().max_tokens != 4
        return
    dec.observe(never, 0.0)  # what was paid for is kept: the generation ends there, and says why
    result = dec.result()
    assert result.finish_reason == "length" and result.text == "" and "--mode completions" in result.notes[-1]


def test_a_chunk_that_can_keep_nothing_on_a_text_prompt_asks_for_the_character(tok_a, models_a):
    """A chunk whose first position offers only pieces of a character (a text prompt cannot end
    inside one): nothing can be kept, and before, each next chunk asked the same and the fourth
    raised (a 502 from serve, found by fuzzing). Now the next call asks for the host's own
    tokens up to the character's end."""
    from blackbox_proxy.tokens.loaders import vocabulary_from_hf

    vocab = vocabulary_from_hf(tok_a)
    byte = {vocab.token_bytes[i]: i for i in range(len(vocab.token_bytes))}
    piece = lambda data, lp: Candidate(data.decode("latin-1"), data, lp, byte[data])  # noqa: E731
    lead, other, tail = piece(b"\xc3", -0.1), piece(b"\xc5", -2.5), piece(b"\xa9", -0.2)
    prompt = tok_a.encode("Caf")
    e, a = MemoSession(models_a[1], prompt), MemoSession(models_a[2], prompt)
    for temperature in (0.0, 1.0):
        dec = build(SpeculativeDecoder, e, a, vocab, prompt=None, mode="chat-prefix", temperature=temperature,
                    messages=[{"role": "user", "content": "Caf"}], max_tokens=5, chunk=2, seed=1, tail_calls=0)
        assert dec.request().max_tokens == 2
        alone = (HostedPosition((lead, other), lead),)  # the chunk ends there (as a stream closed early does)
        dec.observe([HostedResult("", alone, "length", HostedUsage(3, 1))], 0.0)
        assert dec.prefix.data == b"" and not dec.done
        chunk = (HostedPosition((lead, other), lead), HostedPosition((tail,), tail))
        asked = dec.request()
        assert (asked.max_tokens, asked.n) == (4, 1)
        dec.observe([HostedResult("", chunk, "length", HostedUsage(3, 2))], 0.0)
        assert dec.prefix.data == "é".encode() and [s.alignment for s in dec.steps] == ["untuned", "untuned"]
