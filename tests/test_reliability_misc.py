"""Issue 18, the rest: the tuned distribution stays a distribution for every value the request
accepts, the response cache never stores a key a host echoes, and a LoRA adapter trained on
another base is refused."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch

from blackbox_proxy import ConfigurationError, ProxyTuner, Scorer
from blackbox_proxy.apps.model_server import create_app
from blackbox_proxy.apps.openai_http import ServerThread
from blackbox_proxy.local.runner import ModelRunner
from blackbox_proxy.maths import combiner
from tiny import save, tiny_llama

# ----- the maths: no NaN for any alpha or temperature the request accepts --------------------------------


def test_tuned_distribution_known_answers_at_the_extremes():
    scores = torch.tensor([-0.5, -0.1, -3.0], dtype=torch.float64)
    assert combiner.tuned_distribution(scores, 1e-320).tolist() == [0.0, 1.0, 0.0]  # the argmax, not nan
    assert combiner.tuned_distribution(scores, 5e-324).tolist() == [0.0, 1.0, 0.0]
    assert combiner.tuned_distribution(scores, 1e308).tolist() == pytest.approx([1 / 3] * 3)
    both = torch.tensor([math.inf, 0.0, math.inf, -math.inf, math.nan], dtype=torch.float64)
    assert combiner.tuned_distribution(both, 1.0).tolist() == [0.5, 0.0, 0.5, 0.0, 0.0]
    nan = torch.tensor([math.nan, -1.0, -2.0], dtype=torch.float64)
    assert combiner.tuned_distribution(nan, 1.0).tolist() == pytest.approx([0.0, 1 / (1 + math.e ** -1),
                                                                            math.e ** -1 / (1 + math.e ** -1)])


@pytest.mark.parametrize("alpha", [1e308, -1e308, 100.0, 1e-320])
@pytest.mark.parametrize("temperature", [1.0, 1e-320, 1e300, 0.7])
def test_any_finite_alpha_and_temperature_give_a_distribution(alpha, temperature):
    hosted = torch.tensor([-0.1, -2.4, -5.0, -9.0], dtype=torch.float64)
    delta = torch.tensor([-3.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    probs = combiner.tuned_distribution(combiner.proxy_scores(hosted, delta, alpha), temperature, top_p=0.9)
    assert torch.isfinite(probs).all() and float(probs.sum()) == pytest.approx(1.0)
    generator = torch.Generator().manual_seed(0)
    assert 0 <= combiner.choose(probs, generator) < 4


def test_alpha_and_seed_bounds_are_one_line_messages():
    from blackbox_proxy.request import GenerationRequest

    with pytest.raises(ConfigurationError, match=r"^alpha must be between -100 and 100 \(typical: 0.5 to 2\), got 1e\+308$"):
        GenerationRequest.build(prompt="x", alpha=1e308)
    with pytest.raises(ConfigurationError, match="seed must be an integer from -9223372036854775808 to "
                                                 "9223372036854775807 \\(64-bit\\), got an integer of 16610 bits"):
        GenerationRequest.build(prompt="x", seed=10 ** 5000)
    for seed in (-(2 ** 63), 2 ** 63 - 1):
        torch.Generator().manual_seed(GenerationRequest.build(prompt="x", seed=seed).seed)  # torch takes the range


# ----- the response cache never holds a key -----------------------------------------------------------

SECRET = "sk-live-CACHECHECK-29f0c8a1b7e64d35"


class EchoKey:
    """A host that echoes the request's Authorization header (and the key inside a sentence, and
    in the answer's id) in every successful completion body, streamed or not."""

    def __init__(self, app):
        self.app = app
        self.echoed = 0

    @staticmethod
    def echo(data: dict, auth: str) -> dict:
        key = auth.split()[-1]
        data["id"] = f"cmpl-{key}"
        data["debug"] = {"headers": {"Authorization": auth}, "note": f"called with {key}", "x-api-key": key}
        return data

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"").decode()
        captured = {"headers": [], "body": b""}

        async def keep(message):
            if message["type"] == "http.response.start":
                captured.update(status=message["status"], headers=list(message.get("headers", [])))
            else:
                captured["body"] += message.get("body", b"")

        await self.app(scope, receive, keep)
        if captured["status"] != 200:
            body = captured["body"]
        elif captured["body"].startswith(b"data:"):  # a streamed answer: the key in every event
            events = []
            for line in captured["body"].decode().split("\n"):
                if line.startswith("data: {"):
                    line = "data: " + json.dumps(self.echo(json.loads(line[6:]), auth))
                events.append(line)
            body = "\n".join(events).encode()
            self.echoed += 1
        else:
            body = json.dumps(self.echo(json.loads(captured["body"]), auth)).encode()
            self.echoed += 1
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": captured["status"],
                    "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize("strategy", ["per-step", "speculative"])  # whole answers; streamed chunks
