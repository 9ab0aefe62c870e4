"""Multi-draft speculative decoding: the tree maths on hand-built numbers and against its exact
oracle, a statistical test of the decoder's draws against exact proxy tuning (and of a wrong
rule failing it), deterministic tree walks, and greedy equality with per-step over loopback HTTP."""

import math
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from decoders import build
from blackbox_proxy import ConfigurationError

from blackbox_proxy.decoding.walks import tree as multidraft
from blackbox_proxy.decoding.walks.tree import choose_drafts
from blackbox_proxy.decoding.speculative import SpeculativeDecoder
from blackbox_proxy.maths import tree
from blackbox_proxy.maths.tree import NodeScore, node_distribution, node_greedy, node_sampled, target
from blackbox_proxy.types import Candidate, HostedPosition, HostedResult, HostedUsage
from test_speculative import (MemoSession, chi2_pvalue, concentrated_models, draw_draft, every_candidate,  # noqa: F401
                             exact_joint, make)  # (concentrated_models: a fixture)

LOG = math.log


def node(p, delta, children, lp_small=None):
    lp = torch.tensor([LOG(x) for x in p], dtype=torch.float64)
    d = torch.tensor(delta, dtype=torch.float64)
    small = torch.full_like(lp, -50.0) if lp_small is None else torch.tensor(lp_small, dtype=torch.float64)
    return NodeScore(lp, d, small + d, small, tuple(children))


# ----- the maths -----------------------------------------------------------------------------------


def test_rounds_known_answers():
    # p_L = (.5, .3, .2), w = (1, 2, .5): Z = 1.2, p~ = (5/12, 1/2, 1/12)
    n = node([0.5, 0.3, 0.2], [0.0, LOG(2), LOG(0.5)], [0, 0, 2])
    r, q, log_z, _ = target(n, 1.0)
    assert math.exp(log_z) == pytest.approx(1.2)
    assert r.tolist() == pytest.approx([5 / 12, 1 / 2, 1 / 12, 0.0])
    gen = torch.Generator().manual_seed(0)
    # round 1 rejects token 0 (u = .9 > 5/6); the residual (p~ - q)+ is all on token 1, so
    # round 2's token 0 has r_2/q = 0 and round 3's token 2 as well: every round rejects and the
    # replacement is token 1, surely
    step = node_sampled(n, 1.0, [0.9, 0.0, 0.0], gen)
    assert step.accepted is None and step.replacement == 1
    assert step.accept_probs == pytest.approx([5 / 6, 0.0, 0.0])
    # the first round accepts with u below 5/6
    assert node_sampled(n, 1.0, [0.8, 0.9, 0.9], gen).accepted == 0
    # a second child of the under-drafted token is accepted surely after a rejection
    n2 = node([0.5, 0.3, 0.2], [0.0, LOG(2), LOG(0.5)], [2, 1])
    step = node_sampled(n2, 1.0, [0.99, 0.99], gen)
    assert step.accepted == 1 and step.accept_probs == pytest.approx([0.5 / 1.2, 1.0])


def test_infinite_weights():
    gen = torch.Generator().manual_seed(0)
    # +inf on a child: the target lives there, accepted whatever u is
    assert node_sampled(node([0.9, 0.1], [0.0, math.inf], [1]), 1.0, [0.999], gen).accepted == 0
    # +inf elsewhere: both children rejected, the replacement is the +inf candidate
    step = node_sampled(node([0.6, 0.3, 0.1], [0.0, 0.0, math.inf], [0, 1]), 1.0, [0.0, 0.0], gen)
    assert step.accepted is None and step.replacement == 2 and step.accept_probs == (0.0, 0.0)
    # -inf (the expert rules a draft out): rejected surely; the replacement is never it
    for seed in range(20):
        step = node_sampled(node([0.7, 0.3], [-math.inf, 0.0], [0, 0]), 1.0, [0.0, 0.0],
                            torch.Generator().manual_seed(seed))
        assert step.accepted is None and step.replacement == 1


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_the_oracle_is_the_target(m):
    """The recursion of node_distribution (the exact output of m rounds) equals the target for
    any target and draft: the maths the decoder relies on."""
    gen = torch.Generator().manual_seed(m)
    for _ in range(20):
        q = torch.rand(6, generator=gen, dtype=torch.float64) ** 3
        q /= q.sum()
        r = torch.rand(6, generator=gen, dtype=torch.float64) ** 3
        r /= r.sum()
        assert node_distribution(q, r, m).tolist() == pytest.approx(r.tolist(), abs=1e-12)


