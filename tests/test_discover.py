"""Hosted tokenizer discovery (issue 16): exact token-id continuation without --hosted-tokenizer."""

import json
import logging

import pytest
from click.testing import CliRunner
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from blackbox_proxy import ProxyTuner
from blackbox_proxy.apps.cli import main
from blackbox_proxy.apps.openai_http import ServerThread
from blackbox_proxy.hosts.discover import PROBE, discover
from blackbox_proxy.tokens.loaders import vocabulary_from_hf

from test_equivalence import PROMPTS, white_box_greedy


def _generate(server, saved, prompt, alpha, k, *extra):
    args = ["generate", "--base-url", server.base_url, "--model", "tiny", "--expert", str(saved["E"]),
            "--anti-expert", str(saved["A"]), "--prompt", prompt, "--max-tokens", "12", "--alpha", str(alpha),
            "--top-k", str(k), "--max-retries", "0", "--json", *extra]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)


@pytest.mark.slow
def test_cli_without_the_flag_equals_white_box(server_a, saved_a, tok_a, models_a):
    """The CLI, given no --hosted-tokenizer, finds the server's tokenizer through /tokenize, sends
    token ids, and with k = the whole vocabulary equals slow white-box proxy tuning; with text
    prompts (--hosted-tokenizer none) the server re-tokenises and some cases differ."""
    text_equal = 0
    cases = [(p, a) for p in PROMPTS for a in (0.5, 1.0, 2.0)]
    for prompt, alpha in cases:
        expected = white_box_greedy(models_a, tok_a.encode(prompt), alpha, 12)
        want = tok_a.decode([t for t in expected if t != 0])
        data = _generate(server_a, saved_a, prompt, alpha, len(tok_a))
        assert data["settings"]["token_prompts"] is True
        assert "small models' tokenizer" in data["settings"]["hosted_tokenizer_source"]
        assert data["settings"]["alignment"] == "token ids (same tokenizer)"
        assert data["text"] == want, (prompt, alpha)
        text = _generate(server_a, saved_a, prompt, alpha, len(tok_a), "--hosted-tokenizer", "none")
        assert text["settings"]["token_prompts"] is False
        text_equal += text["text"] == want
    print(f"text prompts equal white-box in {text_equal} of {len(cases)} cases")
    assert text_equal < len(cases)  # discovery is what makes these exact


def test_model_server_tokenize_routes(server_a, tok_a):
    import httpx

    root = server_a.base_url[: -len("/v1")]
    for url in (f"{root}/tokenize", f"{server_a.base_url}/tokenize"):
        got = httpx.post(url, json={"model": "tiny", "prompt": "A café"}).json()
        assert got["tokens"] == tok_a.encode("A café") and got["count"] == len(got["tokens"])
    plain = httpx.post(f"{root}/tokenize", json={"prompt": "A café", "add_special_tokens": False}).json()
    assert plain["tokens"] == tok_a.encode("A café", add_special_tokens=False)
    back = httpx.post(f"{root}/detokenize", json={"model": "tiny", "tokens": plain["tokens"]}).json()
    assert back == {"prompt": "A café"}
    wrong = httpx.post(f"{root}/tokenize", json={"model": "other", "prompt": "x"})
    assert wrong.status_code == 404 and "tiny" in wrong.json()["error"]["message"]
    bad = httpx.post(f"{root}/detokenize", json={"tokens": [10 ** 9]})
    assert bad.status_code == 400 and "tokens" in bad.json()["error"]["message"]


def _host(routes):
    """A host with only the given routes: {path: json answer or status code}."""
    app = FastAPI()
    seen = []
    for path, answer in routes.items():
        def handler(answer=answer, path=path):
            seen.append(path)
            return JSONResponse(answer if not isinstance(answer, int) else {}, status_code=200 if not isinstance(answer, int) else answer)
        app.add_api_route(path, handler, methods=["GET", "POST"])
    return app, seen


def test_no_route_uses_tiktokens_model_table_for_openai_names():
    app, _ = _host({"/v1/models": {"data": []}})
    with ServerThread(app) as host:
        found = discover(base_url=host.base_url, api_key="sk-test", model="gpt-4o", small_vocab=None)
        assert found.vocab is not None and "o200k_base" in found.source and "no tokenize route" in found.source
        none = discover(base_url=host.base_url, api_key="sk-test", model="my-llama", small_vocab=None)
        assert none.vocab is None and none.source.startswith("none")


