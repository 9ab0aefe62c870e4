"""Issue 18, the servers' part: no request body crashes either server (a property-based fuzz
test), the SDK's model retrieval, content-part messages, answer-changing fields honoured or
refused by name, no local paths in errors, bounded stop lists and slow clients, abandoned
requests cancelled (no more hosted calls), and a context limit reached mid-generation ending
the answer with finish_reason "length"."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings, strategies as st

from blackbox_proxy import AsyncProxyTuner, ProxyTuner, Scorer
from blackbox_proxy.apps.model_server import create_app
from blackbox_proxy.apps.openai_http import UVICORN_OPTIONS, ServerThread
from blackbox_proxy.apps.tuned_server import create_tuned_app
from blackbox_proxy.errors import ConfigurationError, ContextLimitError, HostedBadRequestError
from blackbox_proxy.local.runner import ModelRunner
from blackbox_proxy.request import GenerationRequest, Message

PATHISH = "/secret/models/smollm2-135m-instruct"


@pytest.fixture(scope="module")
def local_app(tok_a, models_a):
    return create_app(ModelRunner(models_a[0], tok_a, name="tiny"), max_top_logprobs=20)


@pytest.fixture(scope="module")
def local(local_app):
    with TestClient(local_app) as client:
        yield client


@pytest.fixture(scope="module")
def tuner(server_a, tok_a, models_a):
    expert = Scorer(models_a[1], tok_a, render="chat", name=f"{PATHISH}+/secret/loras/arith-lora")
    anti = Scorer(models_a[2], tok_a, render="chat", name=PATHISH)
    return AsyncProxyTuner(base_url=server_a.base_url, model="tiny", expert=expert, anti_expert=anti, top_k=8,
                           hosted_tokenizer=tok_a, max_retries=0, mode="chat-prefix")


@pytest.fixture(scope="module")
def tuned(tuner):
    with TestClient(create_tuned_app(tuner, name="tiny-tuned")) as client:
        yield client


def _error(resp):
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    return body["error"]["message"]


# ----- 1. models.retrieve ----------------------------------------------------------------------------


def test_models_retrieve_on_both_servers(server_a, tuner):
    sdk = openai.OpenAI(base_url=server_a.base_url, api_key="-", max_retries=0)
    assert sdk.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        sdk.models.retrieve("gpt-4")
    with ServerThread(create_tuned_app(tuner, name="tiny-tuned")) as server:
        sdk = openai.OpenAI(base_url=server.base_url, api_key="-", max_retries=0)
        assert sdk.models.retrieve("tiny-tuned").owned_by == "blackbox-proxy-tuned"
        with pytest.raises(openai.NotFoundError, match="This server serves `tiny-tuned`"):
            sdk.models.retrieve("tiny")


# ----- 2. content parts --------------------------------------------------------------------------------

PARTS = [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "about a café"}]


def test_text_parts_are_joined_and_other_parts_refused(local, tuned):
    joined = [{"role": "user", "content": "Tell me\nabout a café"}]
    for client, model in ((local, "tiny"), (tuned, "tiny-tuned")):
        base = {"model": model, "max_tokens": 3, "temperature": 0}
        a = client.post("/v1/chat/completions", json=dict(base, messages=[{"role": "user", "content": PARTS}]))
        b = client.post("/v1/chat/completions", json=dict(base, messages=joined))
        assert a.status_code == 200, a.text
        assert a.json()["choices"][0]["message"]["content"] == b.json()["choices"][0]["message"]["content"]
        image = [{"role": "user", "content": [PARTS[0], {"type": "image_url", "image_url": {"url": "x"}}]}]
        resp = client.post("/v1/chat/completions", json=dict(base, messages=image))
        assert resp.status_code == 400 and "'image_url'" in _error(resp)
    assert Message.model_validate({"role": "user", "content": PARTS}).content == "Tell me\nabout a café"
    with pytest.raises(ConfigurationError, match="input_audio"):
        GenerationRequest.build(messages=[{"role": "user", "content": [{"type": "input_audio"}]}])


# ----- 3. answer-changing fields -------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("response_format", {"type": "json_object"}), ("presence_penalty", 0.5),
                                         ("frequency_penalty", -1), ("tools", [{"type": "function"}]),
                                         ("best_of", 3), ("suffix", "end"), ("logit_bias", {"5": 3}),
                                         # vLLM's (before: ignored by serve, issue 32.5)
                                         ("continue_final_message", True), ("add_generation_prompt", False),
                                         ("bad_words", ["the"]), ("allowed_token_ids", [5, 6]),
                                         ("structured_outputs", {"choice": ["a", "b"]}),
                                         ("include_stop_str_in_output", True), ("stop_token_ids", [5]),
                                         ("use_beam_search", True), ("length_penalty", 0.5)])
def test_fields_that_change_the_answer_are_refused_by_name(local, tuned, field, value):
    for client, model, route, extra in ((local, "tiny", "/v1/completions", {"prompt": "Hi"}),
                                        (tuned, "tiny-tuned", "/v1/chat/completions",
                                         {"messages": [{"role": "user", "content": "Hi"}]}),
                                        (tuned, "tiny-tuned", "/v1/completions", {"prompt": "Hi"})):
        if client is local and field in ("logit_bias", "continue_final_message", "add_generation_prompt"):
            continue  # honoured there
        resp = client.post(route, json={"model": model, "max_tokens": 2, field: value, **extra})
        assert resp.status_code == 400 and field in _error(resp), resp.text
        assert resp.json()["error"]["param"] == field


@pytest.mark.parametrize("field,value", [("logprobs", -1), ("logprobs", "false"), ("stream", "no"), ("echo", 2)])
def test_flags_are_true_or_false_not_truthy(local, tuned, field, value):
    """Chat's ``logprobs: -1`` was read as true (Python's truthiness), and ``"false"`` too."""
    route, extra = (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}) if field != "echo"
                    else ("/v1/completions", {"prompt": "Hi"}))
    for client, model in ((local, "tiny"), (tuned, "tiny-tuned")):
        resp = client.post(route, json={"model": model, "max_tokens": 2, field: value, **extra})
        assert resp.status_code == 400 and "true or false" in _error(resp), resp.text
    assert local.post(route, json={"model": "tiny", "max_tokens": 2, field: 0, **extra}).status_code == 200


def test_neutral_values_pass(local, tuned):
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "response_format": {"type": "text"}, "best_of": 1,
               "user": "someone", "tool_choice": "none", "continue_final_message": False, "bad_words": [],
               "include_stop_str_in_output": False, "add_generation_prompt": True}
    assert local.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2,
                                               **neutral}).status_code == 200
    assert tuned.post("/v1/chat/completions", json={"model": "tiny-tuned", "max_tokens": 2, **neutral,
                                                    "messages": [{"role": "user", "content": "Hi"}]}).status_code == 200


# ----- 4. no local paths in errors ------------------------------------------------------------------------


def test_errors_name_roles_not_paths(tuned):
    resp = tuned.post("/v1/chat/completions", json={"model": "tiny-tuned", "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "word " * 700}]})
    message = _error(resp)
    assert resp.status_code == 400 and "/secret" not in message and "smollm2" not in message
    assert "the expert" in message or "the anti-expert" in message


# ----- 6. stop bounds, uvicorn's timeouts ------------------------------------------------------------------


def test_stop_lists_are_bounded_on_the_model_server(local):
    resp = local.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2,
                                               "stop": ["x"] * 1000})
    assert resp.status_code == 400 and "at most 16 stop sequences" in _error(resp)
    resp = local.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 2,
                                               "stop": ["x" * 100_000]})
    assert resp.status_code == 400 and "1024 characters" in _error(resp)


def test_server_thread_sets_uvicorn_timeouts(local_app):
    server = ServerThread(local_app)
    for key, value in UVICORN_OPTIONS.items():
        assert getattr(server.server.config, key) == value
    assert server.server.config.timeout_keep_alive <= 5


def test_a_slow_body_gets_a_408(local_app, monkeypatch):
    from blackbox_proxy.apps import openai_http

    monkeypatch.setattr(openai_http, "BODY_TIMEOUT", 0.5)
    with ServerThread(local_app) as server:
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 100\r\n\r\n{\"model\"")
            started = time.monotonic()
            reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5


@pytest.mark.parametrize("which", ["serve-model", "serve"])
def test_silent_and_trickling_connections_are_closed_while_others_are_answered(local_app, tuner, monkeypatch, which):
    """A connection that never sends a request, or sends its headers a byte at a time, is closed
    HEADER_TIMEOUT after it opened (before: open for more than 100 s, uvicorn's keep-alive timer
    restarting on every byte); a request sent meanwhile is answered at once."""
    from blackbox_proxy.apps import loopback

    monkeypatch.setattr(loopback, "HEADER_TIMEOUT", 1.0)
    app = local_app if which == "serve-model" else create_tuned_app(tuner, name="tiny-tuned")
    with ServerThread(app) as server:
        silent = socket.create_connection((server.host, server.port), timeout=10)
        trickle = socket.create_connection((server.host, server.port), timeout=10)
        started = time.monotonic()
        with httpx.Client(base_url=f"http://{server.host}:{server.port}") as http:
            assert http.get("/v1/models").status_code == 200
        closed_at = None
        for byte in b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 40:
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                closed_at = time.monotonic() - started
                break
            time.sleep(0.1)
            trickle.settimeout(0.001)
            try:
                if trickle.recv(1) == b"":
                    closed_at = time.monotonic() - started
                    break
            except (TimeoutError, BlockingIOError, socket.timeout):
                pass
        silent.settimeout(5)
        assert silent.recv(1) == b"" and time.monotonic() - started < 4
        assert closed_at is not None and closed_at < 4, closed_at
        silent.close()
        trickle.close()


# ----- 5. abandoned requests ------------------------------------------------------------------------------


def _abandon(server, path, body):
    """Send a request and close the socket without reading the answer."""
    raw = json.dumps(body).encode()
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(raw)}\r\n\r\n".encode() + raw)
        time.sleep(0.5)  # the generation is under way


@pytest.mark.parametrize("stream", [False, True])
def test_an_abandoned_request_stops_calling_the_hosted_api(server_a, tok_a, scorers_a, stream):
    tuner = AsyncProxyTuner(base_url=server_a.base_url, model="tiny", expert=scorers_a[0], anti_expert=scorers_a[1],
                            top_k=8, hosted_tokenizer=tok_a, max_retries=0)
    calls = [0]
    complete = tuner.client.complete

    async def counting(request):
        calls[0] += 1
        return await complete(request)

    tuner.client.complete = counting
    with ServerThread(create_tuned_app(tuner, name="tiny-tuned")) as server:
        for _ in range(2):  # per-step: one hosted call per token, 300 tokens if nobody stopped it
            _abandon(server, "/v1/completions", {"model": "tiny-tuned", "prompt": "The quick brown", "max_tokens": 300,
                                                  "temperature": 1.0, "seed": 1, "stream": stream})
        deadline = time.monotonic() + 30
        while True:  # the count stops growing by itself
            before = calls[0]
            time.sleep(1.0)
            if calls[0] == before or time.monotonic() > deadline:
                break
        settled = calls[0]
        time.sleep(1.0)
    assert calls[0] == settled and 0 < settled < 2 * 150, calls


# ----- 7. context limit mid-generation ----------------------------------------------------------------------


def _limited(client, after, sync):
    """``client.complete`` answering the hosted context 400 from call ``after`` on."""
    complete, calls = client.complete, [0]
    error = HostedBadRequestError("This model's maximum context length is 40 tokens; you requested 41",
                                  status_code=400)

    def check():
        calls[0] += 1
        if calls[0] > after:
            raise error

    streamed = client.complete_streamed
    if sync:
        def limited(request):
            check()
            return complete(request)

        def limited_streamed(request, watch):
            check()
            return streamed(request, watch)
    else:
        async def limited(request):
            check()
            return await complete(request)

        async def limited_streamed(request, watch):
            check()
            return await streamed(request, watch)
    client.complete, client.complete_streamed = limited, limited_streamed


@pytest.mark.parametrize("strategy", ["per-step", "speculative"])
def test_a_hosted_context_limit_mid_generation_ends_with_length(server_a, tok_a, scorers_a, strategy):
    kw = dict(base_url=server_a.base_url, model="tiny", expert=scorers_a[0], anti_expert=scorers_a[1], top_k=8,
              hosted_tokenizer=tok_a, max_retries=0)
    opts = dict(max_tokens=12, temperature=0.0, strategy=strategy)
    full = ProxyTuner(**kw).generate("The quick brown", **opts)
    sync = ProxyTuner(**kw)
    _limited(sync.client, 5, sync=True)
    cut = sync.generate("The quick brown", **opts)
    # five calls paid, then the limit: the text those calls gave is kept
    assert cut.finish_reason == "length" and cut.usage.api_calls == 5 and full.text.startswith(cut.text)
    assert cut.usage.generated_tokens >= 2
    if strategy == "per-step":  # a token each, less greedy's calls beyond the top-k (a step whose probe met the limit is not kept)
        assert cut.usage.generated_tokens + cut.usage.tail_calls in (4, 5)

    async def streamed():
        tuner = AsyncProxyTuner(**kw)
        _limited(tuner.client, 5, sync=False)
        events = [e async for e in tuner.stream("The quick brown", **opts)]
        return "".join(e.text for e in events), events[-1].result

    text, result = asyncio.run(streamed())
    assert text == result.text == cut.text and result.finish_reason == "length"
    # nothing paid yet: the error is the caller's to see
    first = ProxyTuner(**kw)
    _limited(first.client, 0, sync=True)
    with pytest.raises(HostedBadRequestError, match="maximum context length"):
        first.generate("The quick brown", **opts)


@pytest.fixture(scope="module")
def hidden_context(tok_a, models_a):
    """A host that hides its context (as OpenAI and llama.cpp do): a real model server behind
    :class:`faults.ContextLimited`, whose wording a test sets."""
    from faults import ContextLimited

    limited = ContextLimited(create_app(ModelRunner(models_a[0], tok_a, name="tiny"), max_top_logprobs=len(tok_a)),
                             limit=0)
    with ServerThread(limited) as server:
        yield server, limited


@pytest.mark.parametrize("wording", ["openai", "vllm", "llama.cpp", "tgi", "deepseek", "gemini", "terse"])
@pytest.mark.parametrize("strategy,mode", [("per-step", "completions"), ("speculative", "completions"),
                                           ("speculative", "chat-prefix")])
def test_a_hidden_hosted_context_ends_the_generation_whatever_its_wording(hidden_context, server_a, tok_a, scorers_a,
                                                                           wording, strategy, mode):
    """After paid calls, the host's 400 for a text that no longer fits ends the generation with
    the text so far and ``length``, however the host words it: a 400 to a request shaped like one
    it already accepted (only the text is longer) is read as its context. The same 400 before any
    paid call is the caller's to see."""
    from faults import CONTEXT_WORDINGS

    server, limited = hidden_context
    kw = dict(model="tiny", expert=scorers_a[0], anti_expert=scorers_a[1], top_k=8, max_retries=0, mode=mode,
              hosted_tokenizer=tok_a)
    if mode == "chat-prefix":
        kw["expert"], kw["anti_expert"] = (Scorer(m, tok_a, render="chat", name=n) for m, n in
                                           zip((scorers_a[0].model, scorers_a[1].model), "EA"))
    opts = dict(max_tokens=12, temperature=0.0, strategy=strategy, chunk=3)
    full = ProxyTuner(base_url=server_a.base_url, **kw).generate("The quick brown", **opts)
    prompt = len(tok_a.encode("The quick brown")) if mode == "completions" else len("The quick brown")
    limited.wording, limited.limit = wording, prompt + (4 if mode == "completions" else len(full.text[:6]))
    cut = ProxyTuner(base_url=server.base_url, **kw).generate("The quick brown", **opts)
    assert cut.finish_reason == "length" and 0 < len(cut.text) < len(full.text) and full.text.startswith(cut.text)
    assert cut.usage.api_calls >= 1 and limited.refused >= 1
    limited.limit = 3
    with pytest.raises(HostedBadRequestError, match=CONTEXT_WORDINGS[wording]["message"][:12].replace("(", r"\(")):
        ProxyTuner(base_url=server.base_url, **kw).generate("The quick brown", **opts)


