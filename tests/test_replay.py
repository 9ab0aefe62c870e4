"""The record-and-replay host (harness/replay.py): recorded answers come back byte for byte, a
tuned generation through the replay equals the one through the real server, the latency model
is honoured (lower bounds only), streamed replays carry the recorded tokens and logprobs, and a
request that was never recorded is a clear 400. Real HTTP on loopback, tiny models."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from blackbox_proxy import ProxyTuner
from blackbox_proxy.errors import ConfigurationError, HostedBadRequestError
from blackbox_proxy.harness.replay import MISS_CODE, Answer, LatencyModel, Recording, ReplayHost, stream_events

SLACK = 0.002  # the event loop may wake a sleeper up to its clock resolution early


def _root(base_url: str) -> str:
    return base_url[: -len("/v1")]


def _completion(**kw):
    body = {"model": "tiny", "prompt": "The quick brown", "max_tokens": 8, "temperature": 0, "logprobs": 5}
    body.update(kw)
    return body


def _chat(**kw):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6,
            "temperature": 0, "logprobs": True, "top_logprobs": 3}
    body.update(kw)
    return body


def _tuner(base_url, scorers, tok, **kw):
    return ProxyTuner(base_url=base_url, model="tiny", expert=scorers[0], anti_expert=scorers[1],
                      hosted_tokenizer=tok, top_k=10, max_retries=0, **kw)


@pytest.fixture()
def recorded(server_a, tmp_path):
    """A recording of a completions, a chat and a /v1/models answer, and the bytes each gave."""
    path = tmp_path / "answers.jsonl"
    with ReplayHost(path, upstream=server_a.base_url) as host, httpx.Client(base_url=_root(host.base_url)) as http:
        got = {"completions": http.post("/v1/completions", json=_completion()).content,
               "chat": http.post("/v1/chat/completions", json=_chat()).content,
               "models": http.get("/v1/models").content}
        assert host.stats.recorded == 3 and host.stats.replayed == 0
    return path, got


def test_replay_returns_the_recorded_bytes(recorded):
    path, got = recorded
    assert len(path.read_text().splitlines()) == 3
    with ReplayHost(path) as host, httpx.Client(base_url=_root(host.base_url)) as http:
        assert http.post("/v1/completions", json=_completion()).content == got["completions"]
        # the key is the canonical body: key order and the streaming fields do not matter
        shuffled = dict(reversed(list(_completion(stream=False).items())))
        assert http.post("/v1/completions", content=json.dumps(shuffled)).content == got["completions"]
        assert http.post("/v1/chat/completions", json=_chat()).content == got["chat"]
        assert http.get("/v1/models").content == got["models"]
        assert host.stats.replayed == 4 and not host.stats.missed
    assert json.loads(got["completions"])["choices"][0]["logprobs"]["top_logprobs"]


@pytest.mark.parametrize("streamed", [False, True])
def test_tuned_generation_through_the_replay_equals_the_real_server(server_a, scorers_a, tok_a, tmp_path, streamed):
    """Same texts, calls and bills. Streamed speculative chunks: the project's server sends a
    chunk in one event and the replay one token per event, closed at the first rejection, so the
    replay bills at most the real server's completion tokens (how many depends on timing)."""
    runs = [dict(max_tokens=10), dict(max_tokens=10, strategy="speculative"),
            dict(max_tokens=10, strategy="speculative", temperature=1.0, seed=3)]

    def generate_all(base_url):
        with _tuner(base_url, scorers_a, tok_a, stream_chunks=streamed) as tuner:
            return [tuner.generate("The quick brown", **kw) for kw in runs]

    real = generate_all(server_a.base_url)
    path = tmp_path / "answers.jsonl"
    with ReplayHost(path, upstream=server_a.base_url) as host:
        recording = generate_all(host.base_url)
        assert host.stats.recorded > 0
    with ReplayHost(path, latency=LatencyModel(ttft=0.01, per_token=0.001)) as host:
        replayed = generate_all(host.base_url)
        assert not host.stats.missed
    for a, b, c in zip(real, recording, replayed):
        assert a.text == b.text == c.text
        for u in (b.usage, c.usage):
            assert (u.api_calls, u.prompt_tokens, u.generated_tokens) == (
                a.usage.api_calls, a.usage.prompt_tokens, a.usage.generated_tokens)
            if streamed:
                assert u.generated_tokens <= u.completion_tokens <= a.usage.completion_tokens
            else:
                assert u.completion_tokens == a.usage.completion_tokens


def test_the_latency_model_is_honoured(recorded, server_a, scorers_a, tok_a, tmp_path):
    path, got = recorded
    tokens = len(json.loads(got["completions"])["choices"][0]["logprobs"]["tokens"])
    model = LatencyModel(ttft=0.2, per_token=0.02, jitter=0.0)
    with ReplayHost(path, latency=model) as host, httpx.Client(base_url=_root(host.base_url)) as http:
        started = time.monotonic()
        assert http.post("/v1/completions", json=_completion()).status_code == 200
        assert time.monotonic() - started >= 0.2 + 0.02 * (tokens - 1) - SLACK
    # through the tuner: every call waits at least the ttft, whatever the jitter draws
    with ReplayHost(tmp_path / "tuner.jsonl", upstream=server_a.base_url) as host:
        with _tuner(host.base_url, scorers_a, tok_a) as tuner:
            tuner.generate("The quick brown", max_tokens=4)
    with ReplayHost(tmp_path / "tuner.jsonl", latency=LatencyModel(ttft=0.2, per_token=0.0, jitter=0.5)) as host:
        with _tuner(host.base_url, scorers_a, tok_a) as tuner:
            usage = tuner.generate("The quick brown", max_tokens=4).usage
    assert usage.api_calls >= 4
    assert usage.api_seconds >= usage.api_calls * 0.2 * (1 - 0.5) - SLACK


