"""``batch`` at scale: hundreds of generations from one process, the small models in this process
or on a vLLM server (issue 19).

    python benchmarks/batch_scale.py [--backend local|vllm] [--generations 200] [--concurrency 200]
        [--max-tokens 3] [--strategy per-step] [--ttft 0.4] [--per-token 0.015] [--json]

The hosted model is the remote-like replay of ``benchmarks/remote.py`` (Gemma-3-270M's recorded
answers, 0.4 s to the first token; run that benchmark once first, it records them). The script
writes ``--generations`` prompts (the demo's held-out problems, cycled, one id each) to a JSONL
file and runs the real command a user runs, ``blackbox-proxy batch --concurrency C``, as a
subprocess: all C generations in flight from one process, the API calls overlapping, the scoring
batched by the local queue or by vLLM (``--backend vllm``: the SmolLM2 pair served by vLLM, the
adapter as the LoRA module ``expert``, fp32; needs ``BLACKBOX_PROXY_VLLM_PYTHON``, and its
start-up is not timed). Then it runs the same command again: a resumed run must find every id
written and ask nothing.

Printed: generations written and failed, generated tokens, wall seconds, tokens per second,
hosted calls, and the resumed run's new results and wall.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from blackbox_proxy.errors import ProxyTuningError  # noqa: E402
from blackbox_proxy.harness.demo import HOSTED_NAME  # noqa: E402
from blackbox_proxy.harness.embedded import adapter_path, cache_dir, prepare  # noqa: E402
from blackbox_proxy.harness.launch import find_python, vllm_server  # noqa: E402
from blackbox_proxy.harness.replay import LatencyModel, ReplayHost  # noqa: E402
from blackbox_proxy.evaluation.arithmetic import STOP, problems  # noqa: E402

CLI = [sys.executable, "-m", "blackbox_proxy"]


def run_batch(args: argparse.Namespace, base_url: str, scorer_url: str | None, gemma: Path, smol: Path,
              inputs: Path, output: Path) -> tuple[float, int]:
    """One ``batch`` run: (wall seconds, exit status)."""
    cmd = [*CLI, "batch", "--base-url", base_url, "--model", HOSTED_NAME, "--hosted-tokenizer", str(gemma),
           "--input", str(inputs), "--output", str(output), "--concurrency", str(args.concurrency),
           "--max-tokens", str(args.max_tokens), "--temperature", "0", "--strategy", args.strategy,
           "--expert-render", "chat", "--anti-expert-render", "chat", "--no-progress"]
    if scorer_url is None:
        cmd += ["--anti-expert", str(smol), "--expert-adapter", str(adapter_path())]
    else:
        cmd += ["--scorer-url", scorer_url, "--expert", "expert", "--anti-expert", "smol"]
    started = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        print(f"batch exited {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}", file=sys.stderr)
    return wall, done.returncode


def summarise(output: Path) -> dict:
    """Results written, failures (``<output>.errors.jsonl``, retried by the next run), tokens, calls."""
    def read(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    rows, errors = read(output), read(output.with_name(output.name + ".errors.jsonl"))
    usage = [r.get("usage") or {} for r in rows]
    return {"written": len(rows), "failed": len(errors),
            "errors": sorted({e.get("type", "?") for e in errors}),
            "tokens": sum(u.get("generated_tokens", 0) for u in usage),
            "api_calls": sum(u.get("api_calls", 0) for u in usage)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="local", choices=("local", "vllm"))
    ap.add_argument("--generations", type=int, default=200, help="prompts in the batch (default 200)")
    ap.add_argument("--concurrency", type=int, default=200, help="batch --concurrency (default 200)")
    ap.add_argument("--max-tokens", type=int, default=3, help="tokens per generation at most (default 3)")
    ap.add_argument("--strategy", default="per-step", choices=("per-step", "speculative"))
    ap.add_argument("--ttft", type=float, default=0.4, help="modelled time to first token, s (default 0.4)")
    ap.add_argument("--per-token", type=float, default=0.015, help="modelled time per further token (default 0.015)")
    ap.add_argument("--recording", default=str(cache_dir() / "replay" / f"{HOSTED_NAME}.jsonl"),
                    help="the hosted answers benchmarks/remote.py (or backends.py --record) recorded")
    ap.add_argument("--hosted-tokenizer", default=None,
                    help="a folder with the hosted model's tokenizer (default: the embedded Gemma-3 conversion)")
    ap.add_argument("--json", action="store_true", help="print the row as JSON")
    args = ap.parse_args()
    if min(args.generations, args.concurrency, args.max_tokens) < 1:
        ap.error("--generations, --concurrency and --max-tokens must be >= 1")
    path = Path(args.recording).expanduser()
    if not path.exists():
        sys.exit(f"error: no recording at {path}: run `python benchmarks/remote.py` once first (it records)")
    smol = prepare("smollm2")
    gemma = Path(args.hosted_tokenizer) if args.hosted_tokenizer else prepare("gemma3")
    items = problems("test", 6)
    work = Path(tempfile.mkdtemp(prefix="batch-scale-"))
    inputs, output = work / "prompts.jsonl", work / "results.jsonl"
    inputs.write_text("".join(json.dumps({"id": f"p{i}", "prompt": items[i % len(items)].hosted_prompt(),
                                          "stop": list(STOP)}) + "\n" for i in range(args.generations)))
    row = {"backend": args.backend, "generations": args.generations, "concurrency": args.concurrency,
           "max_tokens": args.max_tokens, "strategy": args.strategy}
    try:
        with contextlib.ExitStack() as stack:
            host = stack.enter_context(ReplayHost(path, latency=LatencyModel(ttft=args.ttft, per_token=args.per_token),
                                                  miss_hint="run benchmarks/backends.py --record first"))
            scorer_url = None
            if args.backend == "vllm":
                python, why = find_python("vllm")
                if python is None:
                    sys.exit(f"error: the vllm backend needs vLLM: {why}")
                lora = ["--enable-lora", "--lora-modules", f"expert={adapter_path()}", "--max-lora-rank", "8",
                        "--max-logprobs", "-1"]
                scorer_url = stack.enter_context(vllm_server(smol, name="smol", python=python, dtype="float32",
                                                             extra_args=lora))
            wall, status = run_batch(args, host.base_url, scorer_url, gemma, smol, inputs, output)
            first = summarise(output)
            row.update(first, wall_seconds=round(wall, 1), exit_status=status,
                       tokens_per_second=round(first["tokens"] / wall, 2), replay_misses=len(host.stats.missed))
            before = row["written"]
            wall2, status2 = run_batch(args, host.base_url, scorer_url, gemma, smol, inputs, output)
            row.update(resumed_new_results=summarise(output)["written"] - before,
                       resumed_wall_seconds=round(wall2, 1), resumed_exit_status=status2)
    except ProxyTuningError as exc:
        sys.exit(f"error: {exc}")
    if args.json:
        print(json.dumps(row, indent=1))
        return
    print(f"replayed API: ttft {args.ttft:g} s; {args.strategy}, greedy, max_tokens {args.max_tokens}; results in {output}")
    print("| backend | generations | concurrency | written | failed | tokens | wall s | tokens / s | hosted calls "
          "| resumed: new results | resumed wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {row['backend']} | {row['generations']} | {row['concurrency']} | {row['written']} | {row['failed']} "
          f"| {row['tokens']} | {row['wall_seconds']} | {row['tokens_per_second']} | {row['api_calls']} "
          f"| {row['resumed_new_results']} | {row['resumed_wall_seconds']} |")
    if row["failed"] or row["replay_misses"]:
        print(f"failures: {row['failed']} ({', '.join(row['errors'])}); replay misses: {row['replay_misses']}")


if __name__ == "__main__":
    main()
