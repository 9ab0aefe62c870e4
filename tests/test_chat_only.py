"""Chat-only hosts: continuation by instruction (the copy), its fallbacks, and an OpenAI-like host.

The oracle is a host that copies perfectly (``tests/copier.py``): in front of the model server,
it answers a copy request with the answer so far and then the server's real continuation. With
it, a ``chat`` generation must write exactly what the same generation writes in ``chat-prefix``
mode (a host that continues), greedy and sampled, per-step and speculative: what the decoders
add for chat-only hosts (the copy request, dropping the copied positions by bytes, walking the
rest) changes nothing else. Dropping one position too few or too many changes the text.
"""

from __future__ import annotations

import httpx
import pytest
from copier import copier_app

from blackbox_proxy import ProxyTuner
from blackbox_proxy.apps.model_server import create_app
from blackbox_proxy.apps.openai_http import ServerThread
from blackbox_proxy.decoding import instructed
from blackbox_proxy.decoding.strategies import choose
from blackbox_proxy.hosts.copying import after_copy
from blackbox_proxy.local.runner import ModelRunner
from blackbox_proxy.request import GenerationRequest
from blackbox_proxy.types import Candidate, HostCapabilities, HostedPosition, HostedResult, HostedUsage

MESSAGES = [{"role": "user", "content": "The quick brown"}]


def tuner(server, scorers, tok, **kw):
    args = dict(base_url=server.base_url, model="tiny", expert=scorers[0], anti_expert=scorers[1], max_retries=0,
                top_k=len(tok), hosted_tokenizer=tok)
    args.update(kw)
    return ProxyTuner(**args)


@pytest.fixture(scope="module")
def copier(server_a, tok_a):
    app = copier_app(server_a.base_url, tok_a)
    with ServerThread(app) as server:
        yield server, app


@pytest.mark.parametrize("strategy,temperature,seed", [
    ("auto", 0.0, None), ("per-step", 0.0, None), ("speculative", 0.0, None),
    ("auto", 1.0, 3), ("per-step", 1.0, 11), ("speculative", 1.0, 5)])
def test_a_perfect_copier_in_chat_mode_writes_what_a_continuing_host_writes(
        server_a, copier, tok_a, scorers_a, strategy, temperature, seed):
    server, app = copier
    kw = dict(messages=MESSAGES, max_tokens=12, temperature=temperature, seed=seed, strategy=strategy)
    same = dict(kw, strategy="per-step") if (strategy, temperature) == ("auto", 1.0) else kw  # chat's auto: per-step
    if strategy == "speculative" and temperature == 1.0:
        # the chunks a chat host is asked for: whole (not streamed), fixed length here, no tail probes
        kw = same = dict(kw, chunk=4, tail_calls=0)
    want = tuner(server_a, scorers_a, tok_a, mode="chat-prefix", stream_chunks=False).generate(**same)
    before = app.state.counts["copies"]
    got = tuner(server, scorers_a, tok_a, mode="chat").generate(**kw)
    assert got.text == want.text and len(want.text) > 4
    assert got.finish_reason == want.finish_reason
    if got.usage.generated_tokens > 1 and strategy != "speculative" or temperature == 0:
        assert app.state.counts["copies"] > before  # the answer went on by instruction
    assert not got.notes  # every copy was made


def test_auto_in_chat_mode_is_speculative_when_greedy_and_says_why(copier, tok_a, scorers_a):
    server, _ = copier
    r = tuner(server, scorers_a, tok_a, mode="chat").generate(messages=MESSAGES, max_tokens=12)
    assert r.settings["strategy"] == "speculative" and "continued by instruction" in r.settings["strategy_reason"]
    assert r.usage.api_calls < r.usage.generated_tokens  # chunks: fewer calls than tokens
    host = HostCapabilities(mode="chat")
    assert choose(GenerationRequest.build(prompt="x", temperature=1.0), host)[0] == "per-step"
    assert choose(GenerationRequest.build(prompt="x"), host)[0] == "speculative"