def _events(http, route, body):
    """(seconds to each data line, the data lines) of a streamed answer."""
    started, times, lines = time.monotonic(), [], []
    with http.stream("POST", route, json=body) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line:
                times.append(time.monotonic() - started)
                lines.append(line)
    return times, lines


def test_sse_replay_carries_the_recorded_tokens_and_logprobs(recorded):
    path, got = recorded
    completion, chat = json.loads(got["completions"]), json.loads(got["chat"])
    model = LatencyModel(ttft=0.2, per_token=0.01, jitter=0.0)
    with ReplayHost(path, latency=model) as host, httpx.Client(base_url=_root(host.base_url)) as http:
        times, lines = _events(http, "/v1/completions", _completion(stream=True, stream_options={"include_usage": True}))
        assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert chunks[-1]["usage"] == completion["usage"] and chunks[-1]["choices"] == []
        parts = [c["choices"][0] for c in chunks[:-1]]
        want = completion["choices"][0]
        assert len(parts) == len(want["logprobs"]["tokens"])  # one token per chunk
        assert "".join(p["text"] for p in parts) == want["text"]
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert sum((p["logprobs"][name] for p in parts), []) == want["logprobs"][name]
        assert parts[-1]["finish_reason"] == want["finish_reason"] and parts[0]["finish_reason"] is None
        assert times[0] >= 0.2 - SLACK and times[-1] >= 0.2 + 0.01 * (len(parts) - 1) - SLACK

        _, lines = _events(http, "/v1/chat/completions", _chat(stream=True))
        assert lines[-1] == "data: [DONE]"
        parts = [json.loads(line[6:])["choices"][0] for line in lines[:-1]]
        want = chat["choices"][0]
        assert parts[0]["delta"]["role"] == "assistant" and parts[-1]["finish_reason"] == want["finish_reason"]
        assert "".join(p["delta"].get("content") or "" for p in parts) == want["message"]["content"]
        assert [e for p in parts if p["logprobs"] for e in p["logprobs"]["content"]] == want["logprobs"]["content"]

        # an OpenAI client reads it as a stream
        sdk = openai.OpenAI(base_url=host.base_url, api_key="no-key", max_retries=0)
        text = "".join(c.choices[0].text for c in sdk.completions.create(**_completion(), stream=True) if c.choices)
        sdk.close()
        assert text == completion["choices"][0]["text"]


def test_stream_events_join_to_the_answer_even_when_a_stop_cut_the_text():
    answer = {"id": "c", "choices": [{"index": 0, "text": "ab", "finish_reason": "stop", "logprobs": {
        "tokens": ["a", "bc"], "token_logprobs": [-0.1, -0.2], "top_logprobs": [{"a": -0.1}, {"bc": -0.2}],
        "text_offset": [5, 6]}}]}
    events = stream_events("/v1/completions", answer)
    assert [position for position, _ in events] == [0, 1, 1]
    texts = [json.loads(e[6:])["choices"][0]["text"] for _, e in events[:-1]]
    assert texts == ["a", "b"]


def test_a_miss_is_a_clear_400(tmp_path, scorers_a, tok_a):
    with ReplayHost(tmp_path / "empty.jsonl", miss_hint="run it again with --record") as host:
        reply = httpx.post(host.base_url + "/completions", json=_completion())
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["code"] == MISS_CODE
        assert "not in the recording" in error["message"] and "POST /v1/completions" in error["message"]
        assert "--record" in error["message"]
        with pytest.raises(HostedBadRequestError, match="not in the recording.*--record"):
            _tuner(host.base_url, scorers_a, tok_a).generate("The quick brown", max_tokens=2)
        assert host.stats.missed


def test_a_torn_last_line_is_dropped_and_a_bad_line_refused(recorded, tmp_path):
    path, got = recorded
    torn = tmp_path / "torn.jsonl"
    torn.write_text(path.read_text() + '{"method": "POST", "torn')
    assert len(Recording(torn)) == 3
    Recording(torn).add("GET", "/v1/extra", None, Answer(200, "application/json", "{}"))
    assert len(Recording(torn)) == 4 and '"torn' not in torn.read_text()  # the torn line was cut, then appended
    bad = tmp_path / "bad.jsonl"
    lines = path.read_text().splitlines()
    bad.write_text("\n".join([lines[0], "not json", lines[1]]) + "\n")
    with pytest.raises(ConfigurationError, match="line 2 is not a recorded answer"):
        Recording(bad)
    with pytest.raises(ConfigurationError, match="jitter"):
        LatencyModel(jitter=1.5)
