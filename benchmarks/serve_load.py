"""Load on `blackbox-proxy serve`: 1, 4 and 16 concurrent OpenAI clients on the embedded default.

    python benchmarks/serve_load.py [--clients 1,4,16] [--requests 16] [--max-tokens 16] [--json]

Gemma-3-270M (base) is served on loopback by `blackbox-proxy serve-model` in a child process;
the tuned server (SmolLM2 pair as expert/anti-expert, per-step, greedy) runs in this process on
another loopback port, and `openai.AsyncOpenAI` clients send held-out arithmetic problems to it.
At each level, C clients share the same number of requests (bounded; loopback only). Reported
per level: generated tokens per second, p50/p95 latency per request, both as ratios to one
client, and how many scoring requests shared a forward in the scoring queue; a last row repeats
the largest level with the queue off (each request scored in its own forwards). The hosted server
and the tuned server get one torch thread each (this machine has two cores), so the two do not
fight over the same core. One run: compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import openai  # noqa: E402
import torch  # noqa: E402

from blackbox_proxy import AsyncProxyTuner  # noqa: E402
from blackbox_proxy.local.batching import model_queue  # noqa: E402
from blackbox_proxy.harness.demo import HOSTED_NAME, load_pair, model_server  # noqa: E402
from blackbox_proxy.harness.embedded import prepare  # noqa: E402
from blackbox_proxy.apps.tuned_server import create_tuned_app  # noqa: E402
from blackbox_proxy.apps.openai_http import ServerThread  # noqa: E402
from blackbox_proxy.evaluation.arithmetic import STOP, problems  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=16, help="requests per level, shared by its clients")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for each of the two servers")
    ap.add_argument("--unbatched", type=int, default=16,
                    help="also run this many clients with the scoring queue off, to show what it buys (0: skip)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    torch.set_num_threads(args.threads)
    gemma = prepare("gemma3")
    items = problems("test", args.requests)
    expert, anti = load_pair()
    queue = model_queue(expert.model, expert.lock)
    rows = []
    with model_server(gemma, name=HOSTED_NAME, threads=args.threads) as hosted_url:
        tuner = AsyncProxyTuner(base_url=hosted_url, model=HOSTED_NAME, expert=expert, anti_expert=anti,
                                hosted_tokenizer=str(gemma), top_k=20)
        with ServerThread(create_tuned_app(tuner, name="tuned")) as server:
            async def level(clients: int, batched: bool = True) -> dict:
                tuner.batch_scoring = batched
                latencies: list[float] = []
                tokens = 0
                pending = list(range(args.requests))

                async def client_loop(client: openai.AsyncOpenAI) -> None:
                    nonlocal tokens
                    while pending:
                        i = pending.pop(0)
                        started = time.perf_counter()
                        resp = await client.completions.create(model="tuned", prompt=items[i].hosted_prompt(),
                                                               max_tokens=args.max_tokens, temperature=0, stop=STOP)
                        latencies.append(time.perf_counter() - started)
                        tokens += resp.usage.completion_tokens

                async with openai.AsyncOpenAI(base_url=server.base_url, api_key="-", max_retries=0,
                                              timeout=600) as client:
                    shared = queue.batched_requests
                    started = time.perf_counter()
                    await asyncio.gather(*(client_loop(client) for _ in range(clients)))
                    wall = time.perf_counter() - started
                return {"clients": clients, "batched_scoring": batched, "requests": len(latencies), "tokens": tokens, "wall_s": round(wall, 1),
                        "tokens_per_s": tokens / wall, "p50_s": statistics.median(latencies),
                        "p95_s": percentile(latencies, 0.95), "shared_forward_requests": queue.batched_requests - shared}

            async def run_all() -> None:
                async with openai.AsyncOpenAI(base_url=server.base_url, api_key="-") as warm:
                    await warm.completions.create(model="tuned", prompt=items[0].hosted_prompt(), max_tokens=2)
                for clients in levels:
                    rows.append(await level(clients))
                if args.unbatched:
                    rows.append(await level(args.unbatched, batched=False))

            asyncio.run(run_all())
    base = rows[0]
    for row in rows:
        row["throughput_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["p50_ratio"] = row["p50_s"] / base["p50_s"]
        row["p95_ratio"] = row["p95_s"] / base["p95_s"]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{args.requests} requests per level, max {args.max_tokens} tokens, per-step greedy, top-20, "
          f"hosted Gemma-3-270M on loopback, {args.threads} torch thread(s) per server")
    print("| clients | batched scoring | tokens/s | throughput vs 1 client | p50 latency (s) | p50 vs 1 | p95 latency (s) | p95 vs 1 | shared forwards |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {'yes' if r['batched_scoring'] else 'no'} | {r['tokens_per_s']:.2f} | {r['throughput_ratio']:.2f}x | {r['p50_s']:.1f} | "
              f"{r['p50_ratio']:.2f}x | {r['p95_s']:.1f} | {r['p95_ratio']:.2f}x | {r['shared_forward_requests']} |")


if __name__ == "__main__":
    main()
