"""The faster scoring paths give the numbers of the slow ones (correctness only; no timings).

- :class:`AdapterRows` (LoRA on some rows of one forward) equals peft's toggled forwards and its
  mixed batch, alone, paired, and tiled over a batched queue forward;
- logits projected only where read (``logits_to_keep``) equal full forwards;
- a session seeded from the last prompt's cached prefix equals a fresh one and feeds fewer tokens;
- the same-tokenizer path feeds one position per model call after the prompt;
- end to end over HTTP, the paired fast path gives the same text and offsets as the exact
  per-path oracle (sequential).
"""

from __future__ import annotations

import copy

import pytest
import torch

from blackbox_proxy import ProxyTuner, Scorer
from blackbox_proxy.local import sessions
from blackbox_proxy.local.batching import ScoringQueue
from blackbox_proxy.local.engine import CachedContext, model_lock
from blackbox_proxy.local.adapter_rows import AdapterRows, adapter_rows, check_mixed_batch
from blackbox_proxy.local.sessions import PromptStore, open_sessions


def full_logprobs(model, ids, forward_context=None):
    """Slow reference: no cache, one forward over the whole sequence."""
    with torch.no_grad(), (forward_context() if forward_context else torch.no_grad()):
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)


class Calls:
    """Counts a model's calls and the tokens fed per call (a forward pre-hook)."""

    def __init__(self, model):
        self.positions: list[int] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.positions.append(int(ids.shape[1]))