def test_a_route_is_trusted_over_a_name(tok_a):
    """A model named like an OpenAI model whose server tokenizes differently is not given
    tiktoken's encoding; the small models' tokenizer is taken only when it reproduces the ids."""
    small = vocabulary_from_hf(tok_a, name="tiny")
    ids = small.encode_prompt(PROBE)
    app, seen = _host({"/tokenize": {"tokens": ids, "count": len(ids)}, "/v1/models": {"data": []}})
    with ServerThread(app) as host:
        found = discover(base_url=host.base_url, api_key="no-key", model="gpt-4o", small_vocab=small)
        assert found.vocab is small and "/tokenize" in found.source
    app, _ = _host({"/tokenize": {"tokens": ids[:-1] + [ids[-1] + 1]}, "/v1/models": {"data": []}})
    with ServerThread(app) as host:
        found = discover(base_url=host.base_url, api_key="no-key", model="gpt-4o", small_vocab=small)
        assert found.vocab is None and "no local tokenizer reproduces" in found.source
        assert "tiktoken" in found.source  # it was tried, and refused


def test_llama_cpp_python_route_shape(tok_a):
    small = vocabulary_from_hf(tok_a, name="tiny")
    ids = small.encode_prompt(PROBE)
    app, seen = _host({"/tokenize": 404, "/v1/tokenize": 404, "/extras/tokenize": {"tokens": ids}})
    with ServerThread(app) as host:
        found = discover(base_url=host.base_url, api_key="no-key", model="m", small_vocab=small)
    assert found.vocab is small and "/extras/tokenize" in found.source


@pytest.fixture(scope="module")
def server_b(tok_b, models_b):
    from blackbox_proxy.apps.model_server import create_app
    from blackbox_proxy.local.runner import ModelRunner

    with ServerThread(create_app(ModelRunner(models_b[0], tok_b, name="tiny-b"))) as server:
        yield server


def test_warning_when_nothing_is_found_and_none_opts_out(server_b, saved_a, caplog):
    """server_b serves a model with another tokenizer: nothing local reproduces its ids, so
    text prompts with one warning that names the flag; 'none' asks nothing and says nothing."""
    with caplog.at_level(logging.WARNING, logger="blackbox_proxy"):
        tuner = ProxyTuner(base_url=server_b.base_url, model="tiny-b", expert=str(saved_a["E"]),
                           anti_expert=str(saved_a["A"]), max_retries=0)
    assert tuner.hosted_vocab is None and not tuner.client.token_prompts
    warnings = [r.getMessage() for r in caplog.records if "hosted tokenizer not found" in r.getMessage()]
    assert len(warnings) == 1 and "--hosted-tokenizer" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="blackbox_proxy"):
        quiet = ProxyTuner(base_url=server_b.base_url, model="tiny-b", expert=str(saved_a["E"]),
                           anti_expert=str(saved_a["A"]), hosted_tokenizer="none", max_retries=0)
    assert quiet.hosted_vocab is None and quiet.hosted_tokenizer_source.startswith("none")
    assert not [r for r in caplog.records if "hosted tokenizer" in r.getMessage()]


def test_context_limits_are_checked_before_the_first_call(server_a, saved_a):
    """prompt + max_tokens against every model's context, before anything is paid: the tiny
    models' context is 512; the hosted one is reported by /tokenize (max_model_len)."""
    from blackbox_proxy import ConfigurationError

    with ProxyTuner(base_url=server_a.base_url, model="tiny", expert=str(saved_a["E"]),
                    anti_expert=str(saved_a["A"]), max_retries=0) as tuner:
        assert tuner.hosted_context == 512
        prompt = "word " * 100
        n = len(tuner.expert.prompt_ids(prompt=prompt))
        tuner.check_request(prompt, max_tokens=512 - n)  # fits exactly
        with pytest.raises(ConfigurationError, match=rf"context of the expert \(512 tokens\); pass max_tokens {512 - n} or less"):
            tuner.generate(prompt, max_tokens=513 - n)
        tuner.hosted_context = n + 3  # a hosted model with less room than the small ones
        with pytest.raises(ConfigurationError, match=r"context of the hosted model 'tiny' .* pass max_tokens 3 or less") as err:
            tuner.check_request(prompt, max_tokens=4)
        assert str(saved_a["E"]) not in str(err.value)  # roles and served names, not paths