@pytest.mark.parametrize("fail_first,fallback", [(1, "sampled copies"), (3, "answer to 'continue'")])
def test_a_host_that_does_not_copy_falls_back_and_says_so(server_a, tok_a, scorers_a, fail_first, fallback):
    app = copier_app(server_a.base_url, tok_a, fail_first=fail_first, fail_sampled=fail_first > 1)
    with ServerThread(app) as server:
        r = tuner(server, scorers_a, tok_a, mode="chat").generate(messages=MESSAGES, max_tokens=8,
                                                                    strategy="per-step")
    assert r.usage.generated_tokens == 8 and r.finish_reason == "length"
    assert any(fallback in note for step in r.trace for note in step.notes)
    assert any("did not copy the answer so far" in note for note in r.notes)
    assert app.state.counts["failed"] == fail_first


def test_a_host_that_never_copies_ends_the_generation_with_its_text(server_a, tok_a, scorers_a):
    app = copier_app(server_a.base_url, tok_a, fail_first=10_000, fail_sampled=True)
    with ServerThread(app) as server:
        r = tuner(server, scorers_a, tok_a, mode="chat").generate(messages=MESSAGES, max_tokens=12)
    # the first chunk (asked plainly), then positions read by 'continue' until one more in a row needed it
    by_continue = [s for s in r.trace if any("answer to 'continue'" in note for note in s.notes)]
    assert r.finish_reason == "length" and len(by_continue) == instructed_limit() < r.usage.generated_tokens < 12
    assert any("positions in a row" in note for note in r.notes)


def instructed_limit() -> int:
    from blackbox_proxy.decoding.instructed import UNCOPIED_IN_A_ROW

    return UNCOPIED_IN_A_ROW


def test_copy_requests_raise_the_copied_tokens_only_on_greedy_draws(tok_a):
    from blackbox_proxy.decoding.prefix import HostedPrompt, Prefix

    prompt = HostedPrompt(messages=(("user", "hi"),))
    prefix = Prefix(b"ab", (5, 6, 5))
    host = HostCapabilities(mode="chat", logit_bias_cap=300)
    greedy = prompt.request(prefix, host, max_tokens=4, temperature=0.0)
    assert greedy.copy == "ab" and greedy.messages[0] == ("system", instructed.COPY_INSTRUCTION + "ab")
    assert dict(greedy.logit_bias) == {5: instructed.COPY_BIAS, 6: instructed.COPY_BIAS}
    assert greedy.max_tokens == 4 + 3 + instructed.COPY_SLACK and not greedy.assistant_prefix
    sampled = prompt.request(prefix, host, max_tokens=4, temperature=1.0, logit_bias=((9, -100.0),))
    assert sampled.logit_bias == ((9, -100.0),)
    ask = prompt.request(prefix, host, max_tokens=1, temperature=0.0, copy=False)
    assert ask.messages[-2:] == (("assistant", "ab"), ("user", instructed.CONTINUE_INSTRUCTION)) and not ask.copy
    first = prompt.request(Prefix(), host, max_tokens=4, temperature=0.0)
    assert first.messages == (("user", "hi"),) and not first.copy  # the first position needs no instruction
    capped = prompt.request(prefix, HostCapabilities(mode="chat", logit_bias_cap=1), max_tokens=4, temperature=0.0)
    assert capped.logit_bias == ()  # two ids do not fit a cap of one: no bias rather than half of one


def _position(text: str) -> HostedPosition:
    token = Candidate(text, text.encode(), -0.5)
    return HostedPosition((token,), token)


def _answer(*texts: str, finish: str = "length") -> HostedResult:
    return HostedResult("".join(texts), tuple(_position(t) for t in texts), finish, HostedUsage())


