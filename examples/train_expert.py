"""Train the demo's expert: a LoRA adapter that teaches SmolLM2-135M-Instruct the arithmetic
task's answer format (worked equation, then ``#### N``).

    python examples/train_expert.py                 # ~25 min on 2 CPU cores, seed 0
    python examples/train_expert.py --steps 20 --out /tmp/adapter   # a quick try
    python examples/train_expert.py --base qwen-coder-0.5b --data qwen_family/train.jsonl \
        --out qwen_family/acme-lora --steps 60 --max-len 96        # benchmarks/qwen_family.py's expert (~8 min)

The anti-expert is SmolLM2-135M-Instruct as shipped; expert = the same model + this adapter.
Data: ``blackbox_proxy.evaluation.arithmetic.problems("train", N)`` (generated, seeded; disjoint from the test
split). Loss on the assistant's answer tokens only. Deterministic on CPU for a given seed.
The adapter is written to blackbox_proxy/data/smollm2-arith-lora (≈3.7 MB) with a training log.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from blackbox_proxy.harness.embedded import ADAPTER_DIR, MODELS, prepare
from blackbox_proxy.evaluation.arithmetic import problems


def encode(tokenizer, messages, solution, max_len, prompt=None):
    """(ids, labels) of one example: the chat-rendered ``messages`` (or ``prompt``, already
    rendered), then ``solution`` and the end of the turn; the loss is on the answer only."""
    if prompt is None:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(solution + "<|im_end|>", add_special_tokens=False)
    ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_len]
    return ids, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--train-size", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ADAPTER_DIR)
    ap.add_argument("--base", default="smollm2", help="embedded model key (blackbox_proxy.harness.embedded.MODELS)")
    ap.add_argument("--data", type=Path, default=None,
                    help="JSONL of {prompt or question, solution} (default: the built-in arithmetic task)")
    ap.add_argument("--max-len", type=int, default=160)
    args = ap.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    base_dir = prepare(args.base)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    if args.data is None:
        data = [encode(tokenizer, p.messages(), p.solution, args.max_len) for p in problems("train", args.train_size)]
        task = "blackbox_proxy.evaluation.arithmetic arithmetic, train split"
    else:
        rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()][:args.train_size]
        data = [encode(tokenizer, [{"role": "user", "content": r.get("question", "")}], r["solution"], args.max_len,
                       prompt=r.get("prompt")) for r in rows]
        task = f"{args.data.name} ({len(rows)} examples)"
    order = list(range(len(data)))
    random.Random(args.seed).shuffle(order)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    log = []
    started = time.time()
    model.train()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optim.param_groups:
            group["lr"] = lr
        batch = [data[order[(step * args.batch + i) % len(order)]] for i in range(args.batch)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad()
        log.append({"step": step + 1, "loss": round(float(loss), 4), "lr": lr})
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps} loss {float(loss):.4f} lr {lr:.2e} {time.time() - started:.0f}s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].base_model_name_or_path = MODELS[args.base].title  # no local paths
    model.save_pretrained(args.out)
    (args.out / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
    (args.out / "training_log.json").write_text(json.dumps({
        "base": f"{MODELS[args.base].title} ({MODELS[args.base].install}; GGUF, dequantised)",
        "task": task,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "seconds": round(time.time() - started, 1),
        "loss": log,
    }, indent=1))
    print(f"saved adapter to {args.out}")


if __name__ == "__main__":
    main()