def test_a_400_to_a_text_no_longer_than_one_answered_is_not_read_as_the_context(tok_a, scorers_a):
    """The other side of the rule above: a host that refuses a request whose text it already
    answered at that length (a refused ``logit_bias``, say) refused something else; that 400 is
    raised, not turned into ``length``."""
    from blackbox_proxy.decoding.driver import stop_at_context
    from blackbox_proxy.types import HostedRequest

    from decoders import build
    from blackbox_proxy.decoding import PerStepDecoder

    dec = build(PerStepDecoder, None, None, scorers_a[0].vocab, max_tokens=4)
    ask = lambda text: HostedRequest(mode="completions", max_tokens=1, top_k=8, prompt=text)  # noqa: E731
    terse = HostedBadRequestError("the hosted API refused the request (400: request rejected (E4711))", status_code=400)
    assert not dec.outgrew(ask("The quick"))  # nothing answered yet
    dec.answered(ask("The quick"))
    assert dec.outgrew(ask("The quick b")) and not dec.outgrew(ask("The quick")) and not dec.outgrew(ask("The"))
    with pytest.raises(HostedBadRequestError):
        stop_at_context(dec, terse, paid=True, outgrew=dec.outgrew(ask("The quick")))
    stop_at_context(dec, terse, paid=True, outgrew=dec.outgrew(ask("The quick b")))
    assert dec.finish_reason == "length"


