"""Held-out evaluation of the demo's task: hosted alone vs expert alone vs proxy-tuned.

    python examples/evaluate_task.py --n 200                  # ~1 h on 2 CPU cores
    python examples/evaluate_task.py --n 200 --alpha 2.0 --systems tuned

Each answer is appended (and flushed) to a JSONL file as soon as it exists; re-running the same
command skips what is done, so an interrupted run resumes. At the end a markdown table is
printed. Metric: strict = the ``#### N`` line holds the right number; lenient = the last number
written is right; formatted = a ``#### N`` line is present.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from blackbox_proxy import ProxyTuner  # noqa: E402
from blackbox_proxy.harness.demo import HOSTED_NAME, load_pair, model_server  # noqa: E402
from blackbox_proxy.harness.embedded import prepare  # noqa: E402
from blackbox_proxy.evaluation.arithmetic import STOP, problems, score  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="held-out problems")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--systems", default="hosted,expert,tuned", help="comma-separated subset of hosted,expert,tuned")
    ap.add_argument("--out", type=Path, default=Path("task_eval.jsonl"))
    args = ap.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    tuned_name = f"tuned(alpha={args.alpha:g},k={args.top_k})"
    done: set[tuple[int, str]] = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done.add((row["id"], row["system"]))
    items = problems("test", args.n)
    todo = [(i, s) for i in range(args.n) for s in systems if (i, tuned_name if s == "tuned" else s) not in done]
    print(f"{len(todo)} answers to compute ({len(done)} already in {args.out})")
    if todo:
        import openai
        from tqdm import tqdm

        gemma = prepare("gemma3")
        with model_server(gemma, name=HOSTED_NAME) as base_url, args.out.open("a") as sink:
            expert, anti = load_pair()
            client = openai.OpenAI(base_url=base_url, api_key="no-key")
            tuner = ProxyTuner(base_url=base_url, model=HOSTED_NAME, expert=expert, anti_expert=anti,
                               hosted_tokenizer=str(gemma), top_k=args.top_k, check_hosted=True)
            for i, system in tqdm(todo, desc="answers"):
                p = items[i]
                started = time.perf_counter()
                extra = {}
                if system == "hosted":
                    text = client.completions.create(model=HOSTED_NAME, prompt=p.hosted_prompt(), temperature=0,
                                                     max_tokens=args.max_tokens, stop=STOP).choices[0].text
                    extra = {"api_calls": 1}
                elif system == "expert":
                    text = expert.generate(messages=p.messages(), max_tokens=args.max_tokens, stop=STOP)
                else:
                    result = tuner.generate(p.hosted_prompt(), max_tokens=args.max_tokens, alpha=args.alpha, stop=STOP)
                    text = result.text
                    u = result.usage
                    extra = {"api_calls": u.api_calls, "tokens": u.generated_tokens, "api_seconds": round(u.api_seconds, 3),
                             "scoring_seconds": round(u.scoring_seconds, 3)}
                    system = tuned_name
                row = {"id": i, "system": system, "question": p.question, "answer": p.answer, "output": text,
                       **score(text, p), "seconds": round(time.perf_counter() - started, 3), **extra}
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                sink.flush()
            tuner.close()
            client.close()
    print(table(args.out, args.n))


def table(path: Path, n: int) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by: dict[str, list[dict]] = {}
    for row in rows:
        if row["id"] < n:
            by.setdefault(row["system"], []).append(row)
    lines = ["| system | n | strict (#### N correct) | lenient (last number correct) | has #### line | API calls / answer |",
             "|---|---|---|---|---|---|"]
    order = sorted(by, key=lambda s: (not s.startswith("hosted"), not s.startswith("expert"), s))
    for system in order:
        group = by[system]
        k = len(group)
        calls = [r["api_calls"] for r in group if "api_calls" in r]
        lines.append(f"| {system} | {k} | {sum(r['strict'] for r in group) / k:.1%} | {sum(r['lenient'] for r in group) / k:.1%} "
                     f"| {sum(r['formatted'] for r in group) / k:.1%} | {sum(calls) / len(calls) if calls else 0:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
