"""The fidelity measurement: the exact speculative distribution against a slow per-draft
reference built from the strategy's own functions and against real speculative draws; and
`compare` on tiny models, where k = the whole vocabulary must give TV 0 and agreement 1."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from decoders import build
from blackbox_proxy import ProxyTuner, Scorer
from blackbox_proxy.harness.fidelity import run_same_tokenizer, write_report
from blackbox_proxy.maths import rejection
from blackbox_proxy.maths.rejection import speculative_distribution
from blackbox_proxy.types import Candidate, HostedPosition, HostedResult, HostedUsage
from blackbox_proxy.whitebox import WhiteBoxTuner


def slow_speculative(p_l, lp_e, lp_a, alpha, cand):
    """Per draft v: candidates C ∪ {v}, the strategy's own Z, acceptance and residual."""
    size = len(p_l)
    out = torch.zeros(size, dtype=torch.float64)
    for v in range(size):
        if p_l[v] == 0:
            continue
        members = list(dict.fromkeys(cand.tolist() + [v]))
        idx = torch.tensor(members)
        hosted = p_l[idx].log()
        log_w = alpha * (lp_e[idx] - lp_a[idx])
        tail, _ = rejection.tail_log_weight(lp_e[idx], lp_a[idx], alpha)
        log_z = rejection.log_normaliser(hosted, log_w, tail)
        a = rejection.accept_probability(float(alpha * (lp_e[v] - lp_a[v])), log_z)
        out[v] += p_l[v] * a
        residual = rejection.residual_distribution(hosted, log_w, log_z)
        if residual is None:
            residual = (hosted + log_w).softmax(0)
        out[idx] += p_l[v] * (1 - a) * residual
    return out


@pytest.mark.parametrize("seed, k, alpha", [(0, 3, 1.0), (1, 1, 2.0), (2, 5, 0.5), (3, 12, 1.0)])
def test_speculative_distribution_equals_the_per_draft_reference(seed, k, alpha):
    g = torch.Generator().manual_seed(seed)
    size = 12
    p_l = torch.softmax(torch.randn(size, generator=g, dtype=torch.float64) * 2, 0)
    lp_e = torch.log_softmax(torch.randn(size, generator=g, dtype=torch.float64) * 2, 0)
    lp_a = torch.log_softmax(torch.randn(size, generator=g, dtype=torch.float64) * 2, 0)
    cand = torch.argsort(p_l, descending=True)[:k]
    fast = speculative_distribution(p_l, lp_e, lp_a, alpha, cand)
    slow = slow_speculative(p_l, lp_e, lp_a, alpha, cand)
    assert float(fast.sum()) == pytest.approx(1.0, abs=1e-9)
    assert torch.allclose(fast, slow, atol=1e-10)
    if k == size:  # all candidates known: Z exact, the draw is exact proxy tuning
        assert torch.allclose(fast, torch.softmax(p_l.log() + alpha * (lp_e - lp_a), 0), atol=1e-10)


def test_computed_distribution_matches_real_speculative_draws(tok_a):
    """10,000 first tokens drawn by the real SpeculativeDecoder, with k = 3 reported candidates
    (so Z is estimated), against :func:`speculative_distribution` at that position."""
    from test_speculative import MemoSession, concentrated
    from tiny import tiny_llama

    from blackbox_proxy.decoding.speculative import SpeculativeDecoder
    from blackbox_proxy.tokens.loaders import vocabulary_from_hf

    live = [tok_a.convert_tokens_to_ids(t) for t in ["a", "b", "c", "d", "e", "f"]]
    large, expert, anti = (concentrated(tiny_llama(tok_a, s, hidden=32), live, s) for s in (20, 21, 22))
    vocab = vocabulary_from_hf(tok_a)
    prompt = tok_a.encode("The quick brown")
    hosted, e, a = MemoSession(large, []), MemoSession(expert, prompt), MemoSession(anti, prompt)
    lp_l = hosted.logprobs(prompt)
    order = torch.argsort(lp_l, descending=True)
    top = [int(t) for t in order[:3]]
    gen = torch.Generator().manual_seed(123)
    draws = []
    for i in range(10_000):
        dec = build(SpeculativeDecoder, e, a, vocab, prompt_ids=prompt, top_k=3, alpha=1.0, temperature=1.0,
                    max_tokens=1, chunk=1, seed=1000 + i)
        token = int(torch.multinomial(lp_l.exp().float(), 1, generator=gen))
        ids = list(dict.fromkeys(top + [token]))
        cands = tuple(Candidate("", vocab.token_bytes[t], float(lp_l[t]), t) for t in ids)
        sampled = next(c for c in cands if c.token_id == token)
        dec.observe([HostedResult("", (HostedPosition(cands, sampled),), "length", HostedUsage())], 0.0)
        draws.append(dec.prefix.ids[0])
    computed = speculative_distribution(lp_l.exp(), e.logprobs(prompt), a.logprobs(prompt), 1.0,
                                        torch.tensor(top))
    exact = torch.softmax(lp_l + e.logprobs(prompt) - a.logprobs(prompt), 0)
    assert 0.01 < 0.5 * float((computed - exact).abs().sum())  # Z is estimated here: not exact
    counts = Counter(draws)
    cells = [t for t in range(len(computed)) if computed[t] * len(draws) >= 5]
    observed = [counts.get(t, 0) for t in cells] + [len(draws) - sum(counts.get(t, 0) for t in cells)]
    expected = [float(computed[t]) * len(draws) for t in cells]
    expected.append(len(draws) - sum(expected))
    assert chisquare(observed, expected).pvalue > 0.01
    exact_expected = [float(exact[t]) * len(draws) for t in cells] + [0.0]
    exact_expected[-1] = len(draws) - sum(exact_expected)
    assert chisquare(observed, exact_expected).pvalue < 1e-6  # the draws follow the computed one, not p~


