"""KV-cached, tree-batched scoring equals a plain full forward on each path (the oracle)."""

import random

import torch

from blackbox_proxy.local.engine import CachedContext


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


def test_new_context_tokens_and_tree_in_one_forward(models_a):
    """score(ids, paths) extends the cache and scores the trie together; then rolls back."""
    model = models_a[1]
    ctx = CachedContext(model)
    ctx.extend_to([5, 6, 7])
    seq = [5, 6, 7, 8, 9, 10]
    paths = [(11, 12), (13,)]
    got = ctx.score(seq, paths)
    assert ctx.ids == seq and ctx.cache.get_seq_length() == len(seq)
    for key in [(), (11,), (11, 12), (13,)]:
        assert torch.allclose(got[key], full_logprobs(model, seq + list(key)), atol=1e-4), key
    # a rollback in the same call: two tokens replaced, trie on top
    changed = [5, 6, 7, 8, 20, 21]
    got = ctx.score(changed, [(3,)])
    for key in [(), (3,)]:
        assert torch.allclose(got[key], full_logprobs(model, changed + list(key)), atol=1e-4)
    # same context again: only the trie is computed
    again = ctx.score(changed, [(4, 4)])
    assert torch.allclose(again[(4, 4)], full_logprobs(model, changed + [4, 4]), atol=1e-4)


def test_models_that_ignore_custom_masks_fall_back_to_exact_scoring(tok_a, models_a):
    """A model whose attention ignores the 4D mask fails the self-check; scoring stays exact."""
    import copy

    from blackbox_proxy import Scorer

    model = copy.deepcopy(models_a[1])
    plain_forward = model.forward

    def forward(*args, attention_mask=None, position_ids=None, **kwargs):
        return plain_forward(*args, **kwargs)  # drops the tree mask and positions

    model.forward = forward
    scorer = Scorer(model, tok_a, render="raw", name="maskless")
    assert scorer.check_tree_attention() is False
    session = scorer.session([5, 6, 7])
    got = session.distributions([8], [(9, 10), (11,)])
    for key in [(), (9,), (9, 10), (11,)]:
        assert torch.allclose(got[key], full_logprobs(models_a[1], [5, 6, 7, 8] + list(key)), atol=1e-4), key


def test_sliding_window_models_fall_back_past_the_window(tok_a):
    """A tree mask has no window: past it the scorer must use exact per-path forwards."""
    from transformers import MistralConfig, MistralForCausalLM

    from blackbox_proxy import Scorer

    config = MistralConfig(vocab_size=len(tok_a), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                           max_position_embeddings=256, eos_token_id=0)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    scorer = Scorer(model, tok_a, render="raw", name="mistral-tiny")
    assert scorer.sliding_window == 6
    context = list(range(10, 22))
    session = scorer.session(context[:3])
    got = session.distributions(context[3:], [(30, 31), (32,)])
    for key in [(), (30,), (30, 31), (32,)]:
        assert torch.allclose(got[key], full_logprobs(model, context + list(key)), atol=1e-4), key


def test_tries_rooted_at_several_prefixes_in_one_forward(models_a):
    """score_groups: every position of a chunk, each with its own candidate trie, at once."""
    model = models_a[1]
    ctx = CachedContext(model)
    ctx.extend_to([5, 6])
    seq = [5, 6, 7, 8, 9, 10]
    groups = [(3, [(11, 12), (13,)]), (5, [(11,)]), (6, [(14, 15)]), (4, [])]
    got = ctx.score_groups(seq, groups)
    assert ctx.ids == seq and ctx.cache.get_seq_length() == len(seq)
    for (anchor, paths), result in zip(groups, got):
        keys = {()} | {p[:d] for p in paths for d in range(1, len(p) + 1)}
        assert set(result) == keys
        for key in keys:
            want = full_logprobs(model, seq[:anchor] + list(key))
            assert torch.allclose(result[key][0], want, atol=1e-4), (anchor, key)
    # the slow fallback gives the same numbers
    slow = CachedContext(model)
    slow.tree_ok = False
    for (anchor, paths), result in zip(groups, slow.score_groups(seq, groups)):
        for key, value in result.items():
            assert torch.allclose(value, got[groups.index((anchor, paths))][key], atol=1e-4)
    assert slow.ids == seq
