"""Scoring across concurrent generations: one forward for several contexts of different lengths,
with and without trie nodes, plain and peft-paired (two rows), equals each context's own
``score_groups`` (the slow reference); and async generations through the queue equal sync ones."""

from __future__ import annotations

import asyncio
import copy
import threading
import time

import pytest
import torch

from blackbox_proxy import AsyncProxyTuner, ProxyTuner
from blackbox_proxy.local.batching import ScoringQueue
from blackbox_proxy.local.engine import CachedContext, model_lock


def scenarios(tok):
    """(history, ids, groups) per context: a cache built from ``history`` first, then one call."""
    a = tok.encode("The quick brown fox jumps over the lazy dog.")
    b = tok.encode("A café in Zürich sells crème brûlée")
    c = tok.encode("Numbers: 0 1 2 3")
    d = tok.encode("def add(a, b):\n    return a + b")
    return [
        (a[:6], a, [(len(a), [(5, 9), (5, 12, 40), (7,)])]),  # extend the cache, then a trie
        (None, b, [(len(b) - 3, [(11,), (12, 13)]), (len(b), [(14,)])]),  # no cache; two anchored tries
        (c, c, [(len(c), [])]),  # fresh: answered from memory, no forward
        (d[:4], d[:4] + [7, 8], [(len(d[:4]) + 2, [])]),  # two new tokens, no trie
        (a, a[:5], [(5, [(3,), (3, 4)])]),  # roll back, then a trie
    ]


def build(model, history, rows=1, kwargs=None):
    context = CachedContext(model, rows=rows, forward_kwargs=kwargs)
    context.tree_ok = True
    if history:
        context.score_groups(history, [(len(history), [])])
    return context


def run_together(queue, lock, jobs):
    """Submit every job from its own thread while the model is busy, so they share a forward."""
    results = [None] * len(jobs)
    errors = []

    def work(i, context, ids, groups):
        try:
            results[i] = queue.score_groups(context, ids, groups)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    with lock:
        threads = [threading.Thread(target=work, args=(i, *job)) for i, job in enumerate(jobs)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(queue._pending) < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.005)
    for t in threads:
        t.join(30)
    assert not errors, errors
    return results


def assert_same(got, want, atol=2e-4):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for key in w:
            assert torch.allclose(g[key], w[key], atol=atol), (key, float((g[key] - w[key]).abs().max()))


def test_one_forward_equals_each_contexts_own_forward(tok_a, models_a):
    model = copy.deepcopy(models_a[1])
    lock = model_lock(model)
    queue = ScoringQueue(lock)
    cases = scenarios(tok_a)
    contexts = [build(model, h) for h, _, _ in cases]
    references = [build(model, h) for h, _, _ in cases]
    want = [ref.score_groups(ids, groups) for ref, (_, ids, groups) in zip(references, cases)]
    got = run_together(queue, lock, [(c, ids, groups) for c, (_, ids, groups) in zip(contexts, cases)])
    assert queue.forwards == 1 and queue.batched_requests == 4  # the fresh one needed no forward
    assert_same([x for r in got for x in r], [x for r in want for x in r])
    # the caches were split back correctly: the next calls (one more token) still agree
    follow = [(c, ids + [17], [(len(ids) + 1, [(3,)])]) for c, (_, ids, _) in zip(contexts, cases)]
    got = run_together(queue, lock, follow)
    want = [ref.score_groups(ids, groups) for ref, (_, ids, groups) in zip(references, follow)]
    assert_same([x for r in got for x in r], [x for r in want for x in r])
    for c, ref in zip(contexts, references):
        assert c.ids == ref.ids and c.cache.get_seq_length() == ref.cache.get_seq_length() == len(ref.ids)


