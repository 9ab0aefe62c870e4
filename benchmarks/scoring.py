"""Local scoring cost per generated token on the embedded default, measured side by side.

    python benchmarks/scoring.py [--problems 4] [--json]

Gemma-3-270M (base) is served on loopback; the SmolLM2 expert/anti-expert pair scores each
position. Variants, same prompts, same greedy decoding (so the same tokens):
- paired:     adapter on/off as one batch of two rows, tree attention (the default);
- separate:   two forwards per step (adapter toggled), tree attention;
- sequential: two forwards per step, and one forward per candidate path (no tree mask).
Reports scoring seconds per token and the ratio to `paired`; timings on a shared CPU are
noisy, ratios from one run are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from blackbox_proxy import ProxyTuner  # noqa: E402
from blackbox_proxy.harness.demo import HOSTED_NAME, load_pair  # noqa: E402
from blackbox_proxy.harness.embedded import prepare  # noqa: E402
from blackbox_proxy.apps.model_server import create_app  # noqa: E402
from blackbox_proxy.apps.openai_http import ServerThread  # noqa: E402
from blackbox_proxy.local.runner import ModelRunner  # noqa: E402
from blackbox_proxy.harness.tasks import STOP, problems  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    gemma = prepare("gemma3")
    runner = ModelRunner.from_pretrained(str(gemma), name=HOSTED_NAME)
    expert, anti = load_pair()
    items = problems("test", args.problems)
    rows = []
    with ServerThread(create_app(runner)) as server:
        tuner = ProxyTuner(base_url=server.base_url, model=HOSTED_NAME, expert=expert, anti_expert=anti,
                           hosted_tokenizer=str(gemma), top_k=20)
        tuner.generate(items[0].hosted_prompt(), max_tokens=4)  # warm-up and self-checks
        texts = {}
        for variant in ("paired", "separate", "sequential"):
            expert._mixed_ok = variant == "paired"
            expert._tree_ok = anti._tree_ok = variant != "sequential"
            tokens = scoring = api = 0.0
            started = time.perf_counter()
            outs = []
            for p in items:
                r = tuner.generate(p.hosted_prompt(), max_tokens=40, stop=STOP)
                tokens += r.usage.api_calls
                scoring += r.usage.scoring_seconds
                api += r.usage.api_seconds
                outs.append(r.text)
            texts[variant] = outs
            rows.append({"variant": variant, "steps": int(tokens), "scoring_s_per_step": scoring / tokens,
                         "api_s_per_step": api / tokens, "wall_s": time.perf_counter() - started})
    base = rows[0]["scoring_s_per_step"]
    for row in rows:
        row["scoring_ratio_vs_paired"] = row["scoring_s_per_step"] / base
        row["same_text_as_paired"] = texts[row["variant"]] == texts["paired"]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| variant | steps | scoring s/step | ratio vs paired | API s/step | same text |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['steps']} | {r['scoring_s_per_step']:.3f} | {r['scoring_ratio_vs_paired']:.2f} "
              f"| {r['api_s_per_step']:.3f} | {r['same_text_as_paired']} |")


if __name__ == "__main__":
    main()
