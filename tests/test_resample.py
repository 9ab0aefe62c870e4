"""The resample strategy: importance weights equal the exact log p~(y) − log p_L(y) (k = V), SIR
picks converge to the exact proxy-tuned sequence distribution as n grows while a weight without
log Z does measurably worse, and the strategy runs end to end in chat mode with ESS reporting."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from blackbox_proxy import ConfigurationError, ProxyTuner, Scorer
from blackbox_proxy.maths.importance import effective_sample_size, sequence_log_weight

from test_speculative import MemoSession, concentrated


def test_effective_sample_size():
    assert effective_sample_size(torch.zeros(8)) == pytest.approx(8.0)
    assert effective_sample_size(torch.tensor([0.0, -math.inf, -math.inf])) == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([0.0, math.log(3.0)])) == pytest.approx(16 / 10)


def test_weights_equal_exact_sequence_log_ratio(server_a, tok_a, models_a, scorers_a):
    """k = the whole vocabulary: Z is (nearly) exact, so each answer's log weight must be
    Σ_t log p~_t(y_t) − log p_L(y_t), computed here from the three models directly. (The API
    never reports the two non-end special tokens, whose tiny mass enters Z through the tail
    estimate: hence 1e-2, far below what dropping log Z costs.)"""
    tuner = ProxyTuner(base_url=server_a.base_url, model="tiny", expert=scorers_a[0], anti_expert=scorers_a[1],
                       top_k=len(tok_a), hosted_tokenizer=tok_a, max_retries=0)
    result = tuner.generate("The quick brown", max_tokens=3, temperature=1.0, strategy="resample", samples=6,
                            seed=2, alpha=1.5)
    assert len(result.samples) == 6 and sum(s.picked for s in result.samples) == 1
    prompt = tok_a.encode("The quick brown")
    checked = far = 0
    for sample in result.samples:
        ids = list(sample.token_ids)
        assert len(ids) == sample.tokens and None not in ids
        want, no_z = exact_log_weight(models_a, prompt, ids, 1.5)
        assert sample.log_weight == pytest.approx(want, abs=1e-2)
        far += abs(no_z - want) > 0.1
        checked += 1
    assert checked == 6 and far >= 3
    assert result.text == next(s.text for s in result.samples if s.picked)


def exact_log_weight(models, prompt, ids, alpha):
    """Σ_t log p~_t(y_t) − log p_L(y_t) over ``ids``, and the same without log Z."""
    want = no_z = 0.0
    for t, y in enumerate(ids):
        ctx = torch.tensor([prompt + ids[:t]])
        with torch.no_grad():
            lp = [torch.log_softmax(m(ctx).logits[0, -1].double(), -1) for m in models]
        tuned = torch.log_softmax(lp[0] + alpha * (lp[1] - lp[2]), 0)
        want += float(tuned[y] - lp[0][y])
        no_z += float(alpha * (lp[1][y] - lp[2][y]))
    return want, no_z


def test_weights_stop_where_the_answer_stops(tok_a):
    """The API is not sent the stop strings, so its answers run on past them; each weight must be
    that of the answer as kept: the tokens up to the one completing the stop string, no more.
    (Models concentrated on the letters a-f, stop "a": most of 8-token answers hold one.)"""
    from tiny import tiny_llama

    from blackbox_proxy.apps.model_server import create_app
    from blackbox_proxy.apps.openai_http import ServerThread
    from blackbox_proxy.local.runner import ModelRunner

    live = [tok_a.convert_tokens_to_ids(t) for t in ["a", "b", "c", "d", "e", "f"]]
    models = [concentrated(tiny_llama(tok_a, s, hidden=32), live, s) for s in (50, 51, 52)]
    prompt = tok_a.encode("The quick brown")
    with ServerThread(create_app(ModelRunner(models[0], tok_a, name="tiny"))) as server:
        tuner = ProxyTuner(base_url=server.base_url, model="tiny", expert=Scorer(models[1], tok_a, render="raw"),
                           anti_expert=Scorer(models[2], tok_a, render="raw"), top_k=20,
                           hosted_tokenizer=tok_a, max_retries=0)
        result = tuner.generate("The quick brown", max_tokens=8, temperature=1.0, strategy="resample", samples=12,
                                seed=4, alpha=1.5, stop=["a"])
    cut = 0
    for sample in result.samples:
        ids = list(sample.token_ids)
        kept = tok_a.decode(ids)
        if "a" in kept:
            assert ids[-1] == live[0] and "a" not in tok_a.decode(ids[:-1])  # scored up to the stop, no more
            cut += len(kept) < len(sample.text)  # the API's answer ran on
        else:
            assert sample.tokens == 8  # no stop: every drawn token is weighted
        assert sample.log_weight == pytest.approx(exact_log_weight(models, prompt, ids, 1.5)[0], abs=1e-2)
    assert cut >= 4
    picked = next(s for s in result.samples if s.picked)
    assert result.text == tok_a.decode(list(picked.token_ids)).split("a")[0]


@pytest.fixture(scope="module")
def two_token_world(tok_a):
    """Concentrated tiny models (mass on 6 tokens): exact per-cell log weights of every 2-token
    answer via :func:`sequence_log_weight`, the hosted joint p_L and the exact tuned joint p~."""
    from tiny import tiny_llama

    live = [tok_a.convert_tokens_to_ids(t) for t in ["a", "b", "c", "d", "e", "f"]]
    large, expert, anti = (concentrated(tiny_llama(tok_a, s, hidden=32), live, s) for s in (40, 41, 42))
    prompt = tok_a.encode("The quick brown")
    h, e, a = MemoSession(large, []), MemoSession(expert, prompt), MemoSession(anti, prompt)
    alpha = 3.0  # with these seeds Z_2 varies with the first token: dropping log Z costs ~0.1 TV
    cells, p_l, p_t, lw_right, lw_wrong = [], [], [], [], []
    first = [h.logprobs(prompt), e.logprobs(prompt), a.logprobs(prompt)]
    tuned1 = torch.log_softmax(first[0] + alpha * (first[1] - first[2]), 0)
    for i, x in enumerate(live):
        ctx = prompt + [x]
        second = [h.logprobs(ctx), e.logprobs(ctx), a.logprobs(ctx)]
        tuned2 = torch.log_softmax(second[0] + alpha * (second[1] - second[2]), 0)
        for j, y in enumerate(live):
            pos = [first, second]
            hosted = [p[0][live] for p in pos]
            small_e = [p[1][live] for p in pos]
            small_a = [p[2][live] for p in pos]
            cells.append((x, y))
            p_l.append(float(first[0][x] + second[0][y]))
            p_t.append(float(tuned1[x] + tuned2[y]))
            lw_right.append(sequence_log_weight(hosted, small_e, small_a, [i, j], alpha))
            lw_wrong.append(sequence_log_weight(hosted, small_e, small_a, [i, j], alpha, with_normaliser=False))
    p_l = torch.tensor(p_l, dtype=torch.float64).exp()
    p_t = torch.tensor(p_t, dtype=torch.float64).exp()
    return cells, p_l / p_l.sum(), p_t / p_t.sum(), torch.tensor(lw_right), torch.tensor(lw_wrong)


def sir_tv(p_l, p_t, log_w, n, runs, seed):
    """TV between the empirical distribution of SIR picks (``runs`` picks, n draws each) and p~."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(p_l.float().expand(runs, -1), n, replacement=True, generator=g)  # [runs, n]
    weights = torch.softmax(log_w[draws], dim=1)
    pick = torch.multinomial(weights.float(), 1, generator=g).squeeze(1)
    chosen = draws[torch.arange(runs), pick]
    hist = torch.bincount(chosen, minlength=len(p_t)).double() / runs
    return 0.5 * float((hist - p_t).abs().sum())