@pytest.fixture()
def peft_pair(tok_a, models_a):
    """(expert, anti) Scorers over one fresh peft LoRA model (adapter on / off)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(models_a[2]), config).eval()
    return (Scorer(model, tok_a, render="raw", adapter=True, name="E"),
            Scorer(model, tok_a, render="raw", adapter=False, name="A"))


def test_adapter_rows_equal_toggled_forwards(peft_pair):
    expert, anti = peft_pair
    model = expert.model
    rows = AdapterRows(model, "default", (True, False, False, True))
    assert rows.layers is not None and len(rows.layers) == 2 * 3  # 2 layers x q, v, o
    ids = [5, 17, 30, 2, 99, 120]
    x = torch.tensor([ids] * 4)
    with torch.inference_mode():
        with rows():
            got = torch.log_softmax(model(input_ids=x).logits[:, -1].float(), -1)
        mixed = torch.log_softmax(model(input_ids=x, adapter_names=["default", "__base__", "__base__", "default"])
                                  .logits[:, -1].float(), -1)
    on = full_logprobs(model, ids, expert.forward_context)
    off = full_logprobs(model, ids, anti.forward_context)
    for row, want in enumerate((on, off, off, on)):
        assert torch.allclose(got[row], want, atol=1e-5), row
    assert torch.allclose(got, mixed, atol=1e-6)  # peft's own arithmetic
    assert float((on - off).abs().max()) > 1e-2  # the adapter really changes the rows
    assert all("forward" not in module.__dict__ for module, *_ in rows.layers)  # restored


def test_adapter_rows_refuse_what_they_do_not_cover(tok_a, models_a):
    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(copy.deepcopy(models_a[2]), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).eval()
    assert AdapterRows(dora, "default").layers is None and AdapterRows(dora, "default").ok is False
    assert AdapterRows(copy.deepcopy(models_a[2]), "default").layers is None  # no LoRA at all
    rows = AdapterRows(get_peft_model(copy.deepcopy(models_a[2]), LoraConfig(r=4, target_modules=["q_proj"])),
                       "default")
    with pytest.raises(RuntimeError, match="rows per context"):
        rows.rows_on(torch.zeros(3, 2, 4))  # 3 rows for a pattern of 2


def test_pair_uses_adapter_rows_and_matches_exact_forwards(peft_pair):
    expert, anti = peft_pair
    prompt = [5, 6, 7, 8]
    assert check_mixed_batch(expert, anti) is True
    assert adapter_rows(expert.model, "default").ok is True
    e, a = open_sessions(expert, prompt, anti, prompt)
    assert e.shared.context._forward_context is adapter_rows(expert.model, "default")
    paths = [(9, 10), (11,)]
    got_e, got_a = e.distributions([20, 21], paths), a.distributions([20, 21], paths)
    for key in [(), (9,), (9, 10), (11,)]:
        ids = prompt + [20, 21] + list(key)
        assert torch.allclose(got_e[key], full_logprobs(expert.model, ids, expert.forward_context), atol=1e-4), key
        assert torch.allclose(got_a[key], full_logprobs(anti.model, ids, anti.forward_context), atol=1e-4), key
    # a scorer alone (the separate path) runs its single row the same way, without peft's toggling
    alone = anti.session(prompt)
    assert alone.context._forward_context is adapter_rows(anti.model, "default", (False,))
    assert torch.allclose(alone.distributions([20, 21])[()], got_a[()], atol=1e-5)


def test_queue_batches_adapter_rows_contexts(peft_pair):
    """Three paired contexts in one queued forward: rows E, A, E, A, E, A, each its own context."""
    expert, anti = peft_pair
    check_mixed_batch(expert, anti)
    rows = adapter_rows(expert.model, "default")
    queue = ScoringQueue(model_lock(expert.model))
    jobs, refs = [], []
    for seed, length in ((1, 5), (2, 8), (3, 3)):
        ids = [(seed * 37 + i * 11) % 390 + 3 for i in range(length)]
        groups = [(length, [(4, 5), (6,)]), (length - 1, [(7,)])]
        context = CachedContext(expert.model, rows=2, forward_context=rows)
        context.tree_ok = True
        jobs.append((context, ids, groups))
        refs.append(ids)
    got = queue.score_many(jobs)
    assert queue.forwards == 1
    for (_, ids, groups), result in zip(jobs, got):
        for (anchor, _), per_group in zip(groups, result):
            for key, value in per_group.items():
                seq = ids[:anchor] + list(key)
                assert torch.allclose(value[0], full_logprobs(expert.model, seq, expert.forward_context), atol=1e-4)
                assert torch.allclose(value[1], full_logprobs(anti.model, seq, anti.forward_context), atol=1e-4)


def test_only_read_positions_are_projected(models_a):
    model = models_a[1]
    ctx = CachedContext(model)
    assert ctx.keeps_logits
    sizes = []
    original = model.lm_head.forward

    def spy(hidden):
        sizes.append(hidden.shape[1])
        return original(hidden)

    model.lm_head.forward = spy
    try:
        seq = [5, 6, 7, 8, 9, 10, 11, 12]
        groups = [(8, [(13, 14), (15,)]), (6, [(16,)])]
        got = ctx.score_groups(seq, groups)
    finally:
        del model.lm_head.forward
    # inputs: 8 context tokens, then 4 trie nodes; outputs read from index 5 (anchor 6) on
    assert sizes == [8 + 4 - 5]
    for (anchor, _), result in zip(groups, got):
        for key, value in result.items():
            assert torch.allclose(value[0], full_logprobs(model, seq[:anchor] + list(key)), atol=1e-4), (anchor, key)
    full = CachedContext(model)
    full.keeps_logits = False  # every position projected: the reference path
    for want, have in zip(full.score_groups(seq, groups), got):
        for key in want:
            assert torch.allclose(want[key], have[key], atol=1e-5)


def test_queue_projects_only_read_positions(tok_a, models_a):
    model = copy.deepcopy(models_a[1])
    queue = ScoringQueue(model_lock(model))
    cases = [([5, 6, 7, 8, 9, 10], [(6, [(3, 4)]), (4, [(5,)])]), ([20, 21, 22], [(3, [(7,), (8,)])])]
    fast = [CachedContext(model) for _ in cases]
    slow = [CachedContext(model) for _ in cases]
    for context in fast + slow:
        context.tree_ok = True
    for context in slow:
        context.keeps_logits = False
    got = queue.score_many([(c, ids, groups) for c, (ids, groups) in zip(fast, cases)])
    want = queue.score_many([(c, ids, groups) for c, (ids, groups) in zip(slow, cases)])
    for g, w in zip(got, want):
        for gg, ww in zip(g, w):
            assert set(gg) == set(ww)
            for key in ww:
                assert torch.allclose(gg[key], ww[key], atol=1e-5)


def test_prompt_prefix_is_reused_across_sessions(scorers_a, monkeypatch):
    """Whole prompt blocks (32, 64, ... tokens) are reused, and a seeded session scores exactly
    (bit for bit) what a fresh one does: what a process served before changes no answer."""
    store = PromptStore()
    monkeypatch.setattr(sessions, "PROMPTS", store)
    scorer = scorers_a[0]
    scorer.check_tree_attention()  # its probe forwards out of the way
    calls = Calls(scorer.model)
    try:
        shared = list(range(5, 45))  # 40 tokens: one whole block (32)
        first = scorer.session(shared + [50, 51])
        assert first.reused == 0
        first.distributions([50], [(3,)])
        assert calls.positions == [32, 42 - 32 + 1 + 1]  # the block, then the rest + continuation + trie
        second = scorer.session(shared + [60, 61, 62])
        assert second.reused == 32
        calls.positions.clear()
        got = second.distributions([50], [(3, 4)])
        assert calls.positions == [43 - 32 + 1 + 2]  # the prompt after the reused blocks, the continuation, the trie
        monkeypatch.setattr(sessions, "PROMPTS", PromptStore())  # a fresh process: nothing to reuse
        fresh = scorer.session(shared + [60, 61, 62])
        assert fresh.reused == 0
        want = fresh.distributions([50], [(3, 4)])
        assert set(got) == set(want) and all(torch.equal(got[key], want[key]) for key in want)
        # the stored entry is now the second prompt; an unrelated prompt reuses nothing, a short one neither
        assert scorer.session([200, 201] + shared).reused == 0
        assert scorer.session(shared[:32]).reused == 0  # no whole block before its last token
        assert scorers_a[1].session(shared).reused == 0  # another scorer, another entry
    finally:
        calls.handle.remove()


def test_same_tokenizer_path_feeds_one_position_per_call(server_a, tok_a, scorers_a, monkeypatch):
    tuner = ProxyTuner(base_url=server_a.base_url, model="tiny", expert=scorers_a[0], anti_expert=scorers_a[1],
                       top_k=20, hosted_tokenizer=tok_a, max_retries=0)
    assert tuner.same_vocab
    tuner.generate("The quick brown", max_tokens=2)  # self-checks out of the way
    monkeypatch.setattr(sessions, "PROMPTS", PromptStore())  # no cached prompt: the first call feeds it all
    calls = Calls(scorers_a[0].model)
    try:
        result = tuner.generate("There are many words", max_tokens=8, strategy="per-step")
    finally:
        calls.handle.remove()
    prompt = len(scorers_a[0].prompt_ids(prompt="There are many words"))
    assert len(calls.positions) == len(result.trace)  # one call per step for the expert
    assert calls.positions[0] == prompt and set(calls.positions[1:]) == {1}


class RecordingStore(PromptStore):
    """A prompt store that records how many tokens each seeded session reused."""

    def __init__(self):
        super().__init__()
        self.reused: list[int] = []

    def seed(self, owner, kind, context, ids):
        self.reused.append(super().seed(owner, kind, context, ids))
        return self.reused[-1]


@pytest.mark.parametrize("strategy", ["per-step", "speculative"])
def test_paired_fast_path_equals_the_exact_oracle(server_a, tok_b, models_b, tok_a, strategy, monkeypatch):
    """Cross-tokenizer (bytes aligner, tries), one peft model as the pair: the default fast path
    and the exact per-path oracle give the same text and offsets within 1e-4."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(models_b[1]), config).eval()
    expert = Scorer(model, tok_b, render="raw", adapter=True, name="Eb+lora")
    anti = Scorer(model, tok_b, render="raw", adapter=False, name="Ab")
    kw = dict(base_url=server_a.base_url, model="tiny", expert=expert, anti_expert=anti, top_k=10,
              hosted_tokenizer=tok_a, max_retries=0)
    options = dict(max_tokens=10, strategy=strategy, temperature=1.0 if strategy == "speculative" else 0.0, seed=3)
    few_shot = "Question: what is 12 + 30? Answer: 42. Question: what is 7 * 6? Answer: 42. Question: what is "
    cafe = "A café in Zürich sells crème brûlée for 12€ and naïve tea for 3.50 CHF. The quick brown fox jumps over the"
    prompts = [few_shot + "7 * 6? Answer:", few_shot + "9 - 4? Answer:", cafe + " lazy dog. She said:",
               cafe + " lazy dog. She said: bonjour"]  # each pair shares a 32-token block: the second reuses it
    store = RecordingStore()
    monkeypatch.setattr(sessions, "PROMPTS", store)
    fast = [ProxyTuner(**kw).generate(p, **options) for p in prompts]
    assert expert._mixed_ok and adapter_rows(model, "default").ok
    assert store.reused[1] >= 32 and store.reused[3] >= 32
    # the oracle: peft's own adapter toggling, two forwards per step, one forward per path, no reuse
    expert._mixed_ok, expert._tree_ok, anti._tree_ok = False, False, False
    adapter_rows(model, "default").ok = False
    slow = []
    for p in prompts:
        monkeypatch.setattr(sessions, "PROMPTS", PromptStore())
        slow.append(ProxyTuner(**kw).generate(p, **options))
    worst = 0.0
    for f, s in zip(fast, slow):
        assert f.text == s.text
        for sf, ss in zip(f.trace, s.trace):
            for cf, cs in zip(sf.candidates, ss.candidates):
                if abs(cs.delta) < 1e9:
                    worst = max(worst, abs(cf.delta - cs.delta))
    assert worst < 1e-4
