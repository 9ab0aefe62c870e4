"""Batch runs lose nothing paid for and pay nothing twice (issue 18).

Every input problem is found, all at once, before the first paid call; the output is opened,
locked and checked before it too; a write that fails later stops with one line and keeps what
was written; the errors file describes the latest run only.

Most tests drive :func:`arun_batch` with the real tuner against the project's model server on
loopback (requests counted); the file-handling ones use a counting stand-in tuner, and two run
the real CLI as processes (two runs on one file; a file-size limit standing in for a full disk).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from blackbox_proxy import AsyncProxyTuner, ConfigurationError, HostedAPIError
from blackbox_proxy.apps.batch import BatchInputError, arun_batch, read_items
from blackbox_proxy.apps.model_server import create_app
from blackbox_proxy.apps.openai_http import ServerThread
from blackbox_proxy.local.runner import ModelRunner


def strict(text: str) -> object:
    """JSON as the standard has it (no NaN/Infinity)."""
    def refuse(name):
        raise AssertionError(f"{name} in the output: not JSON")

    return json.loads(text, parse_constant=refuse)


def results(path: Path) -> dict:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = strict(line)
        assert record["id"] not in out, f"id {record['id']} answered twice"
        out[record["id"]] = record
    return out


class Counting:
    """An ASGI wrapper counting the generation requests (what a hosted API bills)."""

    def __init__(self, app):
        self.app = app
        self.generations = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in ("/v1/completions", "/v1/chat/completions"):
            self.generations += 1
        return await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def counted(tok_a, models_a):
    """The model server, its generation requests counted."""
    app = Counting(create_app(ModelRunner(models_a[0], tok_a, name="tiny"), max_top_logprobs=len(tok_a)))
    with ServerThread(app) as server:
        server.counter = app
        yield server


def paid(server) -> int:
    return server.counter.generations


def run_real(server, scorers, tok, inp, out, **kw):
    async def main():
        async with AsyncProxyTuner(base_url=server.base_url, model="tiny", expert=scorers[0], anti_expert=scorers[1],
                                   top_k=8, hosted_tokenizer=tok, max_retries=0) as tuner:
            return await arun_batch(tuner, inp, out, progress=False, max_tokens=3, **kw)

    return asyncio.run(main())


# ----- a stand-in tuner that counts what would be paid ------------------------------------------------


class CountingTuner:
    """Answers every prompt with its own id, counting calls; ``fail`` ids raise a hosted error."""

    def __init__(self, fail=()):
        self.calls = 0
        self.checked = 0
        self.fail = set(fail)

        async def check():
            self.checked += 1

        self.client = SimpleNamespace(check=check)

    def check_request(self, *, request):
        return None

    async def generate(self, *, request):
        self.calls += 1
        await asyncio.sleep(0)
        if request.prompt in self.fail:
            raise HostedAPIError(f"the host failed on {request.prompt!r}")
        usage = {"api_calls": 1}
        return SimpleNamespace(text=f"answer to {request.prompt}", finish_reason="length",
                               to_dict=lambda: {"usage": usage, "settings": {}, "trace": [], "chunks": []})


def run_counted(tuner, inp, out, **kw):
    return asyncio.run(arun_batch(tuner, inp, out, progress=False, **kw))


def write_lines(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


# ----- input: every problem, before anything is paid ------------------------------------------------------


def test_lone_surrogates_are_refused_per_line_before_any_paid_call(tmp_path, counted, scorers_a, tok_a):
    """A lone surrogate in an extra field used to be generated and paid, then crash the writer
    (every rerun paid again); in the prompt, stop strings or messages it was a TypeError."""
    inp = write_lines(tmp_path / "in.jsonl", [
        '{"id": "ok", "prompt": "The quick", "ref": "caf\\u00e9"}',
        '{"id": "extra", "prompt": "The quick", "ref": "\\ud800"}',
        '{"id": "prompt", "prompt": "The \\udcff quick"}',
        '{"id": "stop", "prompt": "The quick", "stop": ["\\n", "\\udfff"]}',
        '{"id": "chat", "messages": [{"role": "user", "content": "Hi \\ud83d"}]}',
        '{"id": "nested", "prompt": "The quick", "meta": {"notes": ["fine", "\\udc80"]}}',
    ])
    out = tmp_path / "out.jsonl"
    before = paid(counted)
    with pytest.raises(BatchInputError) as info:
        run_real(counted, scorers_a, tok_a, inp, out)
    message = str(info.value)
    assert "\n" not in message and paid(counted) == before and not out.exists()
    for fragment in ["line 2: field 'ref' is not valid Unicode", "line 3: field 'prompt'",
                     "line 4: field 'stop[1]'", "line 5: field 'messages[0].content'",
                     "line 6: field 'meta.notes[1]'"]:
        assert fragment in message, (fragment, message)
    summary = run_real(counted, scorers_a, tok_a, inp, out, on_error="skip")
    assert (summary.written, summary.bad_lines) == (1, 5)
    assert results(out)["ok"]["ref"] == "café"
    assert 1 <= paid(counted) - before <= 6  # up to three tokens of one prompt, and greedy's calls beyond the top-k


def test_stop_reports_every_invalid_line_at_once(tmp_path, counted, scorers_a, tok_a):
    """Broken JSON, options out of range, rules between options and the tuner's own checks
    (a prompt longer than the small models' context) are all listed, before any paid call."""
    inp = write_lines(tmp_path / "in.jsonl", [
        {"id": 1, "prompt": "The quick"},
        '{"id": 2, "prompt": "cut',
        {"id": 3, "prompt": "The dog", "top_p": 1.5},
        {"id": 4, "prompt": "The dog", "strategy": "beam"},
        {"id": 5, "prompt": "The dog", "seed": 2 ** 64},
        {"id": 6, "prompt": "The dog", "alpha": 1e308},
        '{"id": 7, "prompt": "The dog", "alpha": NaN}',
        {"id": 8, "prompt": "The dog", "samples": 3},
    ])
    before = paid(counted)
    with pytest.raises(BatchInputError) as info:
        run_real(counted, scorers_a, tok_a, inp, tmp_path / "out.jsonl")
    message = str(info.value)
    assert "\n" not in message and paid(counted) == before
    for fragment in ["line 2: not valid JSON", "line 3 (id 3): top_p must be in (0, 1]", "line 4 (id 4): strategy",
                     "line 5 (id 5): seed must be an integer from", "line 6 (id 6): alpha must be between",
                     "line 7: field 'alpha' is NaN, which is not a JSON value", "line 8 (id 8): samples is for"]:
        assert fragment in message, (fragment, message)
    # the tuner's checks (here: prompts longer than the small models' 512-token context), all of them too
    long = "The quick brown fox " * 200
    write_lines(inp, [{"id": "a", "prompt": "The quick"}, {"id": "b", "prompt": long}, {"id": "c", "prompt": long}])
    with pytest.raises(BatchInputError) as info:
        run_real(counted, scorers_a, tok_a, inp, tmp_path / "out.jsonl")
    assert "line 2 (id 'b')" in str(info.value) and "line 3 (id 'c')" in str(info.value)
    assert paid(counted) == before


def test_deep_or_odd_json_is_a_line_problem_not_a_crash(tmp_path):
    inp = write_lines(tmp_path / "in.jsonl", [
        '{"id": 1, "prompt": "a", "x": ' + "[" * 5000 + "]" * 5000 + "}",
        '{"id": 2, "prompt": "a", "x": ' + "[" * 40 + "]" * 40 + "}",
        '{"id": 3, "prompt": "a", "x": Infinity}',
        '{"id": ' + "9" * 5000 + ', "prompt": "a"}',
        '{"id": 5, "prompt": "a"}',
    ])
    items, problems = read_items(inp, on_error="skip")
    assert [item.id for item in items] == [5]
    assert len(problems) == 4 and all("\n" not in p for p in problems)
    assert "line 2: field 'x" in problems[1] and "nests deeper than" in problems[1]


# ----- output: opened, locked and checked before the first paid call ----------------------------------


@contextmanager
def unprivileged():
    """As root, act as `nobody` for a moment (root writes to read-only files)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_a_read_only_output_fails_before_anything_is_paid(tmp_path):
    folder = Path(tempfile.mkdtemp(prefix="ro-", dir="/tmp"))
    try:
        folder.chmod(0o777)
        inp = write_lines(folder / "in.jsonl", [{"id": i, "prompt": f"p{i}"} for i in range(3)])
        inp.chmod(0o644)
        out = folder / "out.jsonl"
        out.write_text("")
        out.chmod(0o444)
        tuner = CountingTuner()
        with unprivileged(), pytest.raises(ConfigurationError) as info:
            run_counted(tuner, inp, out)
        assert "cannot open the results file" in str(info.value) and str(out) in str(info.value)
        assert "\n" not in str(info.value) and tuner.calls == 0 and tuner.checked == 0
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def test_output_that_is_not_results_of_this_input_is_refused(tmp_path):
    """A copy of the input used to count as '12 already done'; another input's results too."""
    inp = write_lines(tmp_path / "in.jsonl", [{"id": i, "prompt": f"p{i}", "text": "reference"} for i in range(12)])
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(inp.read_bytes())
    tuner = CountingTuner()
    with pytest.raises(ConfigurationError) as info:
        run_counted(tuner, inp, copy)
    assert "copy.jsonl line 1 is not a result line (it looks like an input line" in str(info.value)
    other = write_lines(tmp_path / "other.jsonl", [{"id": f"x{i}", "text": "t", "finish_reason": "stop"} for i in range(3)])
    with pytest.raises(ConfigurationError, match="holds results of another input"):
        run_counted(tuner, inp, other)
    assert tuner.calls == 0 and copy.read_bytes() == inp.read_bytes()
    os.link(inp, tmp_path / "hard.jsonl")
    with pytest.raises(ConfigurationError, match="the output file is the input file"):
        run_counted(tuner, inp, tmp_path / "hard.jsonl")


def test_the_output_is_locked_for_the_run(tmp_path):
    from blackbox_proxy.apps.batch import BatchOutputError, ResultsFile

    inp = write_lines(tmp_path / "in.jsonl", [{"id": i, "prompt": f"p{i}"} for i in range(4)])
    out = tmp_path / "out.jsonl"
    tuner = CountingTuner()
    with ResultsFile(out):
        with pytest.raises(BatchOutputError) as info:
            run_counted(tuner, inp, out)
    assert f"the results file {out} is in use by another batch run" in str(info.value) and tuner.calls == 0
    assert run_counted(tuner, inp, out).written == 4  # the lock went with the file


def test_strict_json_results_and_text_utf8_cannot_hold(tmp_path):
    """What was accepted is always written: -inf as null, a lone surrogate (from a trace, say)
    as an escape; the line reads back as strict JSON."""
    from blackbox_proxy.apps.batch import json_line

    line = json_line({"id": "a", "trace": [{"hosted_logprob": float("-inf"), "delta": float("nan")}],
                      "text": "caf\u00e9 \ud800"})
    assert strict(line) == {"id": "a", "trace": [{"hosted_logprob": None, "delta": None}], "text": "caf\u00e9 \ud800"}
    line.encode("utf-8")


# ----- the errors file: the latest run only -----------------------------------------------------------


def test_errors_file_reflects_the_latest_run(tmp_path):
    inp = write_lines(tmp_path / "in.jsonl", [{"id": i, "prompt": f"p{i}"} for i in range(5)])
    out = tmp_path / "out.jsonl"
    errors = tmp_path / "out.jsonl.errors.jsonl"
    first = run_counted(CountingTuner(fail={"p1", "p3"}), inp, out, on_error="skip")
    assert (first.written, first.failed) == (3, 2)
    assert sorted(strict(line)["id"] for line in errors.read_text().splitlines()) == [1, 3]
    second = run_counted(CountingTuner(fail={"p3"}), inp, out, on_error="skip")
    assert (second.written, second.failed) == (1, 1)
    assert [strict(line)["id"] for line in errors.read_text().splitlines()] == [3]  # 1 succeeded: gone
    third = run_counted(CountingTuner(), inp, out, on_error="skip")
    assert (third.written, third.skipped_done) == (1, 4)
    assert not errors.exists()  # nothing failed in the latest run
    assert sorted(results(out)) == [0, 1, 2, 3, 4]


# ----- real processes --------------------------------------------------------------------------------


def cli(*args):
    return [sys.executable, "-m", "blackbox_proxy", *args]


def batch_command(server, saved, inp, out, *extra):
    return cli("batch", "--base-url", server.base_url, "--model", "tiny", "--expert", str(saved["E"]),
               "--anti-expert", str(saved["A"]), "--expert-render", "raw", "--anti-expert-render", "raw",
               "--top-k", "8", "--max-tokens", "4", "--input", str(inp), "--output", str(out), "--no-progress",
               "--hosted-tokenizer", "none", *extra)


@pytest.mark.slow
def test_two_runs_on_one_output_do_the_work_once(tmp_path, server_a, saved_a):
    """Two `batch` processes on the same output used to both do all the work (40 of 40 ids
    written twice); the second now stops at once, naming the file, and pays nothing."""
    inp = write_lines(tmp_path / "in.jsonl", [{"id": f"p{i}", "prompt": f"The quick {i}"} for i in range(40)])
    out = tmp_path / "out.jsonl"
    command = batch_command(server_a, saved_a, inp, out, "--concurrency", "2")
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_bytes().count(b"\n") >= 1):
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # mid-run, for as long as the second run takes
    try:
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1, second.stderr[-2000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: the results file {out} is in use by another batch run; " \
                                           "wait for it to finish, or pass another --output"
    assert first.wait(300) == 0, first.communicate()[1][-2000:]
    assert sorted(results(out)) == sorted(f"p{i}" for i in range(40))


def _file_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_failed_write_stops_with_one_line_and_keeps_what_was_written(tmp_path, server_a, saved_a):
    inp = write_lines(tmp_path / "in.jsonl", [{"id": f"p{i}", "prompt": f"The quick {i}"} for i in range(12)])
    out = tmp_path / "out.jsonl"
    command = batch_command(server_a, saved_a, inp, out, "--concurrency", "1")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    full = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env,
                          preexec_fn=_file_limit(600))
    assert full.returncode == 1, full.stderr[-2000:]
    lines = [line for line in full.stderr.splitlines() if "Loading weights" not in line and line.strip()]
    assert "Traceback" not in full.stderr and len(lines) == 1, full.stderr[-3000:]  # transformers' bars aside
    assert lines[0].startswith(f"error: cannot write to {out} (File too large) after ")
    assert "what was written is kept" in lines[0]
    kept = out.read_bytes()
    assert kept.endswith(b"\n") and 1 <= kept.count(b"\n") < 12  # whole lines only
    done = results(out)
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"[12 prompts: {12 - len(done)} written, {len(done)} already done" in again.stderr
    assert sorted(results(out)) == sorted(f"p{i}" for i in range(12))


def test_output_errors_name_the_real_cause_and_the_commands_own_option(tmp_path):
    """``--output /proc/version`` was refused as "the disk is full"; a second ``eval`` on one
    ``--out`` was told of a "batch run" and ``--output``."""
    import asyncio
    import os

    from blackbox_proxy.evaluation.runner import RESULTS, arun_eval
    from blackbox_proxy.evaluation.tasks import load_task
    from blackbox_proxy.runs.results import BatchOutputError, ResultsFile

    if os.path.exists("/proc/version"):
        with pytest.raises(BatchOutputError) as info:
            ResultsFile("/proc/version").open()
        message = str(info.value)  # (a user other than root may not open it at all)
        assert ("stores no files" in message or "cannot open" in message) and "full" not in message
    out = tmp_path / "eval-out"
    with ResultsFile(out / RESULTS, flag="--out", run="eval run"):
        with pytest.raises(BatchOutputError) as info:
            asyncio.run(arun_eval(load_task("arithmetic", None, limit=1), [], out, max_tokens=4))
    message = str(info.value)
    assert "in use by another eval run" in message and "--out" in message and "--output" not in message
