"""The API key never reaches a log (even at -vv), a trace, a cache file, a result or error file,
an exception message or the console: every byte a run wrote is searched for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blackbox_proxy import HostedAuthenticationError, HostedBadRequestError, ProxyTuner
from blackbox_proxy.apps.model_server import create_app
from blackbox_proxy.apps.openai_http import ServerThread
from blackbox_proxy.local.runner import ModelRunner

from faults import FaultyApp

SECRET = "sk-live-LEAKCHECK-7f3a9c1e5b2d4680"
WRONG = "sk-live-WRONGKEY-0a1b2c3d4e5f6789"


@pytest.fixture(scope="module")
def keyed_server(tok_a, models_a):
    runner = ModelRunner(models_a[0], tok_a, name="tiny")
    app = FaultyApp(create_app(runner, max_top_logprobs=len(tok_a), api_key=SECRET), rate=0.0)
    with ServerThread(app) as server:
        server.faults = app
        yield server


def leaks(root: Path, *texts: str) -> list[str]:
    """Where SECRET or WRONG appears: files under root (any bytes) and the given texts."""
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for key in (SECRET, WRONG):
                if key.encode() in data or key.encode("utf-16-le") in data:
                    found.append(f"{path.name} holds {key[:12]}...")
    for i, text in enumerate(texts):
        for key in (SECRET, WRONG):
            if key in text:
                found.append(f"text {i} holds {key[:12]}...")
    return found


@pytest.mark.slow
def test_no_file_or_console_output_holds_the_key(tmp_path, keyed_server, saved_a):
    runs = tmp_path / "run"
    runs.mkdir()
    inp = runs / "in.jsonl"
    inp.write_text("\n".join(json.dumps({"id": i, "prompt": p}) for i, p in
                             enumerate(["The quick", "A café", "Numbers: 1", "She said"])) + "\n", encoding="utf-8")
    out = runs / "out.jsonl"
    base = [sys.executable, "-m", "blackbox_proxy", "batch", "-vv", "--base-url", keyed_server.base_url,
            "--model", "tiny", "--expert", str(saved_a["E"]), "--anti-expert", str(saved_a["A"]),
            "--expert-render", "raw", "--anti-expert-render", "raw", "--top-k", "8", "--max-tokens", "4",
            "--hosted-tokenizer", "none",  # the fault script below counts requests: no discovery probes
            "--input", str(inp), "--output", str(out), "--cache", str(runs / "cache.sqlite"), "--trace",
            "--concurrency", "1", "--on-error", "skip", "--no-progress"]
    # /v1/models passes; the first completion is a 400 that quotes the Authorization header back,
    # the next a 500 (retried, logged at debug level).
    keyed_server.faults.script = ["ok", "echo-key", "500"]
    env = dict(os.environ, OPENAI_API_KEY=SECRET)
    first = subprocess.run(base, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 1, first.stderr[-3000:]  # one prompt failed (on purpose)
    errors = (runs / "out.jsonl.errors.jsonl").read_text()
    assert "Bearer ***" in errors  # the server's message kept, the key masked
    assert "DEBUG" in first.stderr and "retry" in first.stderr  # debug logs were on
    second = subprocess.run(base, capture_output=True, text=True, timeout=300, env=env)  # resumes the failed one
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(out.read_text().splitlines()) == 4
    out.unlink()  # force the wrong-key run to call the API
    wrong = subprocess.run(base, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OPENAI_API_KEY=WRONG))
    assert wrong.returncode == 1 and "rejected the API key" in wrong.stderr
    assert leaks(runs, first.stdout, first.stderr, second.stdout, second.stderr, wrong.stdout, wrong.stderr) == []
    assert (runs / "cache.sqlite").exists() and out.exists() is False


def test_exceptions_and_reprs_hold_no_key(keyed_server, scorers_a, tok_a):
    with pytest.raises(HostedAuthenticationError) as info:
        ProxyTuner(base_url=keyed_server.base_url, model="tiny", expert=scorers_a[0], anti_expert=scorers_a[1],
                   api_key=WRONG, max_retries=0).generate("The quick", max_tokens=2)
    assert WRONG not in str(info.value) and WRONG not in repr(info.value)
    tuner = ProxyTuner(base_url=keyed_server.base_url, model="tiny", expert=scorers_a[0], anti_expert=scorers_a[1],
                       api_key=SECRET, max_retries=0, top_k=4)
    assert SECRET not in repr(tuner.client)
    result = tuner.generate("The quick", max_tokens=2)
    assert SECRET not in json.dumps(result.to_dict())
    keyed_server.faults.script = ["echo-key"]
    with pytest.raises(HostedBadRequestError) as info:
        tuner.generate("The quick", max_tokens=2)
    assert SECRET not in str(info.value) and "Bearer ***" in str(info.value)


def test_placeholders_and_short_words_are_not_masked(tmp_path, server_a, scorers_a, tok_a):
    """The default key "no-key" and short keys like "test" are not secrets to hunt for: masking
    them everywhere would garble logs, and results whose ids or texts contain them."""
    import asyncio

    from blackbox_proxy import AsyncProxyTuner
    from blackbox_proxy._logging import redact, register_secret
    from blackbox_proxy.apps.batch import arun_batch, read_done

    for word in ("no-key", "test", "EMPTY"):
        register_secret(word)
        assert redact(f"a {word} b") == f"a {word} b"
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "no-key-1", "prompt": "The quick"}) + "\n")
    out = tmp_path / "out.jsonl"

    async def main():
        async with AsyncProxyTuner(base_url=server_a.base_url, model="tiny", expert=scorers_a[0],
                                   anti_expert=scorers_a[1], top_k=4, max_retries=0) as tuner:
            return await arun_batch(tuner, inp, out, progress=False, max_tokens=2)

    asyncio.run(main())
    assert read_done(out) == {'"no-key-1"'}  # the id survived: a rerun will not answer it twice
