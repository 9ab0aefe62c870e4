"""The tuned model served with OpenAI's API, used through the openai SDK over loopback: same text
as the library call (streaming and not, completions and chat), per-request alpha, n, stop
hold-back, concurrent clients, and the errors (unknown model, bad key, 400s, hosted failure 502)."""

from __future__ import annotations

import asyncio

import openai
import pytest

from blackbox_proxy import AsyncProxyTuner, ProxyTuner, Scorer
from blackbox_proxy.apps.tuned_server import create_tuned_app
from blackbox_proxy.apps.model_server import create_app
from blackbox_proxy.apps.openai_http import ServerThread
from blackbox_proxy.local.runner import ModelRunner

from faults import FaultyApp

KEY = "serve-key-5b1d0c7e"


def start(tuner, **kw):
    return ServerThread(create_tuned_app(tuner, name="tiny-tuned", api_key=KEY, **kw))


@pytest.fixture(scope="module")
def chat_scorers(tok_a, models_a):
    return (Scorer(models_a[1], tok_a, render="chat", name="Ec"), Scorer(models_a[2], tok_a, render="chat", name="Ac"))


@pytest.fixture(scope="module")
def kw_completions(server_a, tok_a, scorers_a):
    return dict(base_url=server_a.base_url, model="tiny", expert=scorers_a[0], anti_expert=scorers_a[1], top_k=8,
                hosted_tokenizer=tok_a, max_retries=0)


@pytest.fixture(scope="module")
def served(kw_completions):
    tuner = AsyncProxyTuner(**kw_completions)
    with start(tuner) as server:
        yield server


@pytest.fixture(scope="module")
def sdk(served):
    client = openai.OpenAI(base_url=served.base_url, api_key=KEY, max_retries=0)
    yield client
    client.close()


def streamed(stream):
    text, finish = "", None
    for event in stream:
        for choice in event.choices:
            text += getattr(choice, "text", None) or getattr(getattr(choice, "delta", None), "content", None) or ""
            finish = choice.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, seed=3),
                                      dict(temperature=1.0, seed=5, strategy="speculative")])
def test_completions_equal_the_library_streaming_or_not(sdk, kw_completions, sampling):
    library = ProxyTuner(**kw_completions)
    extra = {"strategy": sampling.pop("strategy")} if "strategy" in sampling else None
    want = library.generate("The quick brown", max_tokens=10, **sampling, **(extra or {}))
    resp = sdk.completions.create(model="tiny-tuned", prompt="The quick brown", max_tokens=10, extra_body=extra,
                                  **sampling)
    assert resp.choices[0].text == want.text and resp.choices[0].finish_reason == want.finish_reason
    assert resp.usage.completion_tokens == want.usage.generated_tokens
    proxy = resp.model_extra["proxy_usage"]
    assert proxy["api_calls"] == want.usage.api_calls and proxy["hosted_prompt_tokens"] > 0
    text, finish = streamed(sdk.completions.create(model="tiny-tuned", prompt="The quick brown", max_tokens=10,
                                                   stream=True, extra_body=extra, **sampling))
    assert (text, finish) == (want.text, want.finish_reason)


def test_per_request_alpha_n_and_stop(sdk, kw_completions):
    library = ProxyTuner(**kw_completions)
    want = library.generate("A café in", max_tokens=8, alpha=2.0, temperature=0.0)
    resp = sdk.completions.create(model="tiny-tuned", prompt="A café in", max_tokens=8, temperature=0,
                                  extra_body={"alpha": 2.0})
    assert resp.choices[0].text == want.text
    seeded = [library.generate("A café in", max_tokens=6, temperature=1.0, seed=s).text for s in (7, 8)]
    resp = sdk.completions.create(model="tiny-tuned", prompt="A café in", max_tokens=6, temperature=1.0, seed=7, n=2)
    assert [c.text for c in resp.choices] == seeded
    # a stop string: the stream never shows text that the stop later cuts off
    full = library.generate("Numbers: 1 2", max_tokens=12, temperature=0.0).text
    stop = full[4:6] if len(full) >= 6 else full[-2:]
    want = library.generate("Numbers: 1 2", max_tokens=12, temperature=0.0, stop=[stop])
    text, finish = streamed(sdk.completions.create(model="tiny-tuned", prompt="Numbers: 1 2", max_tokens=12,
                                                   temperature=0, stop=[stop], stream=True))
    assert text == want.text and stop not in text and finish == "stop"


