"""Batch runs: input validation with line numbers, resumption after a crash (SIGKILL), results
equal to a fault-free run when 20% of API requests fail, and the response cache."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blackbox_proxy import AsyncProxyTuner, ConfigurationError
from blackbox_proxy.apps.batch import BatchInputError, arun_batch, read_done, read_items
from blackbox_proxy.apps.model_server import create_app
from blackbox_proxy.apps.openai_http import ServerThread
from blackbox_proxy.local.runner import ModelRunner

from faults import FaultyApp

WORDS = ["The quick", "A café", "Numbers:", "Question:", "def add", "She said", "There are", "日本語の"]


def write_prompts(path: Path, n: int, *, sampled_every: int = 2) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            line = {"id": f"p{i}", "prompt": f"{WORDS[i % len(WORDS)]} {i}", "ref": i}
            if i % sampled_every == 1:  # seeded speculative sampling for every other prompt
                line.update(strategy="speculative", temperature=1.0, seed=i, max_tokens=6)
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


def results(path: Path) -> dict[str, dict]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        assert record["id"] not in out, f"id {record['id']} answered twice"
        out[record["id"]] = record
    return out


def run(server, scorers, tok, inp, out, **kw):
    tuner_kw = dict(base_url=server.base_url, model="tiny", expert=scorers[0], anti_expert=scorers[1], top_k=8,
                    hosted_tokenizer=tok, max_retries=kw.pop("max_retries", 2), timeout=kw.pop("timeout", 30.0),
                    cache=kw.pop("cache", None))

    async def main():
        async with AsyncProxyTuner(**tuner_kw) as tuner:
            return await arun_batch(tuner, inp, out, progress=False, max_tokens=4, **kw)

    return asyncio.run(main())


# ----- input checking and resumption -----------------------------------------------------------


def test_malformed_lines_are_reported_with_their_line_numbers(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        '{"id": 1, "prompt": "ok"}\n'
        "\n"
        '{"id": 2, "prompt": "cut\n'
        '["not", "an", "object"]\n'
        '{"id": 3}\n'
        '{"id": 4, "prompt": "a", "messages": [{"role": "user", "content": "b"}]}\n'
        '{"id": 1, "prompt": "again"}\n'
        '{"id": true, "prompt": "x"}\n'
        '{"prompt": "no id: the line number is the id"}\n',
        encoding="utf-8",
    )
    with pytest.raises(BatchInputError) as info:
        read_items(inp, on_error="stop")
    msg = str(info.value)
    assert "\n" not in msg
    for fragment in ["line 3: not valid JSON", "line 4: expected a JSON object", "line 5: needs exactly one of",
                     "line 6: needs exactly one of", "line 7: id 1 repeats line 1", "line 8: id must be",
                     "--on-error skip"]:
        assert fragment in msg, fragment
    items, problems = read_items(inp, on_error="skip")
    assert [item.id for item in items] == [1, 9] and len(problems) == 6


def test_torn_last_line_is_removed_and_done_ids_are_read(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "a", "text": "x", "finish_reason": "stop"}\n{"id": 2, "text": "y", "finish_reason": "stop"}\n'
                    b'{"id": "c", "te')
    assert read_done(out) == {'"a"', "2"}
    assert out.read_bytes().endswith(b'"stop"}\n')
    out.write_bytes(b'{"id": "a", "text": "x", "finish_reason": "length"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ConfigurationError, match="line 2 is not a result line"):
        read_done(out)


def test_bad_values_stop_before_any_api_call_or_are_skipped(tmp_path, server_a, scorers_a, tok_a):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "ok", "prompt": "The quick"}\n{"id": "bad", "prompt": "The dog", "top_p": 1.5}\n'
                   '{"id": "bad2", "prompt": "A café", "strategy": "beam"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    with pytest.raises(BatchInputError) as info:
        run(server_a, scorers_a, tok_a, inp, out)
    assert "line 2 (id 'bad'): top_p must be in (0, 1]" in str(info.value)
    assert not out.exists()  # nothing was generated
    summary = run(server_a, scorers_a, tok_a, inp, out, on_error="skip")
    assert summary.written == 1 and summary.bad_lines == 2
    assert list(results(out)) == ["ok"]


def test_second_run_skips_done_ids_and_extra_fields_are_copied(tmp_path, server_a, scorers_a, tok_a):
    inp = write_prompts(tmp_path / "in.jsonl", 6)
    out = tmp_path / "out.jsonl"
    first = run(server_a, scorers_a, tok_a, inp, out, concurrency=3)
    assert first.written == 6
    again = run(server_a, scorers_a, tok_a, inp, out, concurrency=3)
    assert again.written == 0 and again.skipped_done == 6
    got = results(out)
    assert sorted(got) == [f"p{i}" for i in range(6)]
    assert got["p4"]["ref"] == 4 and got["p4"]["usage"]["api_calls"] >= 1


# ----- faults ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty_server(tok_a, models_a):
    runner = ModelRunner(models_a[0], tok_a, name="tiny")
    app = FaultyApp(create_app(runner, max_top_logprobs=len(tok_a)), rate=0.2, seed=7, hang=1.5)
    with ServerThread(app) as server:
        server.faults = app
        yield server


@pytest.mark.slow
def test_200_prompts_through_20_percent_faults_equal_a_fault_free_run(tmp_path, server_a, faulty_server,
                                                                      scorers_a, tok_a):
    inp = write_prompts(tmp_path / "in.jsonl", 200)
    clean = tmp_path / "clean.jsonl"
    faulty = tmp_path / "faulty.jsonl"
    run(server_a, scorers_a, tok_a, inp, clean, concurrency=8)
    summary = run(faulty_server, scorers_a, tok_a, inp, faulty, concurrency=8, max_retries=10, timeout=1.0)
    counts = faulty_server.faults.counts
    assert all(counts[kind] > 5 for kind in ("429", "500", "timeout", "truncated")), counts
    assert 0.1 < sum(counts[k] for k in ("429", "500", "timeout", "truncated")) / counts["requests"] < 0.3
    assert summary.written == 200 and summary.failed == 0
    want, got = results(clean), results(faulty)
    assert len(got) == 200 and set(got) == set(want)
    assert {i: (r["text"], r["finish_reason"]) for i, r in got.items()} == \
           {i: (r["text"], r["finish_reason"]) for i, r in want.items()}


def test_missing_logprobs_are_asked_again_once_then_reported(tmp_path, faulty_server, scorers_a, tok_a):
    from blackbox_proxy import HostedResponseError, ProxyTuner

    faulty = faulty_server.faults
    faulty.rate, saved = 0.0, faulty.rate
    try:
        tuner = ProxyTuner(base_url=faulty_server.base_url, model="tiny", expert=scorers_a[0],
                           anti_expert=scorers_a[1], top_k=8, hosted_tokenizer=tok_a, max_retries=0)
        # per-step: whole (not streamed) answers, which is what the fault rewrites
        reference = tuner.generate("The quick", max_tokens=3, strategy="per-step")
        faulty.script = ["no-logprobs"]
        assert tuner.generate("The quick", max_tokens=3, strategy="per-step").text == reference.text
        faulty.script = ["no-logprobs", "no-logprobs"]
        with pytest.raises(HostedResponseError) as info:
            tuner.generate("The quick", max_tokens=3, strategy="per-step")
        assert "asked 2 times" in str(info.value) and "\n" not in str(info.value)
    finally:
        faulty.rate, faulty.script = saved, []


def test_cache_answers_repeated_requests_without_calls(tmp_path, faulty_server, scorers_a, tok_a):
    """One generation at a time: with several in flight, which contexts share a scoring forward
    depends on timing, which can change the last bits of an offset and flip a near tie, and then
    the second run asks a request the first never did (a cache miss that is correct behaviour)."""
    faulty = faulty_server.faults
    faulty.rate, saved = 0.0, faulty.rate
    try:
        inp = write_prompts(tmp_path / "in.jsonl", 6)
        cache = tmp_path / "cache.sqlite"
        before = faulty.counts["requests"]
        run(faulty_server, scorers_a, tok_a, inp, tmp_path / "a.jsonl", cache=cache, concurrency=1)
        paid = faulty.counts["requests"] - before
        before = faulty.counts["requests"]
        run(faulty_server, scorers_a, tok_a, inp, tmp_path / "b.jsonl", cache=cache, concurrency=1)
        assert faulty.counts["requests"] - before == 1  # only /v1/models; every completion came from the cache
        assert paid > 6
        first, second = results(tmp_path / "a.jsonl"), results(tmp_path / "b.jsonl")
        assert {k: v["text"] for k, v in first.items()} == {k: v["text"] for k, v in second.items()}
    finally:
        faulty.rate = saved


def _writer(path: str, start: int, count: int) -> None:
    from blackbox_proxy.hosts.cache import ResponseCache

    cache = ResponseCache(path)
    for i in range(start, start + count):
        cache.put(cache.key("http://x/v1", "completions", {"i": i}), json.dumps({"i": i}))
    cache.close()


@pytest.mark.slow
def test_cache_is_safe_under_concurrent_writer_processes(tmp_path):
    import multiprocessing

    from blackbox_proxy.hosts.cache import ResponseCache

    path = str(tmp_path / "cache.sqlite")
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_writer, args=(path, 100 * w - 50 * (w > 0), 100)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = ResponseCache(path)
    keys = range(0, 350)  # writers overlap by 50 keys: the first answer stays
    assert len(cache) == 350
    assert all(json.loads(cache.get(cache.key("http://x/v1", "completions", {"i": i})))["i"] == i for i in keys)
    cache.close()
    (tmp_path / "junk").write_text("not a database " * 100)
    with pytest.raises(ConfigurationError, match="not a usable response cache"):
        ResponseCache(tmp_path / "junk")


# ----- a real crash ---------------------------------------------------------------------------


def cli(*args):
    return [sys.executable, "-m", "blackbox_proxy", *args]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_one_result_per_id(tmp_path, server_a, saved_a):
    inp = write_prompts(tmp_path / "in.jsonl", 40)
    out = tmp_path / "out.jsonl"
    command = cli("batch", "--base-url", server_a.base_url, "--model", "tiny", "--expert", str(saved_a["E"]),
                  "--anti-expert", str(saved_a["A"]), "--expert-render", "raw", "--anti-expert-render", "raw",
                  "--top-k", "8", "--max-tokens", "6", "--concurrency", "4", "--input", str(inp),
                  "--output", str(out), "--no-progress")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    done_before = out.read_bytes().count(b"\n")
    assert 5 <= done_before < 40
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"[40 prompts: {40 - done_before} written, {done_before} already done" in finished.stderr
    got = results(out)  # valid JSONL, each id once
    assert sorted(got) == sorted(f"p{i}" for i in range(40))


def test_a_line_becomes_one_request_with_the_runs_defaults(tmp_path):
    """Messages are checked when the file is read (before any model loads); a line's options
    win over the run's defaults only when the two are merged into a GenerationRequest."""
    from blackbox_proxy.request import GenerationRequest, Message

    inp = tmp_path / "in.jsonl"
    inp.write_text(
        '{"id": "m", "messages": [{"role": "user", "content": "Hi", "name": "x"}], "samples": 4, "note": 1}\n'
        '{"id": "blank", "messages": [{"role": "user", "content": "  "}]}\n'
        '{"id": "shape", "messages": [{"role": "user"}]}\n'
        '{"id": "none", "messages": []}\n'
        '{"id": "p", "prompt": "The quick", "max_tokens": null}\n',
        encoding="utf-8",
    )
    items, problems = read_items(inp, on_error="skip")
    assert [item.id for item in items] == ["m", "p"]
    assert [p.split(":", 1)[0] for p in problems] == ["in.jsonl line 2", "in.jsonl line 3", "in.jsonl line 4"]
    assert "the messages are empty" in problems[0] and "'role' and 'content'" in problems[1]
    message, prompt = items
    assert message.messages == (Message(role="user", content="Hi"),) and message.extra == {"note": 1}
    request = message.request({"strategy": "resample", "temperature": 1.0, "max_tokens": 8})
    assert isinstance(request, GenerationRequest) and (request.samples, request.max_tokens) == (4, 8)
    with pytest.raises(ConfigurationError, match="samples is for --strategy resample"):
        message.request({"max_tokens": 8})
    assert prompt.options == {} and prompt.request({"max_tokens": 8}).max_tokens == 8  # null: the default
