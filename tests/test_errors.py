"""Every failure a user can cause: the right error class and a one-line message with the fix."""

import math

import pytest

from blackbox_proxy import (
    ConfigurationError,
    HostedBadRequestError,
    HostedConnectionError,
    HostedModelNotFoundError,
    ProxyTuner,
    Scorer,
    TokenizerMismatchError,
)
from blackbox_proxy.apps.openai_http import free_port

SECRET = "sk-test-SECRET-abcdef123456"


def tuner(server, scorers, **kw):
    args = dict(base_url=server.base_url, model="tiny", expert=scorers[0], anti_expert=scorers[1], max_retries=0,
                api_key=SECRET)
    args.update(kw)
    return ProxyTuner(**args)


def one_line(exc):
    text = str(exc)
    assert "\n" not in text and SECRET not in text
    return text


def test_unreachable_url(scorers_a):
    port = free_port()
    t = ProxyTuner(base_url=f"http://127.0.0.1:{port}/v1", model="tiny", expert=scorers_a[0],
                   anti_expert=scorers_a[1], max_retries=1, api_key=SECRET, timeout=5)
    with pytest.raises(HostedConnectionError) as info:
        t.generate("Hello", max_tokens=2)
    msg = one_line(info.value)
    assert "cannot reach" in msg and "--base-url" in msg


def test_unknown_model(server_a, scorers_a):
    with pytest.raises(HostedModelNotFoundError) as info:
        tuner(server_a, scorers_a, model="gpt-17").generate("Hello", max_tokens=2)
    msg = one_line(info.value)
    assert "'gpt-17'" in msg and "serves: tiny" in msg and "--model" in msg


def test_k_above_server_cap(server_capped, scorers_a):
    with pytest.raises(HostedBadRequestError) as info:
        tuner(server_capped, scorers_a, top_k=10).generate("Hello", max_tokens=2)
    msg = one_line(info.value)
    assert "at most 5" in msg and "lower --top-k" in msg


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf, "1"])
def test_alpha_not_finite(server_a, scorers_a, alpha):
    with pytest.raises(ConfigurationError, match="alpha must be a finite number"):
        tuner(server_a, scorers_a).generate("Hello", alpha=alpha)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"prompt": ""}, "the prompt is empty"),
        ({"prompt": "   "}, "the prompt is empty"),
        ({"prompt": "Hi", "temperature": -1.0}, "temperature must be"),
        ({"prompt": "Hi", "top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"prompt": "Hi", "strategy": "beam"}, "strategy must be one of auto, per-step"),
        ({"prompt": "Hi", "tail_calls": 9}, "tail_calls must be an integer from 0 to 8"),
    ],
)
def test_bad_generation_arguments(server_a, scorers_a, kwargs, fragment):
    prompt = kwargs.pop("prompt", None)
    with pytest.raises(ConfigurationError) as info:
        tuner(server_a, scorers_a).generate(prompt, **kwargs)
    assert fragment in one_line(info.value)


def test_bad_constructor_arguments(server_a, scorers_a):
    with pytest.raises(ConfigurationError, match="top_k must be an integer >= 1"):
        tuner(server_a, scorers_a, top_k=0)
    with pytest.raises(ConfigurationError, match="mode must be one of"):
        tuner(server_a, scorers_a, mode="legacy")


def test_chat_mode_goes_past_the_first_token_by_instruction(server_a, scorers_a):
    # plain chat cannot continue a partial answer: each position after the first is asked by
    # instruction (the tiny model does not copy, so its answers to 'continue' are used, and noted)
    r = tuner(server_a, scorers_a, mode="chat").generate("Hello", max_tokens=5, strategy="per-step")
    assert r.usage.generated_tokens == 5 and r.finish_reason == "length"
    assert any("did not copy the answer so far" in note for note in r.notes)


def test_expert_and_anti_expert_must_share_a_tokenizer(server_a, scorers_a, scorers_b):
    with pytest.raises(TokenizerMismatchError) as info:
        tuner(server_a, (scorers_a[0], scorers_b[1]))
    assert "different tokenizers" in one_line(info.value)


def test_missing_model_folder(server_a, scorers_a, tmp_path):
    from blackbox_proxy import ModelLoadError

    with pytest.raises(ModelLoadError) as info:
        tuner(server_a, (str(tmp_path / "nope"), scorers_a[1]))
    assert "cannot load" in one_line(info.value)


def test_prompt_longer_than_small_model_context(server_a, tok_a, models_a):
    small = Scorer(models_a[1], tok_a, render="raw", name="E")
    with pytest.raises(ConfigurationError, match="whose context is 512"):
        small.prompt_ids(prompt="word " * 2000)


def test_k_outside_the_modes_range_for_a_known_host(server_a, scorers_a):
    """OpenAI's caps are known: 5 on /v1/completions, 20 on chat; refused before any call."""
    with pytest.raises(ConfigurationError) as info:
        tuner(server_a, scorers_a, top_k=6, dialect="openai").generate("Hello", max_tokens=2)
    assert "top_k 6 is above what openai allows in completions mode (5)" in one_line(info.value)
    with pytest.raises(ConfigurationError) as info:
        tuner(server_a, scorers_a, top_k=21, dialect="openai", mode="chat").generate("Hello", max_tokens=1)
    assert "(20); pass --top-k 20 or less" in one_line(info.value)


@pytest.mark.parametrize("stop", [5, ["ok", ""], [None]])
def test_bad_stop(server_a, scorers_a, stop):
    with pytest.raises(ConfigurationError, match="stop must be a string or a list of non-empty strings"):
        tuner(server_a, scorers_a).generate("Hello", stop=stop)


def test_generate_names_the_small_model_whose_context_is_too_short(server_a, scorers_a):
    with pytest.raises(ConfigurationError) as info:
        tuner(server_a, scorers_a).generate("word " * 2000, max_tokens=2)
    assert "for E, whose context is 512; shorten it" in one_line(info.value)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--alpha", "inf"], "alpha must be a finite number"),
        (["--alpha", "nan"], "alpha must be a finite number"),
        (["--temperature", "-0.5"], "temperature must be a finite number >= 0"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-k", "0"], "--top-k"),
        (["--strategy", "beam"], "--strategy"),
        (["--prompt", "  "], "the prompt is empty"),
    ],
)
def test_cli_validation_is_one_line(server_a, saved_a, args, fragment):
    from click.testing import CliRunner

    from blackbox_proxy.apps.cli import main

    base = ["generate", "--base-url", server_a.base_url, "--model", "tiny", "--expert", str(saved_a["E"]),
            "--anti-expert", str(saved_a["A"]), "--prompt", "Hello", "--max-tokens", "2"]
    result = CliRunner().invoke(main, base + args, env={"OPENAI_API_KEY": SECRET})
    assert result.exit_code != 0
    message = result.output.strip().splitlines()[-1]
    assert fragment in message and SECRET not in result.output
