"""The speculative decoder with tail probes: what it asks, what it falls back to, what it counts,
and a statistical test of 10,000 draws with k = 3 against exact proxy tuning (where today's
candidates-only rule is rejected), plus a run over loopback HTTP against the project's server."""

import dataclasses

import pytest
import torch

from decoders import build
from blackbox_proxy import ProxyTuner
from blackbox_proxy.decoding.speculative import SpeculativeDecoder
from blackbox_proxy.types import Candidate, HostedPosition, HostedResult, HostedUsage
from test_speculative import MemoSession, chi2_pvalue, concentrated, exact_joint


class FakeHost:
    """The hosted model in-process, answering requests as this project's server does: ``n``
    choices drawn at temperature 1 (argmax at 0) with ``logit_bias`` on the draw only, top-k and
    the drawn token's own logprob. ``biased_logprobs`` / ``ignore_bias`` imitate broken hosts."""

    def __init__(self, session, vocab, seed, *, biased_logprobs=False, ignore_bias=False, max_n=16):
        self.session, self.vocab = session, vocab
        self.gen = torch.Generator().manual_seed(seed)
        self.biased_logprobs, self.ignore_bias, self.max_n = biased_logprobs, ignore_bias, max_n
        self.requests = []

    def candidate(self, lp, t):
        if t in self.vocab.end_ids:
            return Candidate("<end>", b"", float(lp[t]), t, True)
        data = self.vocab.token_bytes[t]
        return Candidate(data.decode("utf-8", "replace"), data, float(lp[t]), t) if data else None

    def __call__(self, request):
        self.requests.append(request)
        assert request.n <= self.max_n
        out = []
        for _ in range(request.n):
            ids, positions = list(request.prompt), []
            for _ in range(request.max_tokens):
                lp = self.session.logprobs(ids)
                biased = lp.clone()
                for i, b in (() if self.ignore_bias else request.logit_bias):
                    biased[i] += b
                token = int(torch.argmax(biased)) if request.temperature == 0 else int(
                    torch.multinomial(torch.softmax(biased, 0).float(), 1, generator=self.gen))
                shown = torch.log_softmax(biased, 0) if self.biased_logprobs else lp
                top = torch.topk(shown, request.top_k).indices.tolist() if request.top_k else []
                cands = [c for c in (self.candidate(shown, t) for t in dict.fromkeys(top + [token])) if c]
                sampled = self.candidate(shown, token)
                positions.append(HostedPosition(tuple(sorted(cands, key=lambda c: -c.logprob)), sampled))
                if sampled is None or sampled.is_end:
                    break
                ids.append(token)
            out.append(HostedResult("", tuple(positions), "length", HostedUsage(len(request.prompt), 1)))
        return out


@pytest.fixture(scope="module")
def setup(tok_a):
    from tiny import tiny_llama

    from blackbox_proxy.tokens.loaders import vocabulary_from_hf

    live = [tok_a.convert_tokens_to_ids(t) for t in ["a", "b", "c", "d", "e", "f"]]
    large, expert, anti = (concentrated(tiny_llama(tok_a, s, hidden=32), live, s) for s in (10, 11, 12))
    prompt = tok_a.encode("The quick brown")
    sessions = MemoSession(large, []), MemoSession(expert, prompt), MemoSession(anti, prompt)
    return vocabulary_from_hf(tok_a), prompt, sessions, live


def decoder(setup, seed, *, cap=300, tail_calls=1, tail_draws=16, max_tokens=2, chunk=2, max_choices=16):
    vocab, prompt, (_, e, a), _ = setup
    return build(SpeculativeDecoder, e, a, vocab, prompt_ids=prompt, top_k=3, logit_bias_cap=cap,
                 max_choices=max_choices, tail_draws=tail_draws, alpha=1.0, temperature=1.0, max_tokens=max_tokens,
                 chunk=chunk, seed=seed, tail_calls=tail_calls)


def run(dec, host):
    while not dec.done:
        dec.observe(host(dec.request()), 0.0)
    return dec


