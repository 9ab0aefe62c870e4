"""``ModelRunner``'s batched samples (n > 1: one forward per step over the rows still going).

The oracle is the model itself: every recorded logprob is checked against a plain forward over
the whole sampled text, and the samples' joint law against the model's exact joint.
"""

import math
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare
from test_speculative import concentrated

from blackbox_proxy.local.runner import ModelRunner


@pytest.fixture(scope="module")
def setup(tok_a):
    from tiny import tiny_llama

    live = [tok_a.convert_tokens_to_ids(t) for t in ["a", "b", "c", "d", "e", "f"]]
    model = concentrated(tiny_llama(tok_a, 30, hidden=32), live, 30)
    runner = ModelRunner(model, tok_a, name="tiny")
    return runner, model, live, tok_a.encode("The quick")


def exact_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_rows_that_end_at_different_steps_keep_their_own_contexts(setup):
    """An end token that is drawn often ('a') makes rows leave the batch at different steps; each
    remaining row's logprobs and top-3 must still be those of its own text (a row mixed up with
    another when the batch shrinks would fail here)."""
    runner, model, live, prompt = setup
    saved = runner.vocab.end_ids
    runner.vocab.end_ids = frozenset({live[0]})
    try:
        gens = runner.generate(prompt, max_tokens=10, temperature=1.0, top_p=1.0, seed=5, stop=[], top_k=3, n=12)
    finally:
        runner.vocab.end_ids = saved
    lengths = Counter(len(g.tokens) for g in gens)
    assert len(lengths) >= 3, lengths  # rows did leave at different steps
    assert any(g.finish_reason == "stop" for g in gens) and any(g.finish_reason == "length" for g in gens)
    for g in gens:
        ids = [s.token_id for s in g.tokens]
        truth = exact_logprobs(model, prompt + ids)[len(prompt) - 1:]
        for step, row in zip(g.tokens, truth):
            assert step.logprob == pytest.approx(float(row[step.token_id]), abs=1e-4)
            top_ids = [i for i, _ in step.top]
            assert top_ids == torch.topk(row, 3).indices.tolist()
        assert (g.finish_reason == "stop") == (ids[-1] == live[0])
        assert list(g.text_ids) == (ids[:-1] if g.finish_reason == "stop" else ids)


def test_batched_samples_follow_the_models_joint_law(setup):
    """4,000 two-token samples in one call against the exact joint p(t1) p(t2 | t1); the same
    samples are far from p(t1) p(t2) with t2 read at the prompt (what a batch that fed every row
    the same token, or lost the first token, would draw)."""
    runner, model, live, prompt = setup
    draws = 4_000
    gens = runner.generate(prompt, max_tokens=2, temperature=1.0, top_p=1.0, seed=11, stop=[], top_k=0, n=draws)
    counts = Counter(tuple(s.token_id for s in g.tokens) for g in gens)
    first = exact_logprobs(model, prompt)[-1]
    joint, wrong = {}, {}
    for t1 in live:
        second = exact_logprobs(model, prompt + [t1])[-1]
        for t2 in live:
            joint[(t1, t2)] = math.exp(first[t1] + second[t2])
            wrong[(t1, t2)] = math.exp(first[t1] + first[t2])
    cells = sorted(joint)
    assert sum(counts[c] for c in cells) == draws  # nothing drawn off the live tokens
    observed = [counts[c] for c in cells]
    for target, expect_fit in ((joint, True), (wrong, False)):
        total = sum(target[c] for c in cells)
        expected = [draws * target[c] / total for c in cells]
        p = chisquare(observed, expected).pvalue
        assert (p > 1e-3) if expect_fit else (p < 1e-6), (expect_fit, p)


def test_greedy_n_is_one_generation_repeated(setup):
    runner, _, _, prompt = setup
    gens = runner.generate(prompt, max_tokens=5, temperature=0.0, top_p=1.0, seed=None, stop=[], top_k=1, n=3)
    assert len(gens) == 3 and len({g.text_ids for g in gens}) == 1