def draws_at_node(p, delta, m, n, seed, rounds=node_sampled):
    gen = torch.Generator().manual_seed(seed)
    q = torch.tensor(p, dtype=torch.float64)
    out = []
    for _ in range(n):
        children = torch.multinomial(q.float(), m, replacement=True, generator=gen).tolist()
        step = rounds(node(p, delta, children), 1.0, torch.rand(m, generator=gen, dtype=torch.float64).tolist(), gen)
        out.append(children[step.accepted] if step.accepted is not None else step.replacement)
    return out


def test_node_draws_follow_the_target_and_a_wrong_rule_does_not():
    p, delta = [0.4, 0.3, 0.2, 0.1], [LOG(0.2), LOG(1.5), LOG(3.0), LOG(0.5)]
    r = target(node(p, delta, [0]), 1.0)[0][:-1]
    for m in (2, 4):
        counts = Counter(draws_at_node(p, delta, m, 20_000, seed=m))
        assert chisquare([counts[i] for i in range(4)], (r * 20_000).tolist()).pvalue > 0.01

    def no_residual_update(n, alpha, uniforms, generator, mask=None):
        """The mutation: every round compares with the first target (the residual never moves)."""
        r1, q, log_z, how = target(n, alpha)
        for j, (child, u) in enumerate(zip(n.children, uniforms)):
            if u < min(1.0, float(r1[child] / q[child])):
                return tree.NodeStep(j, None, (), log_z, how)
        excess = torch.clamp(r1 - q, min=0)[:-1]
        return tree.NodeStep(None, int(torch.multinomial((excess / excess.sum()).float(), 1, generator=generator)),
                             (), log_z, how)

    counts = Counter(draws_at_node(p, delta, 4, 20_000, seed=4, rounds=no_residual_update))
    assert chisquare([counts[i] for i in range(4)], (r * 20_000).tolist()).pvalue < 1e-6


def test_greedy_node_keeps_the_tuned_argmax_among_the_top_k():
    n = node([0.5, 0.3, 0.15, 0.05], [0.0, 1.0, 0.0, 5.0], [0, 1, 3])  # argmax over all: 3; over top-3: 1
    top = torch.tensor([True, True, True, False])
    step = node_greedy(n, 1.0, top)
    assert step.accepted == 1
    n = node([0.5, 0.3, 0.15, 0.05], [0.0, 1.0, 0.0, 5.0], [0, 0, 3])
    step = node_greedy(n, 1.0, top)
    assert step.accepted is None and step.replacement == 1


def test_choose_drafts():
    assert choose_drafts(0, 0, 4) == 2  # prior 3 in 4: (1/4)^2 <= 0.1
    assert choose_drafts(10, 40, 4) == 4 and choose_drafts(10, 40, 2) == 2
    assert choose_drafts(98, 100, 4) == 1
    assert choose_drafts(0, 0, 1) == 1


# ----- the decoder over a fake host: statistical ------------------------------------------------------


def tree_draws(tok_a, models, n, seed0, drafts=3, chunk=3, alpha=1.0):
    """``n`` two-token generations from the multi-draft decoder; the fake host draws each
    call's ``n`` choices independently from the hosted model (k = the whole vocabulary)."""
    from blackbox_proxy.tokens.loaders import vocabulary_from_hf

    large, expert, anti = models
    vocab = vocabulary_from_hf(tok_a)
    prompt = tok_a.encode("The quick brown")
    hosted, e, a = MemoSession(large, []), MemoSession(expert, prompt), MemoSession(anti, prompt)
    gen = torch.Generator().manual_seed(seed0)
    position = every_candidate(hosted, vocab)

    firsts, calls, sizes = [], 0, Counter()
    for i in range(n):
        dec = build(SpeculativeDecoder, e, a, vocab, prompt_ids=prompt, top_k=400, max_choices=16, alpha=alpha,
                    temperature=1.0, max_tokens=2, chunk=chunk, seed=seed0 + i, drafts=drafts, tail_calls=0)
        while not dec.done:
            req = dec.request()
            sizes[req.n] += 1
            dec.observe([draw_draft(req, position, gen) for _ in range(req.n)], 0.0)
            calls += 1
        firsts.append(tuple(list(dec.prefix.ids)[:2]))
    return firsts, (hosted, e, a), calls, sizes