def test_probe_requests_ban_the_candidates_tilt_the_tail_and_are_counted(setup):
    vocab, prompt, (hosted, _, _), live = setup
    probes = 0
    for seed in range(40):
        host = FakeHost(hosted, vocab, seed)
        dec = run(decoder(setup, seed, max_tokens=4, chunk=4), host)
        asked = [r for r in host.requests if r.logit_bias]
        for r in asked:
            bias = dict(r.logit_bias)
            top3 = torch.topk(hosted.logprobs(list(r.prompt)), 3).indices.tolist()
            assert (r.max_tokens, r.n, r.top_k, r.temperature, r.top_p) == (1, 16, 1, 1.0, 1.0)
            assert all(bias[t] == -100.0 for t in top3) and len(bias) <= 300
            assert any(b > -100.0 for b in bias.values())  # a tilt on the expert's tail
        probes += len(asked)
        usage = dec.result().usage
        assert usage.tail_calls == len(asked) == sum(c.tail_calls for c in dec.chunks)
        assert usage.api_calls == len(host.requests)
        assert all(len(c.accept_probs) == c.accepted + (c.rejected_at is not None) for c in dec.chunks)
    assert probes > 5  # k = 3 leaves half the live tokens in the tail: rejections ask probes
    # the candidates-only rule asks none: tail_calls = 0, a host without logit_bias, or one whose
    # logit_bias cannot ban all the candidates (k = 3 > 2 entries)
    for kw in (dict(tail_calls=0), dict(cap=0), dict(cap=2)):
        host = FakeHost(hosted, vocab, 0)
        dec = run(decoder(setup, 0, max_tokens=4, chunk=4, **kw), host)
        assert not any(r.logit_bias for r in host.requests) and dec.result().usage.tail_calls == 0


@pytest.mark.parametrize("broken", ["ignore_bias", "biased_logprobs"])
def test_a_host_that_breaks_the_probe_turns_probes_off(setup, broken):
    """A banned token drawn (logit_bias ignored) or a top-1 logprob that is not the chunk's
    (logprobs after the bias): the position falls back to the candidates-only rule, and the
    generation asks no more probes."""
    vocab, prompt, (hosted, _, _), _ = setup
    for seed in range(30):
        host = FakeHost(hosted, vocab, seed, **{broken: True})
        dec = run(decoder(setup, seed, max_tokens=6, chunk=3), host)
        if dec.tail_off is not None:
            break
    assert dec.tail_off is not None and ("banned" if broken == "ignore_bias" else "biased") in dec.tail_off
    assert sum(bool(r.logit_bias) for r in host.requests) == 1  # one probe, then none
    assert any("tail probes stopped" in n for c in dec.chunks for n in c.notes)
    result = dec.result()
    assert result.usage.untrusted_tail_calls == 1 and result.settings["tail_off"] == dec.tail_off and result.notes


def test_hosts_that_cap_choices_get_several_calls_within_the_budget(setup):
    vocab, prompt, (hosted, _, _), _ = setup
    seen = set()
    for seed in range(30):
        for budget in (1, 3):
            host = FakeHost(hosted, vocab, seed, max_n=4)
            run(decoder(setup, seed, max_tokens=3, chunk=3, tail_calls=budget, max_choices=4), host)
            probes = [r for r in host.requests if r.logit_bias]
            assert all(r.n == 4 for r in probes)
            per_position = {}
            for r in probes:
                per_position[r.prompt] = per_position.get(r.prompt, 0) + 1
            assert all(v <= budget for v in per_position.values())
            seen |= set(per_position.values())
    assert 3 in seen  # 16 draws asked, 4 per call: the budget of 3 calls is used up


def test_the_lazy_probe_is_skipped_when_the_bounds_decide(setup):
    """A draft whose acceptance every admissible Z agrees on is kept without a call, and such
    positions exist here (most accepted drafts), while every rejection paid one probe."""
    vocab, prompt, (hosted, _, _), _ = setup
    kept_free = rejections = 0
    for seed in range(40):
        host = FakeHost(hosted, vocab, seed)
        dec = run(decoder(setup, seed, max_tokens=4, chunk=4), host)
        for c in dec.chunks:
            kept_free += sum("without a probe" in how for how in c.tail)
            if c.rejected_at is not None:
                rejections += 1
                assert c.tail[c.rejected_at].startswith("probe:")
    assert kept_free > 0 and rejections > 0


# ----- statistical test: draws vs exact proxy tuning, k = 3 ---------------------------------------