def test_a_small_model_context_limit_is_a_context_limit_error(tok_a, models_a):
    from blackbox_proxy.local.sessions import _check_lengths

    scorer = Scorer(models_a[1], tok_a, render="raw", name="E")
    with pytest.raises(ContextLimitError, match="context is 512"):
        _check_lengths(scorer, list(range(600)), [])


# ----- 8. fuzzing ---------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
          "stop", "n", "stream", "logprobs", "top_logprobs", "echo", "logit_bias", "response_format", "alpha",
          "strategy", "chunk", "samples", "stream_options", "presence_penalty", "best_of", "suffix", "tools",
          "continue_final_message", "return_tokens_as_token_ids"]
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", ""]) | json_values,
                                 "content": st.text(max_size=12) | json_values | st.lists(
                                     st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                            "text": st.text(max_size=8)}), max_size=2)})
good = {"model": st.just("MODEL"), "max_tokens": st.integers(-1, 3), "prompt": st.text(max_size=12),
        "messages": st.lists(message, max_size=2), "temperature": st.floats(-1, 3) | json_values,
        "stop": st.lists(st.text(max_size=3), max_size=5) | json_values, "seed": st.integers(-2**64, 2**64)}
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6).flatmap(
    lambda noise: st.fixed_dictionaries({}, optional=good).map(lambda base: {**noise, **base}))


