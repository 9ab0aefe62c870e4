"""The resample strategy on a chat-only host, beside per-step and speculative, on the embedded default.

    python benchmarks/resample.py [--problems 3] [--max-tokens 32] [--samples 4,16,64] [--json]

Gemma-3-270M (base) is served on loopback by this project's model server in a child process.
It has no chat template, so the server is given a pass-through one (the user message is the
prompt, as in completions mode): the model is the same, only the API differs. The SmolLM2 pair
steers it on held-out arithmetic problems:

- ``resample`` in ``chat`` mode (whole answers, n in --samples, temperature 1, top-20 logprobs);
- ``per-step`` (greedy) and ``speculative`` (sampling) in ``completions`` mode, for comparison.

Reported per row: API calls per problem, hosted tokens billed per problem (prompt + completion),
the mean effective sample size, strict accuracy, and wall seconds per problem. One run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from blackbox_proxy import ProxyTuner  # noqa: E402
from blackbox_proxy.harness.demo import HOSTED_NAME, load_pair, model_server  # noqa: E402
from blackbox_proxy.harness.embedded import prepare  # noqa: E402
from blackbox_proxy.evaluation.arithmetic import STOP, problems, score  # noqa: E402

PASS_THROUGH = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--samples", default="4,16,64")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sizes = [int(n) for n in args.samples.split(",")]
    items = problems("test", args.problems)
    gemma = prepare("gemma3")
    # a copy of the hosted model folder whose tokenizer has the pass-through chat template
    hosted_dir = Path(tempfile.mkdtemp(prefix="bbp-chat-")) / "gemma-3-270m"
    hosted_dir.mkdir()
    for item in gemma.iterdir():
        (hosted_dir / item.name).symlink_to(item)
    config_path = hosted_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = PASS_THROUGH
    config_path.unlink()
    config_path.write_text(json.dumps(config))
    expert, anti = load_pair()
    rows = []
    with model_server(hosted_dir, name=HOSTED_NAME) as base_url:
        def run(name: str, mode: str, **kw) -> None:
            tuner = ProxyTuner(base_url=base_url, model=HOSTED_NAME, expert=expert, anti_expert=anti, mode=mode,
                               hosted_tokenizer=str(gemma), top_k=20, check_hosted=True)
            calls = billed = right = 0
            ess = []
            started = time.perf_counter()
            for i, p in enumerate(items):
                prompt = p.hosted_prompt()
                if mode == "chat":
                    r = tuner.generate(messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
                                       stop=STOP, alpha=args.alpha, seed=i, **kw)
                else:
                    r = tuner.generate(prompt, max_tokens=args.max_tokens, stop=STOP, alpha=args.alpha, seed=i, **kw)
                calls += r.usage.api_calls
                billed += r.usage.prompt_tokens + r.usage.completion_tokens
                right += score(r.text, p)["strict"]
                if r.ess is not None:
                    ess.append(r.ess)
            n = len(items)
            rows.append({"run": name, "mode": mode, "api_calls": calls / n, "billed_tokens": billed / n,
                         "ess": sum(ess) / len(ess) if ess else None, "accuracy": right / n,
                         "seconds": (time.perf_counter() - started) / n})

        run("per-step (greedy)", "completions", strategy="per-step", temperature=0.0)
        run("speculative (sampling)", "completions", strategy="speculative", temperature=1.0)
        for size in sizes:
            run(f"resample n={size}", "chat", strategy="resample", temperature=1.0, samples=size)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{args.problems} problems, max {args.max_tokens} tokens, alpha {args.alpha:g}, top-20, hosted Gemma-3-270M")
    print("| run | mode | API calls / problem | hosted tokens billed / problem | mean ESS | strict accuracy | s / problem |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ess = "-" if r["ess"] is None else f"{r['ess']:.1f}"
        print(f"| {r['run']} | {r['mode']} | {r['api_calls']:.1f} | {r['billed_tokens']:.0f} | {ess} | "
              f"{r['accuracy']:.0%} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
