"""Speculative vs per-step proxy tuning on the embedded default, measured side by side.

    python benchmarks/speculative.py [--problems 6] [--max-tokens 40] [--json]

Gemma-3-270M (base) is served on loopback by `blackbox-proxy serve-model` in a child process;
the SmolLM2 expert/anti-expert pair (one model, LoRA on/off) steers it on held-out arithmetic
problems. For greedy and sampling decoding and alpha 0.5, 1, 2 it runs per-step and speculative
(adaptive chunk) on the same prompts, and plain API generation of the hosted model alone.
Reported per row: API calls per generated token, acceptance rate of speculative drafts, wall
time per token as a ratio to per-step (same decoding and alpha) and to plain API generation,
and how many answers were right. One run, one machine: compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import openai  # noqa: E402

from blackbox_proxy import ProxyTuner  # noqa: E402
from blackbox_proxy.harness.demo import HOSTED_NAME, load_pair, model_server  # noqa: E402
from blackbox_proxy.harness.embedded import prepare  # noqa: E402
from blackbox_proxy.evaluation.arithmetic import STOP, problems, score  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--alphas", default="0.5,1,2")
    ap.add_argument("--fixed-chunk", type=int, default=4,
                    help="also run speculative with this fixed chunk at alpha 1 (0: skip)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    items = problems("test", args.problems)
    gemma = prepare("gemma3")
    rows = []
    with model_server(gemma, name=HOSTED_NAME) as base_url:
        expert, anti = load_pair()
        tuner = ProxyTuner(base_url=base_url, model=HOSTED_NAME, expert=expert, anti_expert=anti,
                           hosted_tokenizer=str(gemma), top_k=20, check_hosted=True)
        tuner.generate(items[0].hosted_prompt(), max_tokens=3)  # warm-up, self-checks
        client = openai.OpenAI(base_url=base_url, api_key="no-key")
        started, tokens = time.perf_counter(), 0
        for p in items:  # plain generation of the hosted model alone, no stop: max_tokens each
            resp = client.completions.create(model=HOSTED_NAME, prompt=p.hosted_prompt(), max_tokens=args.max_tokens,
                                             temperature=0)
            tokens += resp.usage.completion_tokens
        plain = (time.perf_counter() - started) / tokens
        for decoding in ("greedy", "sampling"):
            temperature = 0.0 if decoding == "greedy" else 1.0
            for alpha in alphas:
                per_token = {}
                runs = [("per-step", None), ("speculative", None)]
                if args.fixed_chunk and alpha == 1.0:
                    runs.append(("speculative", args.fixed_chunk))
                for strategy, chunk in runs:
                    calls = generated = drafts = accepted = right = 0
                    started = time.perf_counter()
                    for i, p in enumerate(items):
                        r = tuner.generate(p.hosted_prompt(), max_tokens=args.max_tokens, stop=STOP, alpha=alpha,
                                           temperature=temperature, seed=i, strategy=strategy, chunk=chunk)
                        calls += r.usage.api_calls
                        generated += r.usage.generated_tokens
                        drafts += r.usage.draft_tokens
                        accepted += r.usage.accepted_drafts
                        right += score(r.text, p)["strict"]
                    wall = (time.perf_counter() - started) / max(1, generated)
                    per_token.setdefault(strategy, wall)
                    rows.append({
                        "strategy": strategy, "alpha": alpha, "decoding": decoding,
                        "chunk": ("adaptive" if chunk is None else chunk) if strategy == "speculative" else None,
                        "calls_per_token": calls / max(1, generated),
                        "acceptance_rate": accepted / drafts if drafts else None,
                        "wall_ratio_vs_per_step": wall / per_token["per-step"],
                        "wall_ratio_vs_plain": wall / plain,
                        "tokens": generated, "correct": f"{right}/{len(items)}",
                        "wall_s_per_token": wall,
                    })
        client.close()
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"plain API generation: {plain:.3f} s per token")
    print("| strategy | chunk | decoding | alpha | API calls / token | acceptance | wall vs per-step | wall vs plain | tokens | correct |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{r['acceptance_rate']:.0%}" if r["acceptance_rate"] is not None else "—"
        print(f"| {r['strategy']} | {r['chunk'] or '—'} | {r['decoding']} | {r['alpha']:g} | {r['calls_per_token']:.2f} | {acc} "
              f"| {r['wall_ratio_vs_per_step']:.2f} | {r['wall_ratio_vs_plain']:.1f} | {r['tokens']} | {r['correct']} |")


if __name__ == "__main__":
    main()