def _fuzz(client, model, body):
    body = {k: (model if v == "MODEL" else v) for k, v in body.items()}
    for route in ("/v1/completions", "/v1/chat/completions"):
        resp = client.post(route, json=body)
        assert resp.status_code < 500, (route, body, resp.text)
        if resp.status_code >= 400:
            assert resp.json()["error"]["message"]
        elif body.get("stream"):
            assert "data:" in resp.text


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=bodies)
def test_fuzz_the_model_server(local, body):
    _fuzz(local, "tiny", body)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=bodies)
def test_fuzz_the_tuned_server(tuned, body):
    _fuzz(tuned, "tiny-tuned", body)


# ----- 9. echo with max_tokens 0 (lm-eval's local-completions) -----------------------------------------------


def test_echo_reports_the_prompts_logprobs(local, tok_a, models_a):
    import torch

    ids = tok_a.encode("The quick brown fox")
    resp = local.post("/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True,
                                               "logprobs": 1, "temperature": 0})
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == tok_a.decode(ids) and len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        truth = torch.log_softmax(models_a[0](torch.tensor([ids])).logits[0].float(), -1)
    want = [float(truth[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])
    assert resp.json()["usage"]["completion_tokens"] == 0
    # echo with an answer: the prompt's text and logprobs, then the answer's
    resp = local.post("/v1/completions", json={"model": "tiny", "prompt": "The quick", "max_tokens": 2, "echo": True,
                                               "logprobs": 0, "temperature": 0}).json()
    plain = local.post("/v1/completions", json={"model": "tiny", "prompt": "The quick", "max_tokens": 2,
                                                "temperature": 0}).json()
    assert resp["choices"][0]["text"] == "The quick" + plain["choices"][0]["text"]
    bad = local.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 0})
    assert bad.status_code == 400 and "0 only with echo" in _error(bad)