def test_a_key_echoed_in_a_successful_body_never_reaches_the_cache(tmp_path, tok_a, models_a, scorers_a, strategy):
    runner = ModelRunner(models_a[0], tok_a, name="tiny")
    echo = EchoKey(create_app(runner, max_top_logprobs=len(tok_a)))
    cache = tmp_path / "cache.sqlite"
    with ServerThread(echo) as server:
        def tuner():
            return ProxyTuner(base_url=server.base_url, model="tiny", api_key=SECRET, expert=scorers_a[0],
                              anti_expert=scorers_a[1], top_k=8, hosted_tokenizer=tok_a, max_retries=0, cache=cache)

        first = tuner()
        text = first.generate("The quick", max_tokens=4, strategy=strategy).text
        first.close()
        echoed = echo.echoed
        again = tuner()
        assert again.generate("The quick", max_tokens=4, strategy=strategy).text == text  # from the scrubbed cache
        again.close()
    assert echoed >= 1 and echo.echoed == echoed  # every answer of the second run came from the cache
    files = [p for p in tmp_path.iterdir() if p.name.startswith("cache.sqlite")]
    assert files and all(SECRET.encode() not in p.read_bytes() for p in files), [p.name for p in files]
    import sqlite3

    with sqlite3.connect(cache) as db:
        bodies = [json.loads(body) for (body,) in db.execute("SELECT body FROM responses")]
    assert bodies and all(b["id"] == "cmpl-***" for b in bodies)
    if strategy == "per-step":  # a streamed answer is gathered from the fields it needs: no "debug"
        assert all(b["debug"] == {"headers": {"Authorization": "***"}, "note": "called with ***",
                                  "x-api-key": "***"} for b in bodies)


# ----- a LoRA adapter trained on another base ----------------------------------------------------------


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tok_a):
    """Two tiny Llamas with the same shapes and different weights, saved; an adapter trained on
    the second (loaded from its folder, so peft records that folder as its base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("bases")
    ours = save(tiny_llama(tok_a, 2), tok_a, root / "ours")
    other = save(tiny_llama(tok_a, 7), tok_a, root / "other")
    torch.manual_seed(5)
    loaded = AutoModelForCausalLM.from_pretrained(str(other))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(loaded, config).save_pretrained(root / "adapter")
    return root, ours, other


def adapter_base(root, name):
    return json.loads((root / name / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_an_adapter_trained_on_another_base_is_refused(bases, monkeypatch, caplog):
    root, ours, other = bases
    assert adapter_base(root, "adapter") == str(other)
    with pytest.raises(ConfigurationError) as info:
        Scorer.pair_from_adapter(str(ours), str(root / "adapter"), render="raw")
    message = str(info.value)
    assert "\n" not in message and f"was trained on {str(other)!r}, not on {str(ours)!r}" in message
    assert "the same shapes, other weights" in message and "BLACKBOX_PROXY_ADAPTER_BASE_CHECK=off" in message
    expert, anti = Scorer.pair_from_adapter(str(other), str(root / "adapter"), render="raw")  # its own base: fine
    assert expert.model is anti.model
    monkeypatch.setenv("BLACKBOX_PROXY_ADAPTER_BASE_CHECK", "off")
    with caplog.at_level(logging.WARNING):
        Scorer.pair_from_adapter(str(ours), str(root / "adapter"), render="raw")
    assert "was trained on" in caplog.text


def test_adapter_base_of_another_architecture_or_unknown(bases, tok_a, tmp_path, caplog):
    root, ours, other = bases
    wide = copy.deepcopy(json.loads((root / "adapter" / "adapter_config.json").read_text()))
    wide_base = save(tiny_llama(tok_a, 2, hidden=64), tok_a, tmp_path / "wide")
    for name, recorded in (("wide-adapter", str(wide_base)), ("unknown-adapter", "some-org/not-here-135M")):
        folder = tmp_path / name
        folder.mkdir()
        for item in (root / "adapter").iterdir():
            (folder / item.name).write_bytes(item.read_bytes())
        (folder / "adapter_config.json").write_text(json.dumps({**wide, "base_model_name_or_path": recorded}))
    with pytest.raises(ConfigurationError, match=r"hidden_size 64 vs 48"):
        Scorer.pair_from_adapter(str(ours), str(tmp_path / "wide-adapter"), render="raw")
    with caplog.at_level(logging.WARNING):
        Scorer.pair_from_adapter(str(ours), str(tmp_path / "unknown-adapter"), render="raw")
    assert "was trained on 'some-org/not-here-135M', which is not available here" in caplog.text


def test_a_hosted_answer_that_cannot_be_cached_is_still_used():
    """A host's text with a lone surrogate cannot be written as JSON: the paid answer is used and
    only left out of the cache (it used to raise after the call was paid)."""
    from openai.types import Completion, CompletionChoice

    from blackbox_proxy.hosts.client import HostedClient

    bad = Completion.construct(id="x", object="text_completion", created=1, model="m", choices=[
        CompletionChoice.construct(text="a\ud800", index=0, finish_reason="stop", logprobs=None)])
    good = Completion.construct(id="x", object="text_completion", created=1, model="m", choices=[
        CompletionChoice.construct(text="a", index=0, finish_reason="stop", logprobs=None)])
    assert HostedClient.cache_body(bad) is None
    assert '"text":"a"' in HostedClient.cache_body(good)
