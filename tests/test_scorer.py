"""KV-cached, tree-batched scoring equals a plain full forward on each path (the oracle)."""

import random

import torch

from blackbox_proxy.scorer import CachedContext


def full_logprobs(model, ids):
    """Slow reference: no cache, one forward over the whole sequence."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)


def test_tree_scoring_matches_separate_forwards(models_a):
    model = models_a[1]
    rng = random.Random(0)
    ctx = CachedContext(model)
    context = [rng.randrange(3, 400) for _ in range(17)]
    ctx.extend_to(context)
    paths = [(5, 9, 11), (5, 9, 12), (5, 30), (77,), (78, 5, 9, 200)]
    got = ctx.tree(paths)
    assert len(ctx.ids) == len(context) and ctx.cache.get_seq_length() == len(context)  # cropped back
    expected_keys = {()} | {p[:d] for p in paths for d in range(1, len(p) + 1)}
    assert set(got) == expected_keys
    for key in expected_keys:
        assert torch.allclose(got[key], full_logprobs(model, context + list(key)), atol=1e-4), key


def test_fallback_scoring_matches(models_a):
    model = models_a[2]
    ctx = CachedContext(model)
    ctx.tree_ok = False
    context = [10, 20, 30, 40]
    ctx.extend_to(context)
    got = ctx.tree([(7, 8), (9,)])
    for key in [(7,), (7, 8), (9,)]:
        assert torch.allclose(got[key], full_logprobs(model, context + list(key)), atol=1e-4)


def test_cache_extends_and_rolls_back(models_a):
    model = models_a[0]
    ctx = CachedContext(model)
    seq = [3, 50, 60, 70, 80, 90]
    for n in range(1, len(seq) + 1):
        assert torch.allclose(ctx.extend_to(seq[:n]), full_logprobs(model, seq[:n]), atol=1e-4)
    # re-tokenisation changed the last two tokens: the cache rolls back to the common prefix
    changed = seq[:4] + [111, 112]
    assert torch.allclose(ctx.extend_to(changed), full_logprobs(model, changed), atol=1e-4)
    # shrinking to a prefix, then a completely different sequence
    assert torch.allclose(ctx.extend_to(seq[:2]), full_logprobs(model, seq[:2]), atol=1e-4)
    other = [9, 8, 7]
    assert torch.allclose(ctx.extend_to(other), full_logprobs(model, other), atol=1e-4)


def test_scorer_self_check_accepts_tree_attention(scorers_a):
    assert scorers_a[0].check_tree_attention() is True