def test_the_model_server_streams(server_a):
    sdk = openai.OpenAI(base_url=server_a.base_url, api_key="-", max_retries=0)
    plain = sdk.completions.create(model="tiny", prompt="The quick", max_tokens=5, temperature=0, logprobs=2)
    chunks = list(sdk.completions.create(model="tiny", prompt="The quick", max_tokens=5, temperature=0, logprobs=2,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[0].choices[0].logprobs.tokens == plain.choices[0].logprobs.tokens
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    messages = [{"role": "user", "content": "Hi"}]
    plain = sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    chunks = list(sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


@pytest.mark.parametrize("strategy,streamed", [("per-step", False), ("speculative", True),
                                               ("speculative", False)])
def test_a_small_model_context_limit_mid_generation_ends_with_length(server_a, tok_a, scorers_a, monkeypatch,
                                                                     strategy, streamed):
    """A cross-tokenizer small model can need more tokens than the hosted count: its context
    error in the middle of a generation ends the answer (paid calls are not thrown away). A
    speculative chunk keeps the positions that fit, whether streamed or whole, so every strategy
    ends on the same text: the 4 tokens whose positions fit (prompt + 3 tokens scored)."""
    from blackbox_proxy.local import sessions

    kw = dict(base_url=server_a.base_url, model="tiny", expert=scorers_a[0], anti_expert=scorers_a[1], top_k=8,
              hosted_tokenizer=tok_a, max_retries=0)
    full = ProxyTuner(**kw).generate("The quick brown", max_tokens=10, temperature=0.0, strategy="per-step")
    check, seen = sessions._check_lengths, [0]

    def limited(scorer, ids, paths, longest=None):
        seen[0] += 1
        if len(ids) > len(tok_a.encode("The quick brown")) + 3:
            raise ContextLimitError(f"the text is {len(ids)} tokens for E, whose context is 7")
        return check(scorer, ids, paths, longest)

    monkeypatch.setattr(sessions, "_check_lengths", limited)
    tuner = ProxyTuner(**kw)
    tuner.client.stream_chunks = streamed
    extra = {"drafts": 1} if strategy == "speculative" else {}
    cut = tuner.generate("The quick brown", max_tokens=10, temperature=0.0, strategy=strategy, **extra)
    assert cut.finish_reason == "length" and cut.usage.generated_tokens == 4 and seen[0]
    assert full.text.startswith(cut.text) and cut.text != full.text