@pytest.mark.slow
def test_multidraft_draws_match_exact_proxy_tuning(tok_a, concentrated_models, monkeypatch):
    models, live = concentrated_models
    prompt = tok_a.encode("The quick brown")
    firsts, sessions, calls, sizes = tree_draws(tok_a, models, 10_000, seed0=1)
    assert sizes[1] == 0 and sizes[3] > 0  # every call asked several drafts (adaptive, capped at 3)
    table = exact_joint(sessions, prompt, live)
    p_right = chi2_pvalue(firsts, table)
    print(f"multi-draft joint of the first two tokens vs exact proxy tuning: chi-square p = {p_right:.3f}; "
          f"{calls / 10_000:.3f} calls per generation")
    assert p_right > 0.01
    assert chi2_pvalue(firsts, exact_joint(sessions, prompt, live, alpha=0.0)) < 1e-6
    # the mutation: rounds that never move the residual
    real = tree.node_sampled

    def stale(n, alpha, uniforms, generator, mask=None):
        one = [NodeScore(n.hosted_logprobs, n.delta, n.lp_e, n.lp_a, (c,)) for c in n.children]
        for j, (single, u) in enumerate(zip(one, uniforms)):
            step = real(single, alpha, [u], generator, mask)
            if step.accepted is not None:
                return tree.NodeStep(j, None, (), step.log_z, step.tail)
        return step

    monkeypatch.setattr(multidraft, "node_sampled", stale)
    wrong, *_ = tree_draws(tok_a, models, 3_000, seed0=1)  # the wrong rule is far off: fewer draws show it
    p_wrong = chi2_pvalue(wrong, table)
    print(f"with the residual never updated between rounds: p = {p_wrong:.2g}")
    assert p_wrong < 0.01


# ----- deterministic tree walks ----------------------------------------------------------------------


class FixedSession:
    """Small-model log P by context: ``table[len(ids) - prompt]`` is the row (uniform elsewhere)."""

    def __init__(self, rows, size):
        self.rows, self.size = rows, size

    def distributions_groups(self, groups):
        out = []
        for ids, _ in groups:
            row = self.rows.get(tuple(ids), torch.full((self.size,), -LOG(self.size), dtype=torch.float64))
            out.append({(): row})
        return out

    def close(self):
        pass


def fixed_decoder(tok_a, expert_rows, anti_rows=None, temperature=1.0, drafts=2, max_tokens=8):
    from blackbox_proxy.tokens.loaders import vocabulary_from_hf

    vocab = vocabulary_from_hf(tok_a)
    size = len(vocab.token_bytes)
    dec = build(SpeculativeDecoder, FixedSession(expert_rows, size), FixedSession(anti_rows or {}, size), vocab,
                prompt_ids=[], top_k=3, max_choices=16, alpha=1.0, temperature=temperature, max_tokens=max_tokens,
                chunk=4, seed=0, drafts=drafts, tail_calls=0)
    return dec, vocab


def cand(vocab, t, lp):
    return Candidate(vocab.token_bytes[t].decode("utf-8", "replace"), vocab.token_bytes[t], lp, t)


def position(vocab, sampled, tops=(5, 6, 7)):
    """Top-3 ids ``tops`` at logprobs log(.5), log(.3), log(.2) (nothing outside), ``sampled`` drawn."""
    cands = tuple(cand(vocab, t, LOG(p)) for t, p in zip(tops, (0.5, 0.3, 0.2)))
    return HostedPosition(candidates=cands, sampled=next(c for c in cands if c.token_id == sampled))


def test_rejects_at_position_3_of_draft_2(tok_a):
    """Draft 1 is rejected at the root (the expert rules its token out); draft 2 is accepted for
    three positions and rejected at its fourth, where the expert rules its token out too."""
    vocab_size = len(tok_a)
    e_rows = {(): _lp(vocab_size, {5: -math.inf, 6: 0.0, 7: 0.0}),
              (6, 6, 6): _lp(vocab_size, {5: 0.0, 6: -math.inf, 7: 0.0})}
    a_rows = {(): _lp(vocab_size, {5: 0.0, 6: 0.0, 7: 0.0}), (6, 6, 6): _lp(vocab_size, {5: 0.0, 6: 0.0, 7: 0.0})}
    dec, vocab = fixed_decoder(tok_a, e_rows, a_rows, drafts=2)
    d1 = HostedResult("", (position(vocab, 5), position(vocab, 5), position(vocab, 5), position(vocab, 5)), "length",
                      HostedUsage())
    d2 = HostedResult("", tuple(position(vocab, 6) for _ in range(4)), "length", HostedUsage())
    dec.request()
    trace = dec.observe([d1, d2], 0.0)
    # positions 0-2 of draft 2 are kept; at position 3 token 6 is ruled out, the replacement is 5 or 7
    assert trace.accepted == 3 and trace.rejected_at == 3
    assert list(dec.prefix.ids)[:3] == [6, 6, 6] and list(dec.prefix.ids)[3] in (5, 7)
    assert dec.usage.draft_sequences == 2 and dec.usage.accepted_drafts == 3  # one call of two drafts


