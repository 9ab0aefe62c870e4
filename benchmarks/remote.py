"""What proxy tuning costs against a remote API: calls, waiting, local scoring and the bill.

    python benchmarks/remote.py [--problems 6] [--max-tokens 40] [--alpha 1] [--json]
        [--ttft 0.4] [--per-token 0.015] [--jitter 0.1] [--price-prompt 1.5] [--price-completion 2.0]
        [--prompt-cache openai|deepseek|exact|none] [--cached-price 0.75]
        [--recording PATH] [--record] [--drafts N] [--no-prefetch] [--no-stream]

A hosted stand-in on the same 2 cores says nothing about a remote API's wall time, so the hosted
model is replayed: its answers (Gemma-3-270M behind `serve-model`, the embedded default) are
recorded once, then served by `blackbox_proxy.harness.replay.ReplayHost` on loopback after the
time a remote API would take: ttft (default 0.4 s) plus per_token (15 ms) for each further
token, the ttft jittered by ±jitter (10%, seeded). The unmodified ProxyTuner, with the SmolLM2
expert/anti-expert pair, talks to it through its normal client.

Per strategy and decoding (per-step greedy; speculative greedy with whole chunks of one draft,
of adaptive drafts (up to 4), and streamed (the default on this host: one draft per call, each
stream closed at its first rejection); speculative sampling at temperature 1, whole and streamed)
on the demo's held-out problems it reports: API calls per generated token; API wait and wall
time as multiples of plain generation (one call that produces the same tokens:
ttft + per_token × (tokens − 1) per answer, the physical limit); local scoring seconds per
token after the answers arrived, and overlapped with the calls (the prefetch); billed prompt
and completion tokens per generated token; the cost of 1,000 generated
tokens at --price-prompt / --price-completion ($ per million tokens; default OpenAI's list price
for gpt-3.5-turbo-instruct, the legacy completions model that returns logprobs) and as a
multiple of plain generation's cost; then the same with the prompt tokens a provider reads from
its prompt cache (the replay host reports them by ``--prompt-cache``'s rule,
:mod:`blackbox_proxy.harness.prompt_cache`) at ``--cached-price``.

The first run records (it starts the hosted stand-in; minutes); later runs replay. A request not
in the recording stops the run with the route it missed: `--record` fills misses from the real
server and measures on a pure replay. Scoring time is this machine's, noisy when it is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from blackbox_proxy import ProxyTuner  # noqa: E402
from blackbox_proxy.errors import ProxyTuningError  # noqa: E402
from blackbox_proxy.harness.demo import HOSTED_NAME, load_pair, model_server  # noqa: E402
from blackbox_proxy.harness.embedded import cache_dir, prepare  # noqa: E402
from blackbox_proxy.harness.prompt_cache import RULES, PromptCache  # noqa: E402
from blackbox_proxy.harness.replay import LatencyModel, ReplayHost  # noqa: E402
from blackbox_proxy.evaluation.arithmetic import STOP, problems, score  # noqa: E402
from blackbox_proxy.types import Usage  # noqa: E402

# (strategy, decoding, temperature, drafts per call: None = the default, streamed chunks)
RUNS = (("per-step", "greedy", 0.0, None, False), ("speculative", "greedy", 0.0, 1, False),
        ("speculative", "greedy", 0.0, None, False), ("speculative", "greedy", 0.0, None, True),
        ("speculative", "sampling", 1.0, None, False), ("speculative", "sampling", 1.0, None, True))
PRICE_PROMPT, PRICE_COMPLETION = 1.50, 2.00  # $ per million tokens: gpt-3.5-turbo-instruct's list price
MISS_HINT = ("run benchmarks/remote.py again with --record (and the same --problems, --max-tokens, --alpha, --top-k, "
             "--chunk, --drafts) to fill it from the hosted stand-in")


def run_workload(base_url: str, args: argparse.Namespace, items: list, pair: tuple, gemma: Path,
                 latency: LatencyModel) -> list[dict]:
    """Every strategy on every problem through the API at ``base_url``: one row per strategy."""
    expert, anti = pair
    rows = []
    with ProxyTuner(base_url=base_url, model=HOSTED_NAME, expert=expert, anti_expert=anti, hosted_tokenizer=str(gemma),
                    top_k=args.top_k, check_hosted=True) as tuner:
        tuner.generate(items[0].hosted_prompt(), max_tokens=3)  # warm-up, self-checks
        prompt_tokens = [len(tuner.hosted_vocab.encode_prompt(p.hosted_prompt())) for p in items]
        host_streams = tuner.client.streams_logprobs  # the dialect streams logprobs (this project's server: yes)
        for strategy, decoding, temperature, drafts, streamed in RUNS:
            if streamed and (args.no_stream or not host_streams):
                continue
            if strategy == "speculative":
                drafts = args.drafts if drafts is None else drafts
                default = "adaptive drafts" if temperature == 0 and not streamed else "1 draft"
                decoding += ", 1 draft" if drafts == 1 else f", drafts ≤ {drafts}" if drafts else f", {default}"
                decoding += ", streamed (default)" if streamed else ", whole chunks"
            tuner.client.stream_chunks = streamed
            total, wall, plain, plain_cost, right = Usage(), 0.0, 0.0, 0.0, 0
            for i, p in enumerate(items):
                started = time.perf_counter()
                r = tuner.generate(p.hosted_prompt(), max_tokens=args.max_tokens, stop=STOP, alpha=args.alpha,
                                   temperature=temperature, seed=i, strategy=strategy,
                                   chunk=args.chunk if strategy == "speculative" else None,
                                   drafts=drafts if strategy == "speculative" else None)
                wall += time.perf_counter() - started
                total = total + r.usage
                right += score(r.text, p)["strict"]
                plain += latency.seconds(r.usage.generated_tokens)  # one call for the same tokens, mean ttft
                plain_cost += prompt_tokens[i] * args.price_prompt + r.usage.generated_tokens * args.price_completion
            tokens = max(1, total.generated_tokens)
            cost = total.prompt_tokens * args.price_prompt + total.completion_tokens * args.price_completion
            # the same bill with the prompt tokens the provider reads from its cache at the cached price
            cost_cached = cost - total.cached_prompt_tokens * (args.price_prompt - args.cached_price)
            rows.append({
                "strategy": strategy, "decoding": decoding, "alpha": args.alpha, "tokens": total.generated_tokens,
                "calls_per_token": total.api_calls / tokens,
                "api_wait_vs_plain": total.api_seconds / plain if plain else None,
                "wall_vs_plain": wall / plain if plain else None,
                "scoring_s_per_token": total.scoring_seconds / tokens,
                # small-model work done while a call was in flight (hidden behind the API's wait)
                "overlapped_s_per_token": total.overlapped_seconds / tokens,
                "prompt_tokens_per_token": total.prompt_tokens / tokens,
                "completion_tokens_per_token": total.completion_tokens / tokens,
                "usd_per_1k_tokens": cost / 1e6 / tokens * 1000,
                "cost_vs_plain": cost / plain_cost if plain_cost else None,
                "cached_prompt_tokens_per_token": total.cached_prompt_tokens / tokens,
                "usd_per_1k_tokens_cached": cost_cached / 1e6 / tokens * 1000,
                "cost_vs_plain_cached": cost_cached / plain_cost if plain_cost else None,
                "correct": f"{right}/{len(items)}",
                "acceptance_rate": total.acceptance_rate,
                # chunk calls' drafts over all calls but tail probes (a position asked alone has none)
                "drafts_per_call": total.draft_sequences / max(1, total.api_calls - total.tail_calls),
                "api_calls": total.api_calls, "api_seconds": total.api_seconds, "wall_seconds": wall,
                "plain_seconds": plain, "scoring_seconds": total.scoring_seconds,
                "prompt_tokens": total.prompt_tokens, "completion_tokens": total.completion_tokens,
                "cached_prompt_tokens": total.cached_prompt_tokens,
                # tail probes, and those whose answers showed the host ignores logit_bias (probes then stop)
                "tail_calls": total.tail_calls, "untrusted_tail_calls": total.untrusted_tail_calls,
            })
    return rows


def measure(args: argparse.Namespace, latency: LatencyModel) -> tuple[list[dict], str]:
    """Record what is missing when asked (or nothing is recorded yet), then measure on a replay."""
    items = problems("test", args.problems)
    gemma = prepare("gemma3")
    prepare("smollm2")
    pair = load_pair()
    path = Path(args.recording).expanduser()
    if args.record or not path.exists():
        print(f"recording the hosted stand-in's answers into {path} (serve-model on loopback) …", file=sys.stderr)
        with model_server(gemma, name=HOSTED_NAME) as url, ReplayHost(path, upstream=url, latency=latency) as host:
            rows = run_workload(host.base_url, args, items, pair, gemma, latency)
        print(f"{host.stats.recorded} answers recorded, {host.stats.replayed} replayed", file=sys.stderr)
        if host.stats.recorded == 0:  # every answer came from the replay: these timings hold
            return rows, f"{len(host.recording)} answers in {path}"
    cache = None if args.prompt_cache == "none" else PromptCache.named(args.prompt_cache)
    with ReplayHost(path, latency=latency, miss_hint=MISS_HINT, prompt_cache=cache) as host:
        rows = run_workload(host.base_url, args, items, pair, gemma, latency)
    return rows, f"{len(host.recording)} answers in {path}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=6, help="held-out problems (default 6)")
    ap.add_argument("--max-tokens", type=int, default=40, help="tokens per answer at most (default 40)")
    ap.add_argument("--alpha", type=float, default=1.0, help="proxy-tuning strength (default 1)")
    ap.add_argument("--top-k", type=int, default=20, help="top logprobs per position (default 20)")
    ap.add_argument("--chunk", type=int, default=None, help="speculative chunk (default: adaptive)")
    ap.add_argument("--drafts", type=int, default=None, help="speculative: most drafts per call (default: adaptive)")
    ap.add_argument("--ttft", type=float, default=0.4, help="modelled time to first token, s (default 0.4)")
    ap.add_argument("--per-token", type=float, default=0.015, help="modelled time per further token, s (default 0.015)")
    ap.add_argument("--jitter", type=float, default=0.1, help="ttft varies by ±this fraction (default 0.1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the jitter (default 0)")
    ap.add_argument("--price-prompt", type=float, default=PRICE_PROMPT,
                    help=f"$ per million prompt tokens (default {PRICE_PROMPT}: gpt-3.5-turbo-instruct)")
    ap.add_argument("--price-completion", type=float, default=PRICE_COMPLETION,
                    help=f"$ per million completion tokens (default {PRICE_COMPLETION}: gpt-3.5-turbo-instruct)")
    ap.add_argument("--prompt-cache", choices=[*RULES, "none"], default="openai",
                    help="the provider's prompt-cache rule for cached input tokens (default openai: from 1,024 tokens, "
                         "in blocks of 128; deepseek: blocks of 64; exact: every repeated token)")
    ap.add_argument("--cached-price", type=float, default=None,
                    help="$ per million cached prompt tokens (default: half of --price-prompt, OpenAI's discount "
                         "for gpt-4o-class models)")
    ap.add_argument("--recording", default=str(cache_dir() / "replay" / f"{HOSTED_NAME}.jsonl"),
                    help="the recorded answers, JSON lines (default: under the model cache)")
    ap.add_argument("--record", action="store_true", help="fill misses from the hosted stand-in, then measure")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--no-stream", action="store_true", help="leave out the rows with streamed chunks")
    ap.add_argument("--no-prefetch", action="store_true",
                    help="do not run the small models while a call is in flight (to measure what it hides)")
    args = ap.parse_args()
    if args.problems < 1 or args.max_tokens < 1 or args.top_k < 1 or (args.chunk is not None and args.chunk < 1):
        ap.error("--problems, --max-tokens, --top-k and --chunk must be >= 1")
    if args.cached_price is None:
        args.cached_price = args.price_prompt / 2
    if args.price_prompt < 0 or args.price_completion < 0 or args.cached_price < 0:
        ap.error("prices must be >= 0")
    if args.no_prefetch:
        from blackbox_proxy.decoding.base import Decoder

        Decoder.prefetch = lambda self: None  # the old behaviour: all scoring after each answer
    try:
        latency = LatencyModel(ttft=args.ttft, per_token=args.per_token, jitter=args.jitter, seed=args.seed)
        rows, source = measure(args, latency)
    except ProxyTuningError as exc:
        sys.exit(f"error: {exc}")
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"replayed API: ttft {latency.ttft:g} s ±{latency.jitter:.0%}, {latency.per_token * 1000:g} ms per further "
          f"token ({source}); prices ${args.price_prompt:g} / ${args.price_completion:g} per million prompt / "
          f"completion tokens, ${args.cached_price:g} per million cached prompt tokens ({args.prompt_cache} rule)")
    print("| strategy | decoding | alpha | tokens | calls / token | API wait / plain | wall / plain | scoring s / token "
          "| overlapped s / token | billed prompt / token (cached) | billed completion / token | $ / 1k tokens "
          "| cost / plain | cost / plain, cached priced | drafts / call | tail probes (untrusted) | correct |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    def ratio(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f}"

    for r in rows:
        print(f"| {r['strategy']} | {r['decoding']} | {r['alpha']:g} | {r['tokens']} | {r['calls_per_token']:.2f} "
              f"| {ratio(r['api_wait_vs_plain'])} | {ratio(r['wall_vs_plain'])} | {r['scoring_s_per_token']:.3f} "
              f"| {r['overlapped_s_per_token']:.3f} "
              f"| {r['prompt_tokens_per_token']:.0f} ({r['cached_prompt_tokens_per_token']:.0f}) "
              f"| {r['completion_tokens_per_token']:.2f} | {r['usd_per_1k_tokens']:.4f} | {ratio(r['cost_vs_plain'])} "
              f"| {ratio(r['cost_vs_plain_cached'])} | {r['drafts_per_call']:.1f} "
              f"| {r['tail_calls']} ({r['untrusted_tail_calls']}) | {r['correct']} |")


if __name__ == "__main__":
    main()
