"""The project's model server over real HTTP on 127.0.0.1, with the openai SDK and httpx."""

import json
import math

import httpx
import openai
import pytest
import torch

from blackbox_proxy.apps.model_server import create_app
from blackbox_proxy.apps.openai_http import ServerThread
from blackbox_proxy.local.runner import ModelRunner


@pytest.fixture(scope="module")
def sdk(server_a):
    client = openai.OpenAI(base_url=server_a.base_url, api_key="test", max_retries=0)
    yield client
    client.close()


def true_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)


def test_models_endpoint(sdk):
    models = sdk.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].owned_by == "blackbox-proxy"


def test_completions_logprobs_shape_and_values(sdk, tok_a, models_a):
    prompt = "The quick brown"
    resp = sdk.completions.create(model="tiny", prompt=prompt, max_tokens=3, logprobs=5, temperature=0)
    choice = resp.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert all(len(top) == 5 for top in lp.top_logprobs)
    truth = true_logprobs(models_a[0], tok_a.encode(prompt))
    top_values = sorted(lp.top_logprobs[0].values(), reverse=True)
    assert top_values == pytest.approx(torch.topk(truth, 5).values.tolist(), abs=1e-4)
    # greedy: the sampled token is the top-1 and its logprob is reported
    assert lp.token_logprobs[0] == pytest.approx(top_values[0], abs=1e-6)
    assert resp.usage.prompt_tokens == len(tok_a.encode(prompt)) and resp.usage.completion_tokens == 3


def test_chat_logprobs_have_bytes(sdk):
    resp = sdk.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True, top_logprobs=3,
        temperature=0,
    )
    content = resp.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 3 for c in content)
    for entry in content:
        for top in entry.top_logprobs:
            assert top.bytes is None or isinstance(top.bytes, list)
    text_bytes = b"".join(bytes(c.bytes or []) for c in content)
    assert text_bytes.decode("utf-8", "replace") == resp.choices[0].message.content or resp.choices[0].finish_reason == "stop"


def test_token_id_prompt_equals_text_prompt(sdk, tok_a):
    a = sdk.completions.create(model="tiny", prompt="A café in", max_tokens=5, temperature=0, logprobs=2)
    b = sdk.completions.create(model="tiny", prompt=tok_a.encode("A café in"), max_tokens=5, temperature=0, logprobs=2)
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].logprobs.token_logprobs == pytest.approx(b.choices[0].logprobs.token_logprobs, abs=1e-5)


def test_seed_temperature_and_stop(sdk):
    kw = dict(model="tiny", prompt="The quick brown", max_tokens=12, temperature=1.0)
    first = sdk.completions.create(seed=7, **kw).choices[0].text
    assert sdk.completions.create(seed=7, **kw).choices[0].text == first
    others = {sdk.completions.create(seed=s, **kw).choices[0].text for s in range(8, 14)}
    assert len(others | {first}) > 1
    greedy = sdk.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, temperature=0).choices[0].text
    stop = greedy[3:5]
    stopped = sdk.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == greedy[: greedy.find(stop)]


def test_n_choices(sdk):
    resp = sdk.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=1.0, n=3, seed=1)
    assert [c.index for c in resp.choices] == [0, 1, 2]


def test_continue_final_message(server_a, tok_a, models_a):
    prefix = "The quick"
    resp = httpx.post(f"{server_a.base_url}/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "Go"}, {"role": "assistant", "content": prefix}],
        "continue_final_message": True, "add_generation_prompt": False, "max_tokens": 1, "temperature": 0,
        "logprobs": True, "top_logprobs": 1,
    })
    assert resp.status_code == 200, resp.text
    rendered = "<|im_start|>user\nGo<|im_end|>\n<|im_start|>assistant\n" + prefix
    truth = true_logprobs(models_a[0], tok_a.encode(rendered))
    top = resp.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]
    assert top["logprob"] == pytest.approx(float(truth.max()), abs=1e-4)


@pytest.mark.parametrize(
    "path, body, status, fragment",
    [
        ("completions", {"model": "nope", "prompt": "x"}, 404, "does not exist"),
        ("completions", {"model": "tiny", "prompt": "x", "logprobs": 5000}, 400, "logprobs must be at most"),
        ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 5000}, 400, "top_logprobs must be at most"),
        ("completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature must be >= 0"),
        ("completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens must be >= 1"),
        ("completions", {"model": "tiny", "prompt": ""}, 400, "prompt is empty"),
        ("completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "token ids must be integers"),
        ("completions", {"model": "tiny", "prompt": "x", "stream": True, "stream_options": 3}, 400, "stream_options"),
        ("chat/completions", {"model": "tiny", "messages": []}, 400, "messages must be"),
    ],
)
def test_errors_have_openai_shape(server_a, path, body, status, fragment):
    resp = httpx.post(f"{server_a.base_url}/{path}", json=body)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert fragment in error["message"] and error["type"]