def _lp(size, values):
    """A log distribution with the given ids' relative log weights and everything else at -40."""
    r = torch.full((size,), -40.0, dtype=torch.float64)
    for t, v in values.items():
        r[t] = v
    return torch.log_softmax(r, 0)


def test_all_drafts_rejected_at_the_root(tok_a):
    size = len(tok_a)
    e_rows = {(): _lp(size, {5: -math.inf, 6: -math.inf, 7: 0.0})}
    a_rows = {(): _lp(size, {5: 0.0, 6: 0.0, 7: 0.0})}
    dec, vocab = fixed_decoder(tok_a, e_rows, a_rows, drafts=3)
    results = [HostedResult("", (position(vocab, t), position(vocab, 5)), "length", HostedUsage()) for t in (5, 6, 5)]
    trace = dec.observe(results, 0.0)
    assert trace.accepted == 0 and trace.rejected_at == 0 and list(dec.prefix.ids) == [7]


def test_greedy_tree_follows_the_tuned_argmax_across_drafts(tok_a):
    """Greedy: the tuned argmax is draft 2's token at the root and draft 1's below it is not
    reachable (different prefix); the walk keeps draft 2's path while it is the argmax."""
    size = len(tok_a)
    e_rows = {(): _lp(size, {5: 0.0, 6: 2.0, 7: 0.0}), (6,): _lp(size, {5: 0.0, 6: 0.0, 7: 3.0})}
    a_rows = {(): _lp(size, {5: 0.0, 6: 0.0, 7: 0.0}), (6,): _lp(size, {5: 0.0, 6: 0.0, 7: 0.0})}
    dec, vocab = fixed_decoder(tok_a, e_rows, a_rows, temperature=0.0, drafts=2)
    d1 = HostedResult("", (position(vocab, 5), position(vocab, 5)), "length", HostedUsage())
    d2 = HostedResult("", (position(vocab, 6), position(vocab, 7), position(vocab, 5)), "length", HostedUsage())
    trace = dec.observe([d1, d2], 0.0)
    # root: scores log(.5), log(.3)+2, log(.2) -> 6; at (6,): 7 is the argmax (draft 2 drew it);
    # at (6, 7): uniform rows, so 5 (the hosted argmax, drawn by draft 2) is kept; the chunk ends
    assert list(dec.prefix.ids) == [6, 7, 5] and trace.accepted == 3 and trace.rejected_at is None


def test_drafts_option_is_validated(server_a, tok_a, scorers_a):
    t = make(server_a, scorers_a, top_k=10, hosted_tokenizer=tok_a)
    with pytest.raises(ConfigurationError, match="drafts must be an integer from 1 to 16"):
        t.generate("Hi", strategy="speculative", drafts=0)


# ----- end to end over loopback HTTP ---------------------------------------------------------------------


@pytest.mark.parametrize("which", ["same", "cross"])
def test_greedy_multidraft_equals_per_step_greedy(server_a, tok_a, scorers_a, scorers_b, which):
    scorers = scorers_a if which == "same" else scorers_b
    t = make(server_a, scorers, top_k=20, hosted_tokenizer=tok_a)
    trees = 0
    for prompt in ["The quick brown", "A café in Zürich sells", "Numbers: 1 2"]:
        per_step = t.generate(prompt, max_tokens=16, strategy="per-step")
        spec = t.generate(prompt, max_tokens=16, strategy="speculative", drafts=4)
        assert spec.text == per_step.text
        assert spec.usage.api_calls < per_step.usage.api_calls
        trees += spec.usage.draft_sequences
    assert trees > 0  # the calls did ask for several drafts


def test_sampled_multidraft_over_http_repeats_with_a_seed(server_a, tok_a, scorers_b):
    t = make(server_a, scorers_b, top_k=10, hosted_tokenizer=tok_a)
    a = t.generate("A café in", max_tokens=12, temperature=1.0, seed=4, strategy="speculative", drafts=3)
    b = t.generate("A café in", max_tokens=12, temperature=1.0, seed=4, strategy="speculative", drafts=3)
    assert a.text == b.text and a.usage.draft_sequences > 0
    assert a.usage.completion_tokens >= a.usage.generated_tokens