def test_chat_streaming_and_not_equal_the_library(server_a, tok_a, chat_scorers):
    kw = dict(base_url=server_a.base_url, model="tiny", expert=chat_scorers[0], anti_expert=chat_scorers[1],
              top_k=8, hosted_tokenizer=tok_a, max_retries=0, mode="chat-prefix")
    messages = [{"role": "user", "content": "Tell me about a café"}]
    want = ProxyTuner(**kw).generate(messages=messages, max_tokens=8, temperature=0.0)
    with start(AsyncProxyTuner(**kw)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
        resp = client.chat.completions.create(model="tiny-tuned", messages=messages, max_tokens=8, temperature=0)
        assert resp.choices[0].message.content == want.text and resp.choices[0].message.role == "assistant"
        stream = client.chat.completions.create(model="tiny-tuned", messages=messages, max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        assert chunks[-1].usage.completion_tokens == want.usage.generated_tokens


def test_concurrent_clients_get_what_sequential_ones_get(served, sdk):
    prompts = ["The quick brown", "A café in Zürich", "Numbers: 1 2", "She said:", "There are many", "def add("]
    want = [sdk.completions.create(model="tiny-tuned", prompt=p, max_tokens=8, temperature=0).choices[0].text
            for p in prompts]

    async def main():
        async with openai.AsyncOpenAI(base_url=served.base_url, api_key=KEY, max_retries=0) as client:
            answers = await asyncio.gather(*(client.completions.create(model="tiny-tuned", prompt=p, max_tokens=8,
                                                                       temperature=0) for p in prompts))
            return [a.choices[0].text for a in answers]

    assert asyncio.run(main()) == want


def test_errors(served, sdk):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        sdk.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    bad = openai.OpenAI(base_url=served.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny-tuned", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="logprobs of the tuned distribution are returned with strategy"):
        sdk.completions.create(model="tiny-tuned", prompt="Hi", max_tokens=2, logprobs=3, temperature=1,
                               extra_body={"strategy": "resample"})
    with pytest.raises(openai.BadRequestError, match="alpha must be a finite number"):  # GenerationRequest's words
        sdk.completions.create(model="tiny-tuned", prompt="Hi", max_tokens=2, extra_body={"alpha": "strong"})
    with pytest.raises(openai.BadRequestError, match="speculative strategy samples"):
        sdk.completions.create(model="tiny-tuned", prompt="Hi", max_tokens=2, temperature=0.5,
                               extra_body={"strategy": "speculative"})
    with pytest.raises(openai.BadRequestError, match="the prompt is empty"):
        sdk.completions.create(model="tiny-tuned", prompt="  ", max_tokens=2)


def test_hosted_failure_is_a_502_with_the_reason(tok_a, models_a, scorers_a):
    runner = ModelRunner(models_a[0], tok_a, name="tiny")
    faulty = FaultyApp(create_app(runner, max_top_logprobs=len(tok_a)), rate=0.0,
                       paths=("/v1/completions",))
    with ServerThread(faulty) as hosted:
        tuner = AsyncProxyTuner(base_url=hosted.base_url, model="tiny", expert=scorers_a[0],
                                anti_expert=scorers_a[1], top_k=8, max_retries=0, api_key="sk-hosted-SECRET-123456")
        with start(tuner) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
            faulty.script = ["500"]
            with pytest.raises(openai.APIStatusError) as info:
                client.completions.create(model="tiny-tuned", prompt="The quick", max_tokens=3, temperature=0)
            assert info.value.status_code == 502
            message = info.value.body["message"]
            assert "the hosted API failed" in message and "The server had an error" in message
            assert "SECRET" not in str(info.value.response.text)
            faulty.script = ["ok", "500"]  # fails mid-stream: an error event, then the stream ends
            with pytest.raises(openai.APIError, match="the hosted API failed"):
                streamed(client.completions.create(model="tiny-tuned", prompt="The quick", max_tokens=3,
                                                   temperature=0, stream=True))


def test_one_id_and_created_per_streamed_response(served, sdk, monkeypatch):
    """Every chunk of one streamed response carries the response's id and `created` (OpenAI keeps
    one); a clock that ticks at every read shows a per-chunk timestamp."""
    import itertools
    import types

    from blackbox_proxy.apps import tuned_server

    ticks = itertools.count(1_700_000_000)
    monkeypatch.setattr(tuned_server, "time", types.SimpleNamespace(time=lambda: next(ticks)))
    chunks = list(sdk.completions.create(model="tiny-tuned", prompt="The quick brown", max_tokens=6, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert len(chunks) >= 3
    assert len({c.created for c in chunks}) == 1 and len({c.id for c in chunks}) == 1


def test_several_prompts_and_token_id_prompts(sdk, kw_completions, tok_a):
    """A list of prompts (as lm-eval's local-completions sends) is answered in OpenAI's order: the
    n choices of prompt 0, then of prompt 1; hosted token ids are read with the hosted tokenizer."""
    library = ProxyTuner(**kw_completions)
    prompts = ["The quick brown", "A café in", "Numbers: 1, 2,"]
    want = [library.generate(p, max_tokens=6, temperature=0.0).text for p in prompts]
    resp = sdk.completions.create(model="tiny-tuned", prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in resp.choices] == list(range(6))
    assert [c.text for c in resp.choices] == [w for w in want for _ in range(2)]
    assert resp.usage.completion_tokens == 2 * sum(len(c) for c in [library.generate(p, max_tokens=6,
                                                                                      temperature=0.0).trace for p in prompts])
    ids = tok_a.encode("A café in", add_special_tokens=False)
    by_ids = sdk.completions.create(model="tiny-tuned", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == want[1]
    mixed = sdk.completions.create(model="tiny-tuned", prompt=[ids, "The quick brown"], max_tokens=6, temperature=0)
    assert [c.text for c in mixed.choices] == [want[1], want[0]]
    with pytest.raises(openai.BadRequestError, match="token ids"):
        sdk.completions.create(model="tiny-tuned", prompt=[10 ** 6], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="several prompts"):
        sdk.completions.create(model="tiny-tuned", prompt=prompts, max_tokens=2, stream=True)
    with pytest.raises(openai.BadRequestError, match="up to 16"):
        sdk.completions.create(model="tiny-tuned", prompt=["x"] * 17, max_tokens=2)


def test_chat_on_a_completions_host(sdk, kw_completions, tok_a):
    """A base model behind a completions API serves chat clients: the messages are rendered with
    the hosted tokenizer's chat template for the hosted model (the small models use their own), so
    a chat request equals a completion of that rendering; streaming with the SDK gives the same."""
    library = ProxyTuner(**kw_completions)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about a café"}]
    rendered = tok_a.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert library.prompt_text(library.request_for(messages=messages)) == rendered
    chat = library.generate(messages=messages, max_tokens=8)
    assert chat.settings["token_prompts"] is True and chat.text
    resp = sdk.chat.completions.create(model="tiny-tuned", messages=messages, max_tokens=8, temperature=0)
    assert resp.choices[0].message.content == chat.text
    text, finish = streamed(sdk.chat.completions.create(model="tiny-tuned", messages=messages, max_tokens=8,
                                                         temperature=0, stream=True))
    assert (text, finish) == (chat.text, chat.finish_reason)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "about a café"}]}]
    assert sdk.chat.completions.create(model="tiny-tuned", messages=parts, max_tokens=4, temperature=0).choices[0].message.content


@pytest.mark.parametrize("mode", ["completions", "chat-prefix", "chat"])
def test_chat_with_small_models_that_have_no_chat_template(server_a, tok_a, models_a, mode):
    """Small models without a chat template: on a completions host they read the hosted rendering
    of the messages, and the answer's usage counts that (before, a 500 after the paid calls);
    where the host renders the messages itself (the chat modes) there is no text to give them,
    and the request is refused with a 400 that says why before anything is paid."""
    import copy

    bare = copy.deepcopy(tok_a)
    bare.chat_template = None
    kw = dict(base_url=server_a.base_url, model="tiny", top_k=8, max_retries=0, mode=mode,
              expert=Scorer(models_a[1], bare, render="raw", name="E"),
              anti_expert=Scorer(models_a[2], bare, render="raw", name="A"),
              hosted_tokenizer=tok_a if mode == "completions" else None)
    messages = [{"role": "user", "content": "Tell me about a cafe"}]
    with start(AsyncProxyTuner(**kw)) as server, openai.OpenAI(base_url=server.base_url, api_key=KEY,
                                                               max_retries=0) as client:
        ask = dict(model="tiny-tuned", messages=messages, max_tokens=1 if mode == "chat" else 4, temperature=0)
        if mode != "completions":
            with pytest.raises(openai.BadRequestError, match="no chat template"):
                client.chat.completions.create(**ask)
            return
        rendered = tok_a.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        resp = client.chat.completions.create(**ask)
        assert resp.usage.prompt_tokens == len(bare.encode(rendered)) and resp.usage.completion_tokens >= 1
        text, finish = streamed(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
        assert text == resp.choices[0].message.content
