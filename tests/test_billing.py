"""The bill as providers charge it: cached prompt tokens read from the host's usage (OpenAI's
and DeepSeek's fields), reported by serve-model from its KV cache, added up over a generation,
and modelled by the replay host's prompt cache. Real HTTP on loopback, tiny models."""

from __future__ import annotations

import httpx
import pytest
from openai.types import Completion

from blackbox_proxy import ProxyTuner
from blackbox_proxy.errors import ConfigurationError
from blackbox_proxy.harness.prompt_cache import PromptCache
from blackbox_proxy.harness.replay import ReplayHost
from blackbox_proxy.hosts.wire import usage_of

BODY = {"id": "c", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "text": "x", "finish_reason": "length", "logprobs": None}]}


@pytest.mark.parametrize("usage, cached", [
    ({"prompt_tokens": 2000, "completion_tokens": 4, "total_tokens": 2004,
      "prompt_tokens_details": {"cached_tokens": 1920}}, 1920),  # OpenAI (and vLLM)
    ({"prompt_tokens": 300, "completion_tokens": 4, "total_tokens": 304,
      "prompt_cache_hit_tokens": 256, "prompt_cache_miss_tokens": 44}, 256),  # DeepSeek
    ({"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34}, 0),  # neither
    ({"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34,
      "prompt_tokens_details": {"cached_tokens": 99}}, 30),  # never more than the prompt
])
def test_cached_prompt_tokens_are_read_from_either_providers_field(usage, cached):
    got = usage_of(Completion.model_validate(dict(BODY, usage=usage)))
    assert (got.prompt_tokens, got.cached_prompt_tokens) == (usage["prompt_tokens"], cached)


def test_serve_model_reports_the_prompt_tokens_its_kv_cache_held(server_a, tok_a):
    """A request that continues an earlier one's text reads that prefix from the kept cache, and
    says so as OpenAI does; an unrelated prompt does not. (One token asked: the context then
    holds exactly the prompt, which the next request extends.)"""
    first = tok_a.encode("The quick brown fox jumps")
    with httpx.Client(base_url=server_a.base_url) as http:
        def usage(prompt):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 2}
            return http.post("/completions", json=body).json()["usage"]

        usage(first)
        again = usage(first + [5, 6])
        assert again["prompt_tokens"] == len(first) + 2
        assert again["prompt_tokens_details"]["cached_tokens"] == len(first)
        other = usage(tok_a.encode("~|~ nothing else starts so"))  # other tests leave contexts kept
        assert other["prompt_tokens_details"]["cached_tokens"] == 0


@pytest.mark.parametrize("strategy", ["per-step", "speculative"])
def test_a_generation_adds_up_the_cached_prompt_tokens(server_a, tok_a, scorers_a, strategy):
    """Every call after the first continues the prompt: its prompt tokens are mostly cached."""
    with ProxyTuner(base_url=server_a.base_url, model="tiny", expert=scorers_a[0], anti_expert=scorers_a[1],
                    top_k=8, hosted_tokenizer=tok_a, max_retries=0) as tuner:
        prompt = "A café in Zürich sells"
        result = tuner.generate(prompt, max_tokens=12, strategy=strategy)
        u = result.usage
        assert u.api_calls > 1 and 0 < u.cached_prompt_tokens < u.prompt_tokens
        # the calls after the first each read at least the prompt from the cache
        assert u.cached_prompt_tokens >= (u.api_calls - 1) * len(tok_a.encode(prompt)) // 2


def test_prompt_cache_rules():
    openai_rule = PromptCache.named("openai")
    ids = list(range(1500))
    assert openai_rule.cached({"prompt": ids[:1100]}, 1100) == 0  # nothing seen yet
    assert openai_rule.cached({"prompt": ids[:1300]}, 1300) == 1024  # 1,100 shared, in blocks of 128
    assert openai_rule.cached({"prompt": ids[:1000] + [0]}, 1001) == 0  # below 1,024 tokens: never cached
    exact = PromptCache.named("exact")
    exact.cached({"prompt": "Hello world, this is a prompt"}, 8)
    # text: shared characters scaled to the prompt's tokens
    assert exact.cached({"prompt": "Hello world, this is a prompt and more"}, 10) == 7
    chat = PromptCache.named("exact")
    messages = [{"role": "user", "content": "Hi there"}]
    chat.cached({"messages": messages}, 10)
    assert chat.cached({"messages": messages + [{"role": "assistant", "content": "Hel"}]}, 14) >= 5
    with pytest.raises(ConfigurationError, match="unknown prompt cache rule"):
        PromptCache.named("anthropic")


@pytest.mark.parametrize("stream", [False, True])
def test_replay_host_reports_the_cached_tokens_of_its_rule(server_a, tok_a, tmp_path, stream):
    path = tmp_path / "answers.jsonl"
    prompt = tok_a.encode("The quick brown fox jumps over")
    bodies = [{"model": "tiny", "prompt": prompt[:n], "max_tokens": 2, "temperature": 0, "logprobs": 2}
              for n in (len(prompt) - 2, len(prompt))]
    with ReplayHost(path, upstream=server_a.base_url) as host, httpx.Client(base_url=host.base_url) as http:
        for body in bodies:
            http.post("/completions", json=body)
    with ReplayHost(path, prompt_cache=PromptCache.named("exact")) as host, \
            httpx.Client(base_url=host.base_url) as http:
        got = []
        for body in bodies:
            if not stream:
                got.append(http.post("/completions", json=body).json()["usage"])
                continue
            lines = http.post("/completions", json=dict(body, stream=True, stream_options={"include_usage": True}))
            events = [line for line in lines.text.splitlines() if line.startswith("data: {")]
            got.append(httpx.Response(200, content=events[-1][6:]).json()["usage"])
    assert got[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert got[1]["prompt_tokens_details"]["cached_tokens"] == len(prompt) - 2