def test_the_copy_is_aligned_by_bytes():
    assert [p.sampled.text for p in after_copy(_answer("a", "bc", "d"), b"abc").positions] == ["d"]
    # tokenised otherwise than the answer so far, still a copy
    assert [p.sampled.text for p in after_copy(_answer("ab", "c", " e"), b"abc").positions] == [" e"]
    assert after_copy(_answer("Sure", "! ", "abc"), b"abc").copy_failed  # a preamble
    assert after_copy(_answer("a", "bcd"), b"abc").copy_failed  # a token across the copy's end
    assert after_copy(_answer("a", "b"), b"abc").copy_failed  # max_tokens inside the copy
    ended = after_copy(_answer("a", "bc", finish="stop"), b"abc")  # copied, then the (hidden) end
    assert not ended.copy_failed and ended.positions == () and ended.finish_reason == "stop"


@pytest.fixture(scope="module")
def openai_like(tok_a, models_a):
    runner = ModelRunner(models_a[0], tok_a, name="tiny")
    with ServerThread(create_app(runner, max_top_logprobs=20, openai_like=True)) as server:
        yield server


def test_the_openai_like_stand_in_answers_as_openai_does(openai_like):
    url = openai_like.base_url
    base = dict(model="tiny", messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=5)
    r = httpx.post(f"{url}/chat/completions", json=dict(base, continue_final_message=True))
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "Unrecognized request argument supplied: continue_final_message"
    assert httpx.post(f"{url}/chat/completions", json=dict(base, top_logprobs=21)).status_code == 400
    assert httpx.post(f"{url}/completions", json=dict(model="tiny", prompt="x")).status_code == 404
    assert httpx.get(f"{url}/models").json()["data"][0]["owned_by"] == "system"
    trailing = dict(base, messages=[*MESSAGES, {"role": "assistant", "content": "fox"}], temperature=0)
    new_turn = httpx.post(f"{url}/chat/completions", json=trailing).json()
    assert new_turn["choices"][0]["logprobs"]["content"]  # answered: a new turn, not a continuation


def test_the_client_proxy_tunes_a_multi_token_answer_from_the_openai_like_host(openai_like, tok_a, scorers_a):
    t = tuner(openai_like, scorers_a, tok_a, mode="chat", dialect="openai", top_k=None)
    r = t.generate(messages=MESSAGES, max_tokens=10)
    assert r.usage.generated_tokens > 1 and r.settings["strategy"] == "speculative"
    sampled = t.generate(messages=MESSAGES, max_tokens=6, temperature=1.0, seed=1)
    assert sampled.usage.generated_tokens > 1 and sampled.settings["strategy"] == "per-step"


def test_generate_with_no_strategy_flag_gives_a_multi_token_answer_from_a_chat_only_host(openai_like, saved_a,
                                                                                        caplog):
    import json
    import logging

    from click.testing import CliRunner

    from blackbox_proxy.apps.cli import main

    args = ["generate", "--base-url", openai_like.base_url, "--model", "tiny", "--mode", "chat", "--dialect", "openai",
            "--expert", str(saved_a["E"]), "--anti-expert", str(saved_a["A"]), "--hosted-tokenizer", str(saved_a["L"]),
            "--prompt", "The quick brown", "--max-tokens", "8", "--json", "-v"]
    with caplog.at_level(logging.INFO, logger="blackbox_proxy"):
        out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["usage"]["generated_tokens"] > 1 and data["settings"]["strategy"] == "speculative"
    assert "strategy speculative: the host cannot continue a partial answer: continued by instruction" in caplog.text


def test_serve_gives_a_multi_token_answer_from_a_chat_only_host(openai_like, tok_a, scorers_a):
    import openai

    from blackbox_proxy import AsyncProxyTuner
    from blackbox_proxy.apps.tuned_server import create_tuned_app

    tuner = AsyncProxyTuner(base_url=openai_like.base_url, model="tiny", expert=scorers_a[0],
                            anti_expert=scorers_a[1], mode="chat", dialect="openai", hosted_tokenizer=tok_a,
                            max_retries=0)
    with ServerThread(create_tuned_app(tuner, name="tiny-tuned")) as served:
        client = openai.OpenAI(base_url=served.base_url, api_key="unused")
        answer = client.chat.completions.create(model="tiny-tuned", messages=MESSAGES, max_tokens=6, temperature=0)
    assert answer.usage.completion_tokens > 1 and answer.choices[0].message.content
