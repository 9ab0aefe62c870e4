"""The command line: JSON output equals the library call; errors are one line and exit 1;
``serve-model`` runs as a real subprocess on loopback and stops cleanly."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest
from click.testing import CliRunner

from blackbox_proxy import ProxyTuner, Scorer
from blackbox_proxy.apps.cli import main
from blackbox_proxy.apps.openai_http import free_port


def test_generate_json_equals_library(server_a, saved_a):
    args = ["generate", "--base-url", server_a.base_url, "--model", "tiny", "--expert", str(saved_a["E"]),
            "--anti-expert", str(saved_a["A"]), "--prompt", "The quick brown", "--max-tokens", "6",
            "--hosted-tokenizer", str(saved_a["L"]), "--top-k", "50", "--json"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert set(data) >= {"text", "usage", "trace", "finish_reason", "settings"}
    # the default (auto) is speculative on a host that continues: fewer calls, one trace step per token
    assert data["settings"]["strategy"] == "speculative" and "continues a prefix" in data["settings"]["strategy_reason"]
    assert len(data["trace"]) == 6 and data["usage"]["api_calls"] < 6
    step = data["trace"][0]
    assert {"hosted_logprob", "delta", "prob"} <= set(step["candidates"][0])
    lib = ProxyTuner(base_url=server_a.base_url, model="tiny", hosted_tokenizer=str(saved_a["L"]), top_k=50,
                     expert=Scorer.from_pretrained(str(saved_a["E"]), render="raw"),
                     anti_expert=Scorer.from_pretrained(str(saved_a["A"]), render="raw"))  # the CLI default here
    assert lib.generate("The quick brown", max_tokens=6).text == data["text"]


def test_generate_plain_output_and_usage_line(server_a, saved_a):
    args = ["generate", "--base-url", server_a.base_url, "--model", "tiny", "--expert", str(saved_a["E"]),
            "--anti-expert", str(saved_a["A"]), "--prompt", "Hi", "--max-tokens", "3", "--strategy", "per-step"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    # per-step: one call per token, and a greedy step's call beyond the top-k where a tail token may win
    found = re.search(r"\[3 tokens, (\d+) API calls(?: \((\d+) beyond the top-k\))?,", out.stderr)
    assert found and int(found[1]) - int(found[2] or 0) == 3, out.stderr


@pytest.mark.slow
def test_cli_errors_are_one_line(saved_a):
    port = free_port()
    args = ["generate", "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "tiny", "--expert",
            str(saved_a["E"]), "--anti-expert", str(saved_a["A"]), "--prompt", "Hi", "--api-key", "sk-cli-secret-999"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach")
    assert "sk-cli-secret-999" not in out.output


@pytest.mark.slow
def test_serve_model_subprocess(saved_a):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "blackbox_proxy", "serve-model", str(saved_a["L"]),
                             "--port", str(port), "--name", "tiny-l"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.3)
        assert models["data"][0]["id"] == "tiny-l"
        # a second server on the same port: clean one-line error
        busy = subprocess.run([sys.executable, "-m", "blackbox_proxy", "serve-model", str(saved_a["L"]),
                               "--port", str(port)], env=env, capture_output=True, text=True, timeout=120)
        assert busy.returncode == 1
        assert busy.stderr.strip() == f"error: port {port} on 127.0.0.1 is in use by another program; pick another with --port"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))  # nobody listens any more: the server was stopped


def test_generate_speculative_json(server_a, saved_a):
    args = ["generate", "--base-url", server_a.base_url, "--model", "tiny", "--expert", str(saved_a["E"]),
            "--anti-expert", str(saved_a["A"]), "--prompt", "The quick brown", "--max-tokens", "10",
            "--hosted-tokenizer", str(saved_a["L"]), "--strategy", "speculative", "--chunk", "4",
            "--temperature", "1", "--seed", "3", "--json"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["settings"]["strategy"] == "speculative" and data["settings"]["chunk"] == 4
    assert data["chunks"] and {"drawn", "accepted", "rejected_at", "replacement", "accept_probs"} <= set(data["chunks"][0])
    assert 0 <= data["usage"]["acceptance_rate"] <= 1 and data["usage"]["calls_per_token"] > 0


@pytest.mark.slow
def test_serve_subprocess_with_a_config_file(tmp_path, server_a, saved_a):
    """`blackbox-proxy serve --config FILE` as a real process; flags win over the file; the SDK
    gets the library's answer; the process stops when told."""
    import openai

    port = free_port()
    config = tmp_path / "serve.toml"
    config.write_text(
        f'[serve]\nbase-url = "{server_a.base_url}"\nmodel = "tiny"\nexpert = "{saved_a["E"]}"\n'
        f'anti_expert = "{saved_a["A"]}"\nexpert_render = "raw"\nanti_expert_render = "raw"\ntop_k = 8\n'
        f'alpha = 2.0\nport = 1\nname = "tiny-tuned"\n'
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", BLACKBOX_PROXY_SERVER_KEY="cfg-key-123456")
    proc = subprocess.Popen([sys.executable, "-m", "blackbox_proxy", "serve", "--config", str(config),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cfg-key-123456", max_retries=0)
        resp = client.completions.create(model="tiny-tuned", prompt="The quick brown", max_tokens=6, temperature=0)
        library = ProxyTuner(base_url=server_a.base_url, model="tiny", top_k=8, max_retries=0,
                             expert=Scorer.from_pretrained(str(saved_a["E"]), render="raw"),
                             anti_expert=Scorer.from_pretrained(str(saved_a["A"]), render="raw"))
        assert resp.choices[0].text == library.generate("The quick brown", max_tokens=6, alpha=2.0).text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "tiny"\nalpah = 2\n')
    result = CliRunner().invoke(main, ["serve", "--config", str(bad), "--anti-expert", "x"])
    assert result.exit_code == 2 and "unknown setting(s) alpah" in result.output
    bad.write_text('model = "tiny"\napi_key = "sk-in-a-file"\n')
    result = CliRunner().invoke(main, ["serve", "--config", str(bad), "--anti-expert", "x"])
    assert result.exit_code == 2 and "keep keys in the environment" in result.output


def test_generation_flags_are_the_request_objects_fields():
    """One definition: every GenerationRequest option is a flag of generate and batch with the
    request's default, and the values go back as request keywords."""
    from blackbox_proxy.apps.cli import batch, generate, serve
    from blackbox_proxy.apps.cli_options import request_options
    from blackbox_proxy.request import OPTION_NAMES, GenerationRequest

    for command in (generate, batch):
        defaults = {p.name: p.default for p in command.params}
        for name in OPTION_NAMES:
            assert defaults[name] == GenerationRequest.model_fields[name].default, (command.name, name)
    serve_defaults = {p.name: p.default for p in serve.params}
    assert serve_defaults["max_tokens"] == 256 and serve_defaults["strategy"] == "auto"
    assert "temperature" not in serve_defaults  # a request's own field, not a server default
    assert request_options({"alpha": 2.0, "stop": ("\n",), "verbose": 1}) == {"alpha": 2.0, "stop": ["\n"]}


@pytest.mark.parametrize("extra, fragment", [
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--strategy", "speculative", "--temperature", "0.5"], "the speculative strategy samples"),
    (["--samples", "3"], "samples is for --strategy resample"),
    (["--strategy", "white-box", "--base", "no-such-model", "--alpha", "nan"], "alpha must be a finite number"),
])
def test_bad_options_fail_before_the_api_or_a_model_is_touched(extra, fragment):
    """The request is built first: nothing listens on the port and no model exists, yet the
    message is about the option."""
    args = ["generate", "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--model", "tiny",
            "--anti-expert", "no-such-model", "--prompt", "Hi"]
    out = CliRunner().invoke(main, args + extra)
    assert out.exit_code == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], out.stderr
