"""Greedy proxy tuning with and without the tail, on the chat-formatted same-tokenizer preset.

SmolLM2-135M-Instruct is the hosted model, behind this project's ``serve-model`` on loopback
with at most ``--top-k`` logprobs (20: OpenAI's chat cap); the expert is it with the shipped
arithmetic LoRA, the anti-expert the same model with the adapter off, so the hosted model *is*
the anti-expert and exact proxy tuning is the expert itself. The demo task's questions go as
chat messages in ``chat-prefix`` mode; every system answers greedily (``blackbox-proxy eval``'s
systems, resumable: the results stay in ``--out``).

    python benchmarks/greedy_tail.py --items 200 --out bench_greedy_tail

Prints, per system: accuracy (strict ``#### N``), the share of items whose text is white-box
greedy's, API calls and calls beyond the top-k (tail probes) per generated token. Run it with
an older checkout on ``PYTHONPATH`` and ``--systems hosted,per-step,speculative`` to see what the
candidates-only greedy wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from blackbox_proxy.apps.model_server import create_app
from blackbox_proxy.apps.openai_http import ServerThread
from blackbox_proxy.evaluation.runner import read_results, run_eval
from blackbox_proxy.evaluation.systems import Settings
from blackbox_proxy.evaluation.tasks import load_task
from blackbox_proxy.harness.embedded import adapter_path, prepare
from blackbox_proxy.local.runner import ModelRunner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--mode", choices=["chat-prefix", "completions"], default="chat-prefix")
    ap.add_argument("--systems", default="hosted,expert,per-step,speculative,white-box")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("bench_greedy_tail"))
    args = ap.parse_args()
    smol = str(prepare("smollm2"))
    task = load_task("arithmetic", None, limit=args.items)
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    runner = ModelRunner.from_pretrained(smol, name="smollm2")
    with ServerThread(create_app(runner, max_top_logprobs=args.top_k)) as server:
        tuner = dict(base_url=server.base_url, model="smollm2", mode=args.mode, expert_adapter=str(adapter_path()),
                     anti_expert=smol, hosted_tokenizer=smol, top_k=args.top_k, max_retries=2)
        settings = Settings(alpha=args.alpha, temperature=0.0, mode=args.mode)
        fingerprint = dict(model="smollm2", mode=args.mode, top_k=args.top_k, alpha=args.alpha, task=task.name,
                           data=task.digest, bench="greedy_tail")
        run_eval(task, names, args.out, tuner=tuner, settings=settings, fingerprint=fingerprint, base=smol,
                 concurrency=args.concurrency, progress=False)
    rows = read_results(args.out / "results.jsonl")
    by: dict[str, dict] = defaultdict(dict)
    for r in rows:
        by[r["system"]][r["item"]] = r
    white = by.get("white-box", {})
    print(f"{args.items} items of the arithmetic task, {args.mode}, top-{args.top_k}, alpha {args.alpha:g}, greedy; "
          "hosted SmolLM2-135M-Instruct = the anti-expert, expert = + arithmetic LoRA")
    print("| system | accuracy | text = white-box greedy | API calls / token | tail calls / token |")
    print("|---|---|---|---|---|")
    summary = {}
    for name in names:
        got = by.get(name, {})
        n = len(got)
        right = sum(bool(r.get("correct")) for r in got.values())
        same = sum(r.get("output") == white[i].get("output") for i, r in got.items() if i in white)
        usage = [r.get("usage") or {} for r in got.values()]
        tokens = sum(u.get("generated_tokens") or u.get("completion_tokens", 0) for u in usage)
        calls = sum(u.get("api_calls", 0) for u in usage)
        tail = sum(u.get("tail_calls", 0) for u in usage)
        row = dict(items=n, accuracy=right / max(1, n), same_as_white=same / max(1, len(white)) if white else None,
                   calls_per_token=calls / max(1, tokens) if usage and calls else None,
                   tail_calls_per_token=tail / max(1, tokens) if calls else None)
        summary[name] = row
        fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        print(f"| {name} | {row['accuracy']:.1%} ({right}/{n}) | {fmt(row['same_as_white'], '.1%')} | "
              f"{fmt(row['calls_per_token'], '.3f')} | {fmt(row['tail_calls_per_token'], '.3f')} |")
    (args.out / "greedy_tail.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
