"""White-box proxy tuning: batched, KV-cached, left-padded generation equals a slow reference
(full forwards, one prompt at a time); padding rows of a model's output layer are cut; different
tokenizers are refused; and black-box per-step with k = the whole vocabulary equals it."""

from __future__ import annotations

import copy

import pytest
import torch

from blackbox_proxy import ProxyTuner, Scorer, TokenizerMismatchError
from blackbox_proxy.whitebox import WhiteBoxTuner

PROMPTS = ["The quick brown", "A café in Zürich sells crème", "Numbers: 1 2 3", "def add(a, b):\n    return"]


def reference(models, tok, prompt, *, alpha, max_tokens):
    """Greedy white-box proxy tuning, the obvious way: full forwards, no cache, no batching."""
    n = len(tok)
    ids = tok.encode(prompt)
    out = []
    for _ in range(max_tokens):
        with torch.no_grad():
            lp = [torch.log_softmax(m(torch.tensor([ids + out])).logits[0, -1, :n].double(), -1) for m in models]
        token = int(torch.argmax(lp[0] + alpha * (lp[1] - lp[2])))
        if token == tok.eos_token_id:
            break
        out.append(token)
    return out


def scorers(models, tok):
    return [Scorer(m, tok, render="raw", name=name) for m, name in zip(models, "LEA")]


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_batched_generation_equals_the_slow_reference(tok_a, models_a, alpha):
    base, expert, anti = scorers(models_a, tok_a)
    tuner = WhiteBoxTuner(base=base, expert=expert, anti_expert=anti)
    results = tuner.generate(PROMPTS, max_tokens=10, alpha=alpha)
    for prompt, result in zip(PROMPTS, results):
        want = reference(models_a, tok_a, prompt, alpha=alpha, max_tokens=10)
        assert result.text == tok_a.decode(want), prompt
        assert result.usage.generated_tokens == len(want)


def test_sampling_rows_do_not_depend_on_their_batch(tok_a, models_a):
    tuner = WhiteBoxTuner(**dict(zip(("base", "expert", "anti_expert"), scorers(models_a, tok_a))))
    together = tuner.generate(PROMPTS, max_tokens=8, temperature=1.0, seed=11)
    alone = [tuner.generate(p, max_tokens=8, temperature=1.0, seed=11)[0] for p in PROMPTS]
    assert [r.text for r in together] == [r.text for r in alone]
    assert len({r.text for r in tuner.generate([PROMPTS[0]] * 4, max_tokens=8, temperature=1.0)}) > 1


def test_padding_rows_are_cut(tok_a, models_a):
    padded = copy.deepcopy(models_a[0])
    padded.resize_token_embeddings(len(tok_a) + 24)
    with torch.no_grad():
        padded.lm_head.weight[len(tok_a):] = 5.0  # padding rows that would take mass if not cut
    models = (padded, models_a[1], models_a[2])
    tuner = WhiteBoxTuner(**dict(zip(("base", "expert", "anti_expert"), scorers(models, tok_a))))
    [result] = tuner.generate(PROMPTS[0], max_tokens=8)
    assert result.text == tok_a.decode(reference(models, tok_a, PROMPTS[0], alpha=1.0, max_tokens=8))


def test_different_tokenizers_are_refused(tok_a, tok_b, models_a, models_b):
    with pytest.raises(TokenizerMismatchError) as info:
        WhiteBoxTuner(base=Scorer(models_a[0], tok_a, render="raw"), expert=Scorer(models_b[0], tok_b, render="raw"),
                      anti_expert=Scorer(models_b[1], tok_b, render="raw"))
    assert "--strategy per-step or speculative" in str(info.value)


def test_black_box_with_the_whole_vocabulary_equals_white_box(server_a, tok_a, models_a, scorers_a):
    white = WhiteBoxTuner(base=Scorer(models_a[0], tok_a, render="raw"), expert=scorers_a[0], anti_expert=scorers_a[1])
    black = ProxyTuner(base_url=server_a.base_url, model="tiny", expert=scorers_a[0], anti_expert=scorers_a[1],
                       top_k=len(tok_a), hosted_tokenizer=tok_a, max_retries=0)
    for prompt, w in zip(PROMPTS, white.generate(PROMPTS, max_tokens=10)):
        assert black.generate(prompt, max_tokens=10).text == w.text


def test_cli_white_box(saved_a, tok_a):
    from click.testing import CliRunner

    from blackbox_proxy.apps.cli import main

    args = ["generate", "--strategy", "white-box", "--base", str(saved_a["L"]), "--expert", str(saved_a["E"]),
            "--anti-expert", str(saved_a["A"]), "--expert-render", "raw", "--anti-expert-render", "raw",
            "--prompt", "The quick brown", "--max-tokens", "8", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    import json

    got = json.loads(result.stdout)
    want = WhiteBoxTuner(base=str(saved_a["L"]), expert=str(saved_a["E"]), anti_expert=str(saved_a["A"]),
                         expert_render="raw", anti_expert_render="raw").generate("The quick brown", max_tokens=8)[0]
    assert got["text"] == want.text and got["settings"]["strategy"] == "white-box"
    missing = CliRunner().invoke(main, args[:3] + args[5:])
    assert missing.exit_code == 1 and "pass --base MODEL" in missing.output
