"""The command line and the servers' shared plumbing under bad input (issue 18): every user
error is one line (``error: ...``, exit 1; click's own ``Error: ...``, exit 2), checked before a
model loads or the hosted API is reached; output is strict JSON; ports, hosts and keys are
checked with the right reason."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import httpx
import pytest
from click.testing import CliRunner

from blackbox_proxy import ConfigurationError
from blackbox_proxy.__main__ import main
from blackbox_proxy.apps.model_server import create_app
from blackbox_proxy.apps.openai_http import ServerThread, check_port, free_port
from blackbox_proxy.local.runner import ModelRunner


def one_error(result, code: int = 1) -> str:
    """The single error line of a CliRunner result (no traceback)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def unreachable(*extra: str) -> list[str]:
    """generate against a port nobody listens on and a model that does not exist: anything
    that is checked first fails first."""
    return ["generate", "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--model", "tiny",
            "--anti-expert", "no-such-model", "--expert", "no-such-model", "--prompt", "Hi", *extra]


@pytest.mark.parametrize("extra, fragment", [
    (["--seed", "18446744073709551616"], "seed must be an integer from -9223372036854775808 to 9223372036854775807"),
    (["--alpha", "1e308", "--temperature", "1"], "alpha must be between -100 and 100"),
    (["--stop", "\udcff"], "a stop string is not valid Unicode text"),
    (["--timeout", "nan"], "Invalid value for '--timeout'"),
])
def test_out_of_range_options_are_one_line_before_anything_loads(extra, fragment):
    line = one_error(CliRunner().invoke(main, unreachable(*extra)), 2 if "Invalid value" in fragment else 1)
    assert fragment in line, line


def generate_args(server, saved, *extra: str) -> list[str]:
    return ["generate", "--base-url", server.base_url, "--model", "tiny", "--expert", str(saved["E"]),
            "--anti-expert", str(saved["A"]), "--expert-render", "raw", "--anti-expert-render", "raw",
            "--top-k", "8", "--max-tokens", "4", "--hosted-tokenizer", "none", *extra]


def test_a_subnormal_temperature_samples_like_greedy(server_a, saved_a):
    """--temperature 1e-320 used to divide the scores into inf and crash torch.multinomial."""
    tiny = CliRunner().invoke(main, generate_args(server_a, saved_a, "--prompt", "The quick", "--temperature",
                                                  "1e-320", "--seed", "3", "--json"))
    assert tiny.exit_code == 0, tiny.output
    greedy = CliRunner().invoke(main, generate_args(server_a, saved_a, "--prompt", "The quick", "--json"))
    assert json.loads(tiny.stdout)["text"] == json.loads(greedy.stdout)["text"]


