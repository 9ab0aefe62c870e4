"""Batch runs on the embedded default: what concurrency and cross-prompt batched scoring buy.

    python benchmarks/batch.py [--problems 16] [--max-tokens 24] [--concurrency 8] [--json]

Gemma-3-270M (base) is served on loopback by `blackbox-proxy serve-model` in a child process;
the SmolLM2 pair (one model, LoRA on/off) steers it, per-step and greedy, through the batch
runner (results appended to a JSONL file as they finish). Three runs on the same prompts:

- concurrency 1 (one prompt at a time);
- concurrency C with each prompt scored in its own forwards (``batch_scoring`` off);
- concurrency C with the scoring queue sharing forwards across prompts.

Reported: wall time, prompts per second as a ratio to concurrency 1, how many scoring requests
shared a forward, and whether all three runs wrote the same texts. A second table isolates the
small models: C contexts (the same prompts) scoring a step of 20 one-token candidates each, one
forward per context vs one batched forward for all (no API involved). The hosted server runs on the
same machine here: by default each process gets one torch thread, so the hosted server and the
small models do not fight over the same cores (two busy torch processes on two cores slow each
other down many times). Compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from blackbox_proxy import AsyncProxyTuner  # noqa: E402
from blackbox_proxy.apps.batch import arun_batch  # noqa: E402
from blackbox_proxy.local.batching import model_queue  # noqa: E402
from blackbox_proxy.harness.demo import HOSTED_NAME, load_pair, model_server  # noqa: E402
from blackbox_proxy.harness.embedded import prepare  # noqa: E402
from blackbox_proxy.evaluation.arithmetic import STOP, problems  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for this process and for the hosted server each, so the two do not fight "
                         "over the same cores (0: torch's default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    items = problems("test", args.problems)
    gemma = prepare("gemma3")
    workdir = Path(tempfile.mkdtemp(prefix="bbp-batch-"))
    inp = workdir / "prompts.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p.hosted_prompt()}) + "\n" for i, p in enumerate(items)))
    expert, anti = load_pair()
    queue = model_queue(expert.model, expert.lock)
    rows, texts = [], []
    with model_server(gemma, name=HOSTED_NAME, threads=args.threads or None) as base_url:
        async def one(name: str, concurrency: int, batching: bool) -> None:
            out = workdir / f"{name}.jsonl"
            async with AsyncProxyTuner(base_url=base_url, model=HOSTED_NAME, expert=expert, anti_expert=anti,
                                       hosted_tokenizer=str(gemma), top_k=20) as tuner:
                tuner.batch_scoring = batching
                if not rows:  # warm-up: self-checks, first-call costs
                    await tuner.generate(items[0].hosted_prompt(), max_tokens=2)
                shared_before = queue.batched_requests
                started = time.perf_counter()
                summary = await arun_batch(tuner, inp, out, concurrency=concurrency, progress=False,
                                           max_tokens=args.max_tokens, stop=STOP)
                wall = time.perf_counter() - started
            records = [json.loads(line) for line in out.read_text().splitlines()]
            texts.append({r["id"]: r["text"] for r in records})
            rows.append({"run": name, "concurrency": concurrency, "batched_scoring": batching,
                         "prompts": summary.written, "wall_s": round(wall, 1),
                         "tokens": sum(r["usage"]["generated_tokens"] for r in records),
                         "shared_forward_requests": queue.batched_requests - shared_before,
                         "api_s": round(sum(r["usage"]["api_seconds"] for r in records), 1),
                         "scoring_s": round(sum(r["usage"]["scoring_seconds"] for r in records), 1)})

        async def all_runs() -> None:
            await one("sequential", 1, True)
            await one("concurrent", args.concurrency, False)
            await one("concurrent+batched", args.concurrency, True)

        asyncio.run(all_runs())
    scoring = scoring_only(expert, items, args.concurrency)
    base = rows[0]["wall_s"]
    for row in rows:
        row["speedup_vs_sequential"] = round(base / row["wall_s"], 2)
    same = all(t == texts[0] for t in texts)
    if args.json:
        print(json.dumps({"rows": rows, "same_texts": same, "scoring_only": scoring}, indent=1))
        return
    print(f"{args.problems} problems, per-step greedy, top-20, max {args.max_tokens} tokens, hosted Gemma-3-270M on loopback")
    print("| run | concurrency | batched scoring | wall (s) | speed-up | scoring requests that shared a forward |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['concurrency']} | {'yes' if r['batched_scoring'] else 'no'} | {r['wall_s']} | "
              f"{r['speedup_vs_sequential']}x | {r['shared_forward_requests']} |")
    print(f"same texts in all runs: {same}")
    print()
    print(f"scoring only (SmolLM2 pair as 2 rows, 20 candidates per step, {args.concurrency} contexts, "
          f"{torch.get_num_threads()} torch thread(s)):")
    print("| scoring | s per context-step | throughput vs one forward per context |")
    print("|---|---|---|")
    print(f"| one forward per context | {scoring['separate_s']:.3f} | 1.0x |")
    print(f"| one batched forward for all | {scoring['batched_s']:.3f} | {scoring['ratio']:.2f}x |")


def scoring_only(expert, items, contexts: int, steps: int = 5) -> dict:
    """Seconds per context-step, one forward per context vs one batched forward for all."""
    from blackbox_proxy.local.batching import ScoringQueue
    from blackbox_proxy.local.engine import CachedContext

    kwargs = {"adapter_names": [expert.adapter_name, "__base__"]}
    prompts = [expert.prompt_ids(prompt=p.hosted_prompt()) for p in (items * contexts)[:contexts]]
    paths = [(i,) for i in range(100, 120)]
    queue = ScoringQueue(expert.lock)
    timings = {}
    for name in ("separate", "batched"):
        made = []
        for p in prompts:
            context = CachedContext(expert.model, rows=2, forward_kwargs=kwargs)
            context.tree_ok = True
            context.score_groups(p, [(len(p), [])])
            made.append(context)
        started = time.perf_counter()
        for step in range(steps):
            jobs = [(c, p + [200 + step] * (step + 1), None) for c, p in zip(made, prompts)]
            jobs = [(c, ids, [(len(ids), paths)]) for c, ids, _ in jobs]
            if name == "separate":
                for c, ids, groups in jobs:
                    c.score_groups(ids, groups)
            else:
                queue.score_many(jobs)
        timings[name] = (time.perf_counter() - started) / (steps * len(made))
    return {"separate_s": timings["separate"], "batched_s": timings["batched"],
            "ratio": timings["separate"] / timings["batched"]}


if __name__ == "__main__":
    main()
