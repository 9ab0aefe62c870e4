"""Local scoring cost per generated token on the embedded default, variants interleaved.

    python benchmarks/scoring.py [--problems 4] [--threads 1] [--hosted gemma|same-tokenizer] [--json]

Gemma-3-270M (base; another tokenizer) is served on loopback (``--hosted same-tokenizer``:
SmolLM2 itself, adapter off, so the same-tokenizer fast path runs); the SmolLM2
expert/anti-expert pair scores each position. Variants, same prompts, same greedy decoding:
- paired:      adapter on/off as two rows of one forward (``AdapterRows``), tree attention, the
               prompt's common prefix reused across generations, logits only where read (default);
- paired-peft: the same two rows through peft's mixed batch (``adapter_names``), no prompt reuse,
               logits at every position: the scoring as it was before these changes;
- separate:    two forwards per step (adapter on, adapter off), tree attention;
- sequential:  two forwards per step and one forward per candidate path (no tree mask): the oracle.
Each problem runs every variant in turn (rotating the order), so load on a shared machine hits
them alike; ratios are medians of per-problem ratios. Work is counted, not timed: model calls
per step, positions (tokens fed) per call, row-positions per step. ``max |d offset|`` compares
each variant's offsets (log P_E - log P_A per candidate) with the sequential oracle's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from blackbox_proxy import ProxyTuner  # noqa: E402
from blackbox_proxy.apps.model_server import create_app  # noqa: E402
from blackbox_proxy.apps.openai_http import ServerThread  # noqa: E402
from blackbox_proxy.harness.demo import HOSTED_NAME, load_pair  # noqa: E402
from blackbox_proxy.harness.embedded import prepare  # noqa: E402
from blackbox_proxy.evaluation.arithmetic import STOP, problems  # noqa: E402
from blackbox_proxy.local import adapter_rows, engine, sessions  # noqa: E402
from blackbox_proxy.local.runner import ModelRunner  # noqa: E402

VARIANTS = ("paired", "paired-peft", "separate", "sequential")


class Counter:
    """Counts the small model's calls and the tokens fed to them (a forward pre-hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = self.positions = self.row_positions = 0
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.calls += 1
            self.positions += ids.shape[1]
            self.row_positions += ids.shape[0] * ids.shape[1]


def configure(variant: str, expert, anti, stores: dict) -> None:
    """Switch the scoring path: the pairing checks' verdicts, prompt reuse, logits kept."""
    rows = adapter_rows.adapter_rows(expert.model, expert.adapter_name)
    rows.ok = variant in ("paired", "separate")
    expert._mixed_ok = variant.startswith("paired")
    expert._tree_ok = anti._tree_ok = variant != "sequential"
    sessions.PROMPTS = stores[variant] if variant != "paired-peft" else sessions.PromptStore()
    # before this change every position was projected onto the vocabulary
    engine.takes_logits_to_keep = KEEPS if variant != "paired-peft" else (lambda model: False)


KEEPS = engine.takes_logits_to_keep


def offsets(result) -> list[list[float]]:
    return [[c.expert_logprob - c.anti_expert_logprob for c in step.candidates] for step in result.trace]


def worst_gap(a: list[list[float]], b: list[list[float]]) -> float:
    gaps = [abs(x - y) for sa, sb in zip(a, b) for x, y in zip(sa, sb) if x != y and abs(x) < 1e9 and abs(y) < 1e9]
    return max(gaps, default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    ap.add_argument("--hosted", choices=("gemma", "same-tokenizer"), default="gemma")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    expert, anti = load_pair()
    if args.hosted == "gemma":
        hosted_path, hosted_name = prepare("gemma3"), HOSTED_NAME
    else:
        hosted_path, hosted_name = prepare("smollm2"), "smollm2"
    runner = ModelRunner.from_pretrained(str(hosted_path), name=hosted_name)
    counter = Counter(expert.model)
    items = problems("test", args.problems)
    stores = {v: sessions.PromptStore() for v in variants}
    stats = {v: {"steps": 0, "scoring": 0.0, "api": 0.0, "calls": 0, "positions": 0, "row_positions": 0,
                 "per_problem": [], "texts": [], "offsets": []} for v in variants}
    with ServerThread(create_app(runner)) as server:
        tuner = ProxyTuner(base_url=server.base_url, model=hosted_name, expert=expert, anti_expert=anti,
                           hosted_tokenizer=str(hosted_path), top_k=20)
        tuner.generate(items[0].hosted_prompt(), max_tokens=4)  # warm-up and self-checks
        for i, p in enumerate(items):
            for variant in variants[i % len(variants):] + variants[: i % len(variants)]:
                configure(variant, expert, anti, stores)
                before = (counter.calls, counter.positions, counter.row_positions)
                r = tuner.generate(p.hosted_prompt(), max_tokens=args.max_tokens, stop=STOP)
                s = stats[variant]
                steps = len(r.trace)
                s["steps"] += steps
                s["scoring"] += r.usage.scoring_seconds
                s["api"] += r.usage.api_seconds
                for key, old, new in zip(("calls", "positions", "row_positions"), before,
                                         (counter.calls, counter.positions, counter.row_positions)):
                    s[key] += new - old
                s["per_problem"].append(r.usage.scoring_seconds / max(1, steps))
                s["texts"].append(r.text)
                s["offsets"].extend(offsets(r))
    configure("paired", expert, anti, stores)
    first, oracle = variants[0], "sequential" if "sequential" in variants else variants[0]
    rows = []
    for v in variants:
        s = stats[v]
        rows.append({
            "variant": v, "steps": s["steps"], "scoring_s_per_step": s["scoring"] / max(1, s["steps"]),
            "ratio": statistics.median(a / b for a, b in zip(s["per_problem"], stats[first]["per_problem"])),
            "calls_per_step": s["calls"] / max(1, s["steps"]),
            "positions_per_call": s["positions"] / max(1, s["calls"]),
            "row_positions_per_step": s["row_positions"] / max(1, s["steps"]),
            "api_s_per_step": s["api"] / max(1, s["steps"]), "same_text": s["texts"] == stats[first]["texts"],
            "max_offset_gap_vs_oracle": worst_gap(s["offsets"], stats[oracle]["offsets"]),
        })
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "hosted": args.hosted, "rows": rows}, indent=1))
        return
    print(f"hosted {args.hosted}, {torch.get_num_threads()} torch thread(s), {args.problems} problems")
    print(f"| variant | steps | scoring s/step | ratio vs {first} | model calls/step | positions/call | "
          f"row-positions/step | API s/step | same text | max abs d offset vs {oracle} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['steps']} | {r['scoring_s_per_step']:.3f} | {r['ratio']:.2f} | "
              f"{r['calls_per_step']:.2f} | {r['positions_per_call']:.1f} | {r['row_positions_per_step']:.1f} | "
              f"{r['api_s_per_step']:.3f} | {r['same_text']} | {r['max_offset_gap_vs_oracle']:.1e} |")


if __name__ == "__main__":
    main()