def draws(setup, n, **kw):
    vocab, prompt, (hosted, _, _), _ = setup
    host = FakeHost(hosted, vocab, 12345)
    out, calls, tokens = [], 0, 0
    for i in range(n):
        dec = run(decoder(setup, 1 + i, **kw), host)
        out.append(tuple(list(dec.prefix.ids)[:2]))
        calls += dec.usage.tail_calls
        tokens += dec.usage.generated_tokens
    return out, calls / tokens


@pytest.mark.slow
def test_probed_draws_match_exact_proxy_tuning_where_the_candidates_only_rule_fails(setup):
    vocab, prompt, sessions, live = setup
    table = exact_joint(sessions, prompt, live)
    assert sum(table.values()) > 0.999
    firsts, per_token = draws(setup, 10_000)
    p_new = chi2_pvalue(firsts, table)
    print(f"tail probes, k = 3: chi-square p = {p_new:.3f}, {per_token:.3f} probe calls per token")
    assert p_new > 0.01
    # mutation: today's rule (residual over the 3 candidates only, Z from the small models' tail)
    old, per_token_old = draws(setup, 10_000, tail_calls=0)
    p_old = chi2_pvalue(old, table)
    print(f"candidates-only rule, k = 3: chi-square p = {p_old:.2g}")
    assert p_old < 1e-6 and per_token_old == 0


# ----- over loopback HTTP, against this project's server ------------------------------------------


def test_probes_over_http_against_the_projects_server(server_a, tok_a, scorers_a):
    """The real client, parser and server: the server's dialect says logit_bias is honoured (cap
    300), probes with n = 16 choices and top_k = 1 are accepted, never return a banned token, and
    their top-1 logprob is the chunk's; the probe calls show in usage and in the chunk traces."""
    tuner = ProxyTuner(base_url=server_a.base_url, model="tiny", expert=scorers_a[0], anti_expert=scorers_a[1],
                       top_k=3, hosted_tokenizer=tok_a, max_retries=0)
    tuner.client.check()
    assert tuner.client.logit_bias_cap == 300 and tuner.client.max_choices == 16
    calls = 0
    for seed in range(6):
        dec = tuner.decoder("The quick brown", max_tokens=12, temperature=1.0, seed=seed, strategy="speculative")
        assert (dec.host.logit_bias_cap, dec.host.max_choices) == (300, 16)
        try:
            while not dec.done:
                dec.observe(tuner.client.complete(dec.request()), 0.0)
        finally:
            dec.scoring.close()
        result = dec.result()
        assert dec.tail_off is None and result.usage.tail_calls == sum(c.tail_calls for c in result.chunks)
        assert result.usage.generated_tokens > 0
        calls += result.usage.tail_calls
    assert calls > 0


def test_the_client_says_which_hosts_honour_logit_bias_and_enforces_the_cap():
    from blackbox_proxy import ConfigurationError
    from blackbox_proxy.hosts.client import HostedClient
    from blackbox_proxy.types import HostedRequest

    caps = {}
    for dialect in ("openai", "vllm", "llama.cpp", "deepseek", "mistral"):
        client = HostedClient(base_url="http://127.0.0.1:9/v1", model="m", dialect=dialect, mode="completions")
        caps[dialect] = client.logit_bias_cap
    # logit_bias known to bias the draw only: OpenAI (300 entries), vLLM and this project's server;
    # the others keep the candidates-only rule
    assert caps == {"openai": 300, "vllm": 300, "llama.cpp": 0, "deepseek": 0, "mistral": 0}
    assert HostedClient(base_url="http://127.0.0.1:9/v1", model="m").logit_bias_cap == 0  # host not known yet
    client = HostedClient(base_url="http://127.0.0.1:9/v1", model="m", dialect="openai")
    ask = HostedRequest(mode="completions", prompt=(1, 2), max_tokens=1, top_k=1, n=16,
                        logit_bias=tuple((i, -100.0) for i in range(300)))
    _, kwargs = client.build(ask)
    assert len(kwargs["logit_bias"]) == 300 and kwargs["n"] == 16 and kwargs["logprobs"] == 1
    with pytest.raises(ConfigurationError, match="at most 300 logit_bias entries; 301"):
        client.build(dataclasses.replace(ask, logit_bias=ask.logit_bias + ((300, -100.0),)))