def test_a_prompt_with_a_byte_that_is_not_utf8(server_a, saved_a):
    """argv holds the byte as a surrogate escape; it used to reach the tokenizer (TypeError)."""
    command = [sys.executable, "-m", "blackbox_proxy", *generate_args(server_a, saved_a, "--prompt")]
    done = subprocess.run([*command, b"caf\xe9 au lait"], capture_output=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    stderr = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines() == ["error: the prompt is not valid Unicode text: a lone surrogate '\\udce9' at "
                                           "character 3 (from the command line: a byte that is not UTF-8); pass UTF-8 text"]


@pytest.mark.parametrize("args", [
    ["serve-model", "no-such-model", "--port", "70000"],
    ["serve-model", "no-such-model", "--port", "0"],
    ["serve", "--anti-expert", "x", "--port", "65536"],
    ["demo", "--port", "-1"],
])
def test_ports_are_1_to_65535_on_every_command(args):
    line = one_error(CliRunner().invoke(main, args), 2)
    assert "Invalid value for '--port'" in line and "1<=x<=65535" in line


def test_generate_json_is_strict_json(monkeypatch):
    """A candidate the small models cannot say is traced with expert/anti-expert logprob -inf
    (delta nan); --json used to print `-Infinity` and `NaN`, which are not JSON."""
    import math

    from blackbox_proxy import tuner as tuner_module
    from blackbox_proxy.types import CandidateTrace, GenerationResult, StepTrace, Usage

    silent = CandidateTrace(text="<x>", hosted_logprob=-2.5, expert_logprob=-math.inf, anti_expert_logprob=-math.inf,
                            delta=math.nan, score=-math.inf, prob=0.0)
    said = CandidateTrace(text=" fox", hosted_logprob=-0.1, expert_logprob=-1.0, anti_expert_logprob=-2.0,
                          delta=1.0, score=0.9, prob=1.0)
    step = StepTrace(index=0, candidates=(said, silent), chosen=0, chosen_text=" fox", alignment="ids",
                     api_seconds=0.01, scoring_seconds=0.01)
    result = GenerationResult(text=" fox", finish_reason="length", usage=Usage(api_calls=1, generated_tokens=1),
                              trace=(step,))

    class Tuner:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def generate(self, *, request):
            return result

    monkeypatch.setattr(tuner_module, "ProxyTuner", Tuner)
    out = CliRunner().invoke(main, unreachable("--json"))
    assert out.exit_code == 0, out.output

    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    data = json.loads(out.stdout, parse_constant=refuse)
    assert data["trace"][0]["candidates"][1] == {**data["trace"][0]["candidates"][1], "expert_logprob": None,
                                                 "delta": None, "score": None}
    assert data["trace"][0]["candidates"][0]["delta"] == 1.0 and data["text"] == " fox"


# ----- serve: the defaults are checked at startup, before the hosted API or a model -----------------


@pytest.mark.parametrize("extra, fragment", [
    (["--alpha", "nan"], "alpha must be a finite number, got nan"),
    (["--alpha", "1e9"], "alpha must be between -100 and 100"),
    (["--max-tokens", "5000"], "--max-tokens 5000 (for requests that give none) is above --max-tokens-limit 4096"),
    (["--api-key", " "], "--api-key is empty"),
])
def test_serve_checks_its_defaults_before_reaching_the_host(extra, fragment):
    args = ["serve", "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--model", "tiny", "--expert", "x",
            "--anti-expert", "x", "--port", str(free_port()), *extra]
    line = one_error(CliRunner().invoke(main, args))
    assert fragment in line, line  # not "cannot reach": the host was never asked


# ----- ports and hosts: the right reason --------------------------------------------------------------


def test_a_port_left_in_time_wait_counts_as_free():
    """A server that just stopped leaves its port in TIME_WAIT; uvicorn binds with SO_REUSEADDR,
    so the port check must too (it used to say 'in use' for about a minute)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end goes to TIME_WAIT
    listener.close()
    client.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the old check did
    check_port("127.0.0.1", port)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ConfigurationError, match=f"port {busy.getsockname()[1]} on 127.0.0.1 is in use.*--port"):
            check_port("127.0.0.1", busy.getsockname()[1])


def test_hosts_get_the_right_reason():
    args = ["serve-model", "no-such-model-folder", "--port", str(free_port())]
    ipv6 = one_error(CliRunner().invoke(main, args + ["--host", "::1"]))
    assert ipv6.startswith("error: cannot load 'no-such-model-folder'")  # the port check passed
    invalid = one_error(CliRunner().invoke(main, args + ["--host", "a" * 64 + ".example"]))
    assert "the host does not resolve" in invalid and "--host" in invalid and "--port" not in invalid
    foreign = one_error(CliRunner().invoke(main, args + ["--host", "192.0.2.1"]))  # TEST-NET-1: not ours
    assert "192.0.2.1: it is not an address of this machine" in foreign and "--host" in foreign


# ----- a server's key: not in `ps`, and guarding the API description too -----------------------------


@pytest.fixture()
def captured_app(monkeypatch, tok_a, models_a):
    """serve-model with the tiny model and uvicorn.run replaced: the app it would serve."""
    import uvicorn

    apps = []
    monkeypatch.setattr(ModelRunner, "from_pretrained",
                        classmethod(lambda cls, *a, **k: ModelRunner(models_a[0], tok_a, name="tiny")))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    return apps


KEY = "srv-key-0123456789abcdef"


def test_server_key_from_a_file_or_the_environment_and_a_warning_on_the_command_line(tmp_path, captured_app,
                                                                                     monkeypatch):
    base = ["serve-model", "tiny", "--port", str(free_port())]
    loud = CliRunner().invoke(main, base + ["--api-key", KEY])
    assert loud.exit_code == 0, loud.output
    assert "warning: --api-key on the command line shows in `ps`" in loud.stderr and KEY not in loud.stderr
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    quiet = CliRunner().invoke(main, base + ["--api-key-file", str(key_file)])
    assert quiet.exit_code == 0 and "warning" not in quiet.stderr, quiet.output
    monkeypatch.setenv("BLACKBOX_PROXY_SERVER_KEY", KEY)
    from_env = CliRunner().invoke(main, base)
    assert from_env.exit_code == 0 and "warning" not in from_env.stderr, from_env.output
    monkeypatch.delenv("BLACKBOX_PROXY_SERVER_KEY")
    both = one_error(CliRunner().invoke(main, base + ["--api-key", KEY, "--api-key-file", str(key_file)]))
    assert "pass --api-key or --api-key-file, not both" in both
    (tmp_path / "empty").write_text("\n")
    assert "is empty" in one_error(CliRunner().invoke(main, base + ["--api-key-file", str(tmp_path / "empty")]))
    missing = one_error(CliRunner().invoke(main, base + ["--api-key-file", str(tmp_path / "none")]))
    assert "cannot read --api-key-file" in missing
    with ServerThread(captured_app[1]) as server:  # the key read from the file guards the routes
        root = server.base_url.removesuffix("/v1")
        assert httpx.get(f"{server.base_url}/models").status_code == 401
        assert httpx.get(f"{server.base_url}/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


def test_the_api_description_needs_the_key_when_one_is_set(tok_a, models_a):
    """/docs, /redoc and /openapi.json used to answer without the key."""
    runner = ModelRunner(models_a[0], tok_a, name="tiny")
    with ServerThread(create_app(runner, api_key=KEY)) as keyed, ServerThread(create_app(runner)) as open_:
        for path in ("/docs", "/redoc", "/openapi.json"):
            url = keyed.base_url.removesuffix("/v1") + path
            assert httpx.get(url).status_code == 401, path
            assert httpx.get(url, headers={"authorization": f"Bearer {KEY}"}).status_code == 200, path
            assert httpx.get(open_.base_url.removesuffix("/v1") + path).status_code == 200, path
