"""Greedy that reaches the tail (maths/greedy_tail.py, decoding/tail.py): known answers on
hand-built numbers, then the real pipeline over loopback HTTP against white-box greedy: with
k = 5, per-step and greedy speculative (streamed, whole, trees) write white-box greedy's text
on hosts that report logprobs before and after the bias, and a mutation that skips the probe
does not; with k = the vocabulary, and where the tail cannot be asked about, nothing changes."""

import dataclasses
import math

import pytest
import torch
from test_equivalence import white_box_greedy

from blackbox_proxy import ProxyTuner
from blackbox_proxy.apps.model_server import create_app
from blackbox_proxy.apps.openai_http import ServerThread
from blackbox_proxy.decoding import tail
from blackbox_proxy.local.runner import ModelRunner
from blackbox_proxy.maths.greedy_tail import BAN, MAX_BIAS, GreedyProbe, greedy_probe, read_probe, suspects, tail_cap

# ----- the maths, by hand ---------------------------------------------------------------------------------


def test_suspects_are_the_tail_tokens_whose_bound_beats_the_best_candidate():
    log_w = torch.tensor([5.0, 0.0, 2.0, -math.inf, 4.0, 1.0])
    # C = {0, 1}; cap = log 0.1; best score -1: bound of id 2 = -2.30 + 2 < -1? -0.30 > -1: yes
    found = suspects(torch.tensor([0, 1]), s_best=-1.0, cap=math.log(0.1), log_w=log_w)
    assert found.tolist() == [4, 2]  # id 0 is a candidate, 3 cannot be chosen, 5: -1.30 < -1; best bound first
    assert suspects(torch.tensor([0, 1]), s_best=2.0, cap=math.log(0.1), log_w=log_w).tolist() == []


def test_the_tail_cap_is_the_least_candidate_or_the_tail_mass():
    lp = torch.log(torch.tensor([0.5, 0.3, 0.15]))  # T = 0.05 < p_k = 0.15
    assert tail_cap(lp) == pytest.approx(math.log(0.05))
    lp = torch.log(torch.tensor([0.5, 0.2, 0.1]))  # p_k = 0.1 < T = 0.2
    assert tail_cap(lp) == pytest.approx(math.log(0.1))
    assert tail_cap(lp, exhaustive=False) == pytest.approx(math.log(0.2))  # a dropped entry: T alone bounds


def test_the_probe_lifts_the_best_and_the_suspects_by_log_w_and_bans_the_rest():
    log_w = torch.tensor([0.0, 1.0, 0.5, 0.0, 7.25, 3.0])
    probe = greedy_probe([0, 1, 2], 1, torch.tensor([4, 5]), log_w, cap=300)
    assert probe.best == 1 and probe.asked == (4, 5) and probe.left_out == 0
    # the largest lifted weight at +100, the others as far below it as their log w
    assert probe.bias == {0: BAN, 2: BAN, 1: MAX_BIAS - 6.25, 4: MAX_BIAS, 5: MAX_BIAS - 4.25}
    capped = greedy_probe([0, 1, 2], 1, torch.tensor([4, 5]), log_w, cap=4)  # room for one suspect
    assert capped.asked == (4,) and capped.left_out == 1 and len(capped.bias) == 4


def _report(logprobs, bias):
    """What a host that reports logprobs after the bias says: the biased distribution."""
    biased = logprobs.clone()
    for i, b in bias.items():
        biased[i] += b
    return torch.log_softmax(biased, 0)


def test_reading_the_answer_on_hosts_that_report_before_or_after_the_bias():
    lp = torch.log_softmax(torch.tensor([2.0, 1.0, 0.5, -3.0, -4.0, -2.5]), 0)
    log_w = torch.tensor([0.0, 0.0, 0.0, 0.0, 6.0, 1.0])
    probe = greedy_probe([0, 1, 2], 0, torch.tensor([4, 5]), log_w, cap=300)
    # the host's greedy pick under the biases: argmax of lp + bias = the tuned argmax among c* and the suspects
    scores = {i: float(lp[i]) + b for i, b in probe.bias.items()}
    picked = max(scores, key=scores.get)
    assert picked == 4  # -4 - log Z + 6 beats c*'s 2 - log Z
    unbiased = read_probe(probe, float(lp[0]), picked, float(lp[picked]), {i: float(lp[i]) for i in (0, 1, 2)})
    assert (unbiased.winner, unbiased.biased_report) == (4, False) and unbiased.logprob == pytest.approx(float(lp[4]))
    after = _report(lp, probe.bias)
    top = {i: float(after[i]) for i in torch.topk(after, 3).indices.tolist()}
    biased = read_probe(probe, float(lp[0]), picked, float(after[picked]), top)
    assert biased.biased_report and biased.logprob == pytest.approx(float(lp[4]), abs=1e-5)
    # the host picked c*: it is the argmax; a pick neither asked nor c*: nothing is decided
    assert read_probe(probe, float(lp[0]), 0, float(lp[0]), top).winner == 0
    assert read_probe(probe, float(lp[0]), 3, float(lp[3]), top).winner is None


# ----- the real pipeline over loopback HTTP, against white-box greedy ---------------------------------------------

PROMPTS = ["The quick brown", "A café in Zürich sells", "Question: what is 12 + 30? Answer:", "def add(a, b):"]


@pytest.fixture(scope="module", params=[False, True], ids=["unbiased reports", "reports after the bias"])
def host(request, tok_a, models_a):
    runner = ModelRunner(models_a[0], tok_a, name="tiny", logprobs_after_bias=request.param)
    with ServerThread(create_app(runner, max_top_logprobs=len(tok_a))) as server:
        yield server