def test_sir_approaches_the_exact_sequence_distribution(two_token_world):
    _, p_l, p_t, right, wrong = two_token_world
    gap = 0.5 * float((p_l - p_t).abs().sum())
    assert gap > 0.2  # the hosted and tuned distributions really differ
    runs = 20_000
    tv = {n: sir_tv(p_l, p_t, right, n, runs, seed=n) for n in (1, 4, 16, 64)}
    assert tv[1] == pytest.approx(gap, abs=0.02)  # n = 1 is plain sampling from the hosted model
    assert tv[64] < tv[16] < tv[4] < tv[1]
    assert tv[64] < gap / 6
    wrong_tv = sir_tv(p_l, p_t, wrong, 64, runs, seed=64)
    assert wrong_tv > tv[64] + 0.04  # without log Z the picks are measurably off


def test_chat_mode_whole_answers_and_low_ess_warning(server_a, tok_a, models_a, caplog):
    chat = (Scorer(models_a[1], tok_a, render="chat", name="Ec"), Scorer(models_a[2], tok_a, render="chat", name="Ac"))
    tuner = ProxyTuner(base_url=server_a.base_url, model="tiny", expert=chat[0], anti_expert=chat[1], top_k=20,
                       hosted_tokenizer=tok_a, max_retries=0, mode="chat")
    result = tuner.generate("Tell me about a café", max_tokens=6, temperature=1.0, strategy="resample", samples=20,
                            seed=3)
    assert result.usage.api_calls == 2  # 16 + 4 choices: the per-call cap of n
    assert 1.0 <= result.ess <= 20 and len(result.samples) == 20
    assert result.usage.generated_tokens > 1  # chat mode kept the whole answer
    with caplog.at_level(logging.WARNING):
        strong = tuner.generate("Tell me about a café", max_tokens=6, temperature=1.0, strategy="resample",
                                samples=4, seed=3, alpha=8.0)
    assert strong.ess < 1.5 and any("effective sample size" in n for n in strong.notes)
    assert "more samples, shorter answers, or a smaller alpha" in caplog.text
    with pytest.raises(ConfigurationError, match="temperature 1 with top_p 1"):
        tuner.generate("Hi", max_tokens=4, strategy="resample")
    with pytest.raises(ConfigurationError, match="samples is for --strategy resample"):
        tuner.generate("Hi", max_tokens=1, samples=4)