def test_invalid_json_is_a_clean_400(server_a):
    resp = httpx.post(f"{server_a.base_url}/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert "not valid JSON" in resp.json()["error"]["message"]


def test_end_token_is_reported_and_not_in_text(tok_a, models_a):
    """Force the model to end at once: the end token is the last logprobs entry, text is empty."""
    from blackbox_proxy.apps.model_server import create_app
    from blackbox_proxy.apps.openai_http import ServerThread
    from blackbox_proxy.local.runner import ModelRunner

    runner = ModelRunner(models_a[0], tok_a, name="tiny")
    runner.vocab.end_ids  # noqa: B018
    original = runner._extend

    def ending(context, ids):
        out = original(context, ids).clone()
        out[:] = -math.inf
        out[0] = 0.0
        return out

    runner._extend = ending
    with ServerThread(create_app(runner)) as server:
        resp = httpx.post(f"{server.base_url}/completions", json={"model": "tiny", "prompt": "x", "logprobs": 2,
                                                                   "max_tokens": 5, "temperature": 0}).json()
    choice = resp["choices"][0]
    assert choice["text"] == "" and choice["finish_reason"] == "stop"
    assert choice["logprobs"]["tokens"] == ["<|endoftext|>"]


def test_logit_bias_moves_the_draw_not_the_logprobs(sdk):
    plain = sdk.completions.create(model="tiny", prompt="The quick brown", max_tokens=1, temperature=0, logprobs=3)
    top = plain.choices[0].logprobs.top_logprobs[0]
    first = plain.choices[0].logprobs.tokens[0]
    banned_id = sdk.completions.create(model="tiny", prompt="The quick brown", max_tokens=1, temperature=0,
                                       logprobs=3, extra_body={"return_tokens_as_token_ids": True})
    token_id = int(banned_id.choices[0].logprobs.tokens[0].split(":")[1])
    biased = sdk.completions.create(model="tiny", prompt="The quick brown", max_tokens=1, temperature=0, logprobs=3,
                                    logit_bias={str(token_id): -100})
    assert biased.choices[0].logprobs.tokens[0] != first
    assert biased.choices[0].logprobs.top_logprobs[0] == pytest.approx(top)


def test_text_offset_starts_after_the_prompt(sdk):
    resp = sdk.completions.create(model="tiny", prompt="Hello", max_tokens=2, temperature=0, logprobs=1)
    assert resp.choices[0].logprobs.text_offset[0] == len("Hello")


def test_api_key_body_limit_and_unknown_routes(tok_a, models_a):
    key = "srv-key-0123456789"
    runner = ModelRunner(models_a[0], tok_a, name="tiny")
    with ServerThread(create_app(runner, api_key=key, max_body_bytes=4096)) as server:
        body = {"model": "tiny", "prompt": "The", "max_tokens": 1}
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": key}):
            resp = httpx.post(f"{server.base_url}/completions", json=body, headers=headers)
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
            assert key not in resp.text
        good = {"authorization": f"Bearer {key}"}
        assert httpx.post(f"{server.base_url}/completions", json=body, headers=good).status_code == 200
        assert httpx.get(f"{server.base_url}/models").status_code == 401
        assert httpx.get(f"http://127.0.0.1:{server.port}/health").status_code == 200  # liveness stays open
        big = dict(body, prompt="word " * 2000)
        resp = httpx.post(f"{server.base_url}/completions", json=big, headers=good)
        assert resp.status_code == 413 and "4096 bytes" in resp.json()["error"]["message"]

        def chunked():  # no content-length: the limit holds while reading
            yield json.dumps(big).encode()

        resp = httpx.post(f"{server.base_url}/completions", content=chunked(), headers=good)
        assert resp.status_code == 413
        resp = httpx.get(f"{server.base_url}/nowhere", headers=good)
        assert resp.status_code == 404 and "/v1/completions" in resp.json()["error"]["message"]
        resp = httpx.get(f"{server.base_url}/completions", headers=good)
        assert resp.status_code == 405 and resp.json()["error"]["message"]