def test_padding_is_really_masked(tok_a, models_a):
    """A wrong mask (padding visible) must break the comparison: the test can fail."""
    model = copy.deepcopy(models_a[1])
    lock = model_lock(model)
    queue = ScoringQueue(lock)
    cases = scenarios(tok_a)[:2]
    contexts = [build(model, h) for h, _, _ in cases]
    references = [build(model, h) for h, _, _ in cases]
    want = [ref.score_groups(ids, groups) for ref, (_, ids, groups) in zip(references, cases)]
    original = torch.full

    def leaky_full(size, fill, **kw):  # masks built as zeros everywhere: padding and future visible
        out = original(size, fill, **kw)
        if isinstance(fill, float) and fill < -1e30:
            out.zero_()
        return out

    torch.full = leaky_full
    try:
        got = run_together(queue, lock, [(c, ids, groups) for c, (_, ids, groups) in zip(contexts, cases)])
    finally:
        torch.full = original
    with pytest.raises(AssertionError):
        assert_same([x for r in got for x in r], [x for r in want for x in r])


def test_peft_pairs_batch_as_rows(tok_a, models_a):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(models_a[2]), config).eval()
    kwargs = {"adapter_names": ["default", "__base__"]}
    lock = model_lock(peft_model)
    queue = ScoringQueue(lock)
    cases = scenarios(tok_a)[:2] + scenarios(tok_a)[3:4]
    contexts = [build(peft_model, h, rows=2, kwargs=kwargs) for h, _, _ in cases]
    references = [build(peft_model, h, rows=2, kwargs=kwargs) for h, _, _ in cases]
    want = [ref.score_groups(ids, groups) for ref, (_, ids, groups) in zip(references, cases)]
    got = run_together(queue, lock, [(c, ids, groups) for c, (_, ids, groups) in zip(contexts, cases)])
    assert queue.forwards == 1
    assert_same([x for r in got for x in r], [x for r in want for x in r])
    first = want[0][0][()]
    assert float((first[0] - first[1]).abs().max()) > 1e-3  # the two rows really differ (adapter on/off)


def test_async_generations_share_forwards_and_equal_sync(server_a, tok_a, scorers_b):
    prompts = ["The quick brown", "A café in Zürich", "Numbers: 1 2", "She said:", "There are many", "def add("]
    kw = dict(base_url=server_a.base_url, model="tiny", expert=scorers_b[0], anti_expert=scorers_b[1], top_k=10,
              hosted_tokenizer=tok_a, max_retries=0)
    sync = ProxyTuner(**kw)
    want = [sync.generate(p, max_tokens=8, strategy="per-step").text for p in prompts]
    want_spec = [sync.generate(p, max_tokens=8, strategy="speculative", temperature=1.0, seed=i).text
                 for i, p in enumerate(prompts)]
    from blackbox_proxy.local.batching import model_queue

    queue = model_queue(scorers_b[0].model, scorers_b[0].lock)
    before = queue.batched_requests

    async def main():
        async with AsyncProxyTuner(**kw) as tuner:
            greedy = await asyncio.gather(*(tuner.generate(p, max_tokens=8, strategy="per-step") for p in prompts))
            spec = await asyncio.gather(*(tuner.generate(p, max_tokens=8, strategy="speculative", temperature=1.0,
                                                         seed=i) for i, p in enumerate(prompts)))
            return [r.text for r in greedy], [r.text for r in spec]

    got, got_spec = asyncio.run(main())
    assert got == want and got_spec == want_spec
    assert queue.batched_requests > before  # some forwards were shared


def test_a_failed_batched_forward_reaches_every_waiting_caller(tok_a, models_a, monkeypatch):
    """An exception inside the shared forward (say, out of memory) must be raised in every thread
    whose request was taken, and their contexts reset, not leave them waiting forever."""
    from blackbox_proxy.local import batching

    model = copy.deepcopy(models_a[1])
    lock = model_lock(model)
    queue = ScoringQueue(lock)
    cases = scenarios(tok_a)[:2]
    contexts = [build(model, h) for h, _, _ in cases]

    def boom(_layers):
        raise MemoryError("out of memory (simulated)")

    monkeypatch.setattr(batching, "_cache_from", boom)
    errors = []

    def work(context, ids, groups):
        try:
            queue.score_groups(context, ids, groups)
        except MemoryError as exc:
            errors.append(exc)

    with lock:
        threads = [threading.Thread(target=work, args=(c, ids, groups)) for c, (_, ids, groups) in zip(contexts, cases)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(queue._pending) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
    for t in threads:
        t.join(20)
        assert not t.is_alive()
    assert len(errors) == 2 and all(c.cache is None and c.ids == [] for c in contexts)