def test_compare_same_vocabulary_k_all_is_exact(tmp_path, server_a, tok_a, models_a, scorers_a):
    white = WhiteBoxTuner(base=Scorer(models_a[0], tok_a, render="raw"), expert=scorers_a[0], anti_expert=scorers_a[1])
    tuner = ProxyTuner(base_url=server_a.base_url, model="tiny", expert=scorers_a[0], anti_expert=scorers_a[1],
                       top_k=len(tok_a), hosted_tokenizer=tok_a, max_retries=0)
    report = run_same_tokenizer(white, tuner, ["The quick brown", "A café in Zürich", "Numbers: 1 2"], alpha=1.0,
                                max_tokens=8, progress=False)
    assert report["positions"] >= 20
    every = report["per_k"]["all"]
    # k = all: every token the API can report is a candidate (the two non-end special tokens,
    # which have no text, are not): nothing is lost beyond their tiny mass, and the argmax agrees
    assert every["top1_agreement"] == 1.0 and every["floor_tv"] < 1e-3
    assert every["per_step_tv"] == pytest.approx(every["floor_tv"], rel=1e-3)
    assert every["speculative_tv"] <= every["floor_tv"]
    for k in ("1", "2", "5", "10", "20"):
        row = report["per_k"][k]
        assert row["per_step_tv"] == pytest.approx(row["floor_tv"], rel=1e-4, abs=1e-7)  # exact offsets
        assert row["speculative_tv"] <= row["floor_tv"] + 1e-9
    assert report["per_k"]["1"]["top1_agreement"] < 1.0  # the hosted argmax is not always the tuned one
    # the aligner reads text: with the last token backed off, a candidate's probability counts the
    # canonical path of pending + candidate over all continuations of pending (an approximation,
    # not the token probability) -- small on average, visible on a few merges
    alignment = report["alignment"]
    assert alignment["candidates"] > 50 and alignment["mean_abs_prob_error"] < 2e-3
    assert alignment["p99_abs_prob_error"] < 0.02
    report.update(preset="tiny", prompts=3, description="tiny test models")
    paths = write_report(report, tmp_path / "out")
    assert {p.name for p in paths} >= {"fidelity.json", "fidelity.md", "fidelity_tv.png"}
    assert "| all |" in (tmp_path / "out" / "fidelity.md").read_text()
    assert not math.isnan(report["per_k"]["5"]["per_step_kl"])


def test_report_json_is_strict_even_with_an_infinite_kl(tmp_path):
    import json

    report = {"preset": "x", "positions": 1, "per_k": {"1": {"per_step_tv": 0.5, "per_step_kl": math.inf,
                                                              "top1_agreement": 1.0, "floor_tv": 0.5,
                                                              "per_step_tv_over_floor": 1.0, "speculative_tv": 0.4}}}
    write_report(report, tmp_path)
    loaded = json.loads((tmp_path / "fidelity.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert loaded["per_k"]["1"]["per_step_kl"] == "inf"