def _tuner(host, tok_a, scorers_a, **kw):
    return ProxyTuner(base_url=host.base_url, model="tiny", expert=scorers_a[0], anti_expert=scorers_a[1],
                      hosted_tokenizer=tok_a, max_retries=0, **kw)


def _white(tok_a, models_a, prompt, alpha, n):
    ids = white_box_greedy(models_a, tok_a.encode(prompt), alpha, n)
    return tok_a.decode([t for t in ids if t != 0])


@pytest.mark.parametrize("how", ["per-step", "streamed", "whole", "tree"])
def test_greedy_at_k5_writes_white_box_greedy_text(host, tok_a, models_a, scorers_a, how):
    """The tiny models disagree wildly: the tuned argmax is often outside the hosted top-5, where
    greedy over the candidates alone cannot go (checked below: it differs from white-box)."""
    options = dict(strategy="speculative", drafts=3 if how == "tree" else 1) if how != "per-step" else {}
    found = calls = tokens = 0
    with _tuner(host, tok_a, scorers_a, top_k=5, stream_chunks=how == "streamed") as t:
        for prompt in PROMPTS:
            result = t.generate(prompt, max_tokens=12, alpha=1.0, **options)
            assert result.text == _white(tok_a, models_a, prompt, 1.0, 12), (prompt, how)
            found += sum("outside the top-k is the argmax" in note for step in result.trace for note in step.notes)
            found += sum("outside the top-k is the argmax" in note for c in result.chunks for note in c.notes)
            calls += result.usage.tail_calls
            tokens += result.usage.generated_tokens
            if how == "tree":
                assert result.usage.draft_sequences > result.usage.api_calls - result.usage.tail_calls
    assert found > 0 and 0 < calls <= tokens  # the tail held argmaxes; at most one probe per position


def test_skipping_the_probe_misses_white_box_greedy(host, tok_a, models_a, scorers_a, monkeypatch):
    monkeypatch.setattr(tail, "check", lambda *args, **kwargs: None)  # the mutation: never ask about the tail
    with _tuner(host, tok_a, scorers_a, top_k=5) as t:
        texts = [t.generate(prompt, max_tokens=12, alpha=1.0).text for prompt in PROMPTS]
    assert any(text != _white(tok_a, models_a, p, 1.0, 12) for text, p in zip(texts, PROMPTS))


def test_with_k_the_vocabulary_or_no_way_to_ask_nothing_is_probed(server_a, tok_a, scorers_a, scorers_b,
                                                                   monkeypatch):
    with _tuner(server_a, tok_a, scorers_a, top_k=len(tok_a)) as t:  # the tail is empty: no suspect, no call
        result = t.generate(PROMPTS[0], max_tokens=8, strategy="per-step")
        assert result.usage.tail_calls == 0 and result.usage.api_calls == len(result.trace)
        assert t.generate(PROMPTS[0], max_tokens=8, strategy="speculative").usage.tail_calls == 0
    with ProxyTuner(base_url=server_a.base_url, model="tiny", expert=scorers_b[0], anti_expert=scorers_b[1],
                    hosted_tokenizer=tok_a, top_k=5, max_retries=0) as t:  # across tokenizers: the candidates' argmax
        assert t.generate(PROMPTS[0], max_tokens=8).usage.tail_calls == 0
    with _tuner(server_a, tok_a, scorers_a, top_k=5) as t:  # a host whose logit_bias is not known to be honoured
        real = t.client.capabilities
        monkeypatch.setattr(t.client, "capabilities",
                            lambda top_k=None: dataclasses.replace(real(top_k), logit_bias_cap=0))
        assert t.generate(PROMPTS[0], max_tokens=8).usage.tail_calls == 0


def test_a_probe_answer_that_decides_nothing_keeps_the_candidates_argmax():
    probe = GreedyProbe(best=3, asked=(7,), bias={3: 100.0, 7: 95.0})
    assert read_probe(probe, -1.0, None, None, {}).winner is None


@pytest.mark.parametrize("how", ["per-step", "whole"])
def test_a_host_that_drops_logit_bias_is_said_once_counted_and_probed_no_more(tok_a, models_a, scorers_a, caplog,
                                                                               how):
    """A host that accepts ``logit_bias`` and drops it picks its own argmax, a banned candidate, in
    answer to a probe: the position keeps the candidates' argmax, probes stop for the generation,
    and the user hears of it: one warning per tuner, ``usage.untrusted_tail_calls``, the result's
    notes and ``settings["tail_off"]`` (before: only a note inside the trace)."""
    import logging

    from faults import IgnoresLogitBias

    options = dict(strategy="speculative" if how == "whole" else "per-step")
    dropping = IgnoresLogitBias(create_app(ModelRunner(models_a[0], tok_a, name="tiny"),
                                           max_top_logprobs=len(tok_a)))
    with ServerThread(dropping) as server, _tuner(server, tok_a, scorers_a, top_k=5, stream_chunks=False) as t, \
            caplog.at_level(logging.WARNING, logger="blackbox_proxy"):
        results = [t.generate(prompt, max_tokens=12, alpha=1.0, **options) for prompt in PROMPTS]
    untrusted = [r for r in results if r.usage.untrusted_tail_calls]
    assert untrusted and dropping.seen >= len(untrusted)
    for r in untrusted:
        assert r.usage.untrusted_tail_calls == 1  # (an earlier probe may have looked right) no probe after it
        assert "logit_bias" in r.settings["tail_off"] and any("tail probes stopped" in n for n in r.notes)
    warnings = [rec for rec in caplog.records if "tail probes stopped" in rec.getMessage()]
    assert len(warnings) == 1