def test_cli_and_served_resample(server_a, saved_a, tok_a, models_a):
    import json

    import openai
    from click.testing import CliRunner

    from blackbox_proxy import AsyncProxyTuner
    from blackbox_proxy.apps.cli import main
    from blackbox_proxy.apps.tuned_server import create_tuned_app
    from blackbox_proxy.apps.openai_http import ServerThread

    args = ["generate", "--base-url", server_a.base_url, "--model", "tiny", "--expert", str(saved_a["E"]),
            "--anti-expert", str(saved_a["A"]), "--mode", "chat", "--strategy", "resample", "--samples", "5",
            "--temperature", "1", "--seed", "4", "--prompt", "Tell me about a café", "--max-tokens", "5", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out["samples"]) == 5 and out["ess"] >= 1 and out["settings"]["samples"] == 5
    chat = (Scorer(models_a[1], tok_a, render="chat"), Scorer(models_a[2], tok_a, render="chat"))
    tuner = AsyncProxyTuner(base_url=server_a.base_url, model="tiny", expert=chat[0], anti_expert=chat[1], top_k=20,
                            hosted_tokenizer=tok_a, max_retries=0, mode="chat")
    library = ProxyTuner(base_url=server_a.base_url, model="tiny", expert=chat[0], anti_expert=chat[1], top_k=20,
                         hosted_tokenizer=tok_a, max_retries=0, mode="chat")
    messages = [{"role": "user", "content": "Tell me about a café"}]
    want = library.generate(messages=messages, max_tokens=5, temperature=1.0, seed=9, strategy="resample", samples=6)
    with ServerThread(create_tuned_app(tuner, name="tuned", strategy="resample")) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="-", max_retries=0)
        resp = client.chat.completions.create(model="tuned", messages=messages, max_tokens=5, seed=9,
                                              extra_body={"samples": 6})
    assert resp.choices[0].message.content == want.text