# ----- small-model work while the API call is in flight ---------------------------------------------------


@pytest.mark.parametrize("strategy", ["per-step", "speculative"])
def test_prefetch_while_waiting_changes_nothing_but_the_timing(server_a, tok_a, scorers_a, scorers_b, strategy,
                                                              monkeypatch):
    """The prefetch runs the small models over the committed text during each call; the texts
    and every candidate's tuned probability are those of a run without it."""
    import asyncio

    from blackbox_proxy import AsyncProxyTuner
    from blackbox_proxy.decoding.base import Decoder

    for scorers in (scorers_a, scorers_b):
        # whole chunks: a streamed chunk's walk is overlapped work too (test_streamed.py)
        t = make(server_a, scorers, top_k=20, hosted_tokenizer=tok_a, stream_chunks=False)
        with_it = t.generate("A café in Zürich sells", max_tokens=12, strategy=strategy)
        assert with_it.usage.overlapped_seconds > 0
        with monkeypatch.context() as m:
            m.setattr(Decoder, "prefetch", lambda self: None)
            without = t.generate("A café in Zürich sells", max_tokens=12, strategy=strategy)
        assert without.usage.overlapped_seconds == 0
        assert with_it.text == without.text
        for a, b in zip(with_it.trace, without.trace):
            assert [c.prob for c in a.candidates] == pytest.approx([c.prob for c in b.candidates], abs=1e-6)

        async def run_async():
            async with AsyncProxyTuner(base_url=server_a.base_url, model="tiny", expert=scorers[0],
                                       anti_expert=scorers[1], max_retries=0, top_k=20, hosted_tokenizer=tok_a) as at:
                return await at.generate("A café in Zürich sells", max_tokens=12, strategy=strategy)

        async_result = asyncio.run(run_async())
        assert async_result.text == with_it.text  # the async tuner does not prefetch (rounds.py)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_text_prompt_trees_end_on_whole_characters(server_a, tok_a, scorers_a, temperature):
    """Without a hosted tokenizer (text prompts) random tiny models draw lone UTF-8 pieces; every
    tree walk must still leave a whole-character continuation, greedy and sampled."""
    t = make(server_a, scorers_a, top_k=8, hosted_tokenizer="none")
    drafted = 0
    for i in range(8):
        result = t.generate(f"Question: {i}", max_tokens=6, temperature=temperature, seed=i, strategy="speculative",
                            drafts=4)
        assert "\ufffd" not in result.text
        drafted += result.usage.draft_sequences
    assert drafted > 8  # several drafts per call were asked


def test_text_prompt_greedy_equals_per_step(server_a, tok_a, scorers_b):
    """With text prompts, greedy speculative (one draft or a tree) chooses among the candidates
    a text prompt can end on, as per-step greedy does: the same text."""
    t = make(server_a, scorers_b, top_k=20, hosted_tokenizer="none")
    for prompt in ["A café in Zürich sells", "Question: 7", "Numbers: 1 2"]:
        per_step = t.generate(prompt, max_tokens=10, strategy="per-step")
        for drafts in (1, 4):
            spec = t.generate(prompt, max_tokens=10, strategy="speculative", drafts=drafts)
            assert spec.text == per_step.text, (prompt, drafts)


def test_tree_steps_keep_the_positions_dropped_count(tok_a):
    """A tree's path positions (and the trace steps read from them) report how many API entries
    at that position could not be used, as per-step's steps do (they used to say 0)."""
    import dataclasses

    size = len(tok_a)
    e_rows = {(): _lp(size, {5: 0.0, 6: 0.0, 7: 0.0}), (5,): _lp(size, {5: 0.0, 6: 0.0, 7: 0.0})}
    dec, vocab = fixed_decoder(tok_a, e_rows, e_rows, temperature=0.0, drafts=2)
    dropped = [dataclasses.replace(position(vocab, 5), dropped=2), dataclasses.replace(position(vocab, 5), dropped=1)]
    d1 = HostedResult("", tuple(dropped), "length", HostedUsage())
    d2 = HostedResult("", (dataclasses.replace(position(vocab, 5), dropped=2), position(vocab, 6)), "length",
                      HostedUsage())
    dec.request()
    trace = dec.observe([d1, d2], 0.0)
    assert trace.accepted == 2
    assert [step.dropped for step in dec.steps] == [2, 0]  # the second node's fewest: draft 2 dropped none there
