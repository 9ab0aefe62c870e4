"""Proxy tuning through a chat-only host (OpenAI-like: no continuation, top-20) beside a host that continues.

SmolLM2-135M-Instruct is the hosted model twice on loopback: behind ``serve-model
--openai-like`` (chat completions only, OpenAI's fields only, a trailing assistant message
answered with a new turn, top-20) and behind the plain ``serve-model`` (which continues a
partial assistant answer: ``chat-prefix``). The expert is it with the shipped arithmetic LoRA,
the anti-expert it without, so the hosted model *is* the anti-expert and exact proxy tuning is
the expert itself. The demo task's questions go as chat messages; every system is greedy.

    python benchmarks/chat_only.py --items 200 --out bench_chat_only

Systems (``blackbox-proxy eval``'s, resumable: results stay in ``--out``):

- on the chat-only host: ``hosted`` (plain chat, no tuning), ``auto`` (the chat-only default:
  continuation by instruction, speculative chunks), ``per-step`` (one copy call per token);
- on the continuing host: ``per-step`` and ``speculative`` (chat-prefix), ``white-box`` and
  ``expert`` (local).

Then, with ``--divergence N`` (default 30 items), how far the emulated continuation is from a
real one at every position of white-box's answers: the copy made (greedy, with the copy bias),
the top-1 agreement of the two next-token distributions, their total variation over the top 20,
and whether the tuned argmax over each top-20 is white-box's token.

Prints accuracy (strict ``#### N``), the share of the continuing host's per-step gain over the
hosted model reached, API calls and billed tokens (prompt + completion) per generated token,
and that bill as a multiple of the hosted model's own (plain generation).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

from blackbox_proxy.apps.model_server import create_app
from blackbox_proxy.apps.openai_http import ServerThread
from blackbox_proxy.decoding.prefix import HostedPrompt, Prefix
from blackbox_proxy.evaluation.runner import read_results, run_eval
from blackbox_proxy.evaluation.systems import Settings
from blackbox_proxy.evaluation.tasks import load_task
from blackbox_proxy.harness.embedded import adapter_path, prepare
from blackbox_proxy.hosts.client import HostedClient
from blackbox_proxy.local.runner import ModelRunner
from blackbox_proxy.local.scorer import Scorer
from blackbox_proxy.tokens.loaders import load_hosted_vocabulary

CHAT_SYSTEMS = ("hosted", "auto", "per-step")
PREFIX_SYSTEMS = ("per-step", "speculative", "white-box", "expert")


def rows_of(out: Path) -> dict[str, dict]:
    by: dict[str, dict] = defaultdict(dict)
    for r in read_results(out / "results.jsonl"):
        by[r["system"]][r["item"]] = r
    return by


def summarise(got: dict) -> dict:
    n = len(got)
    usage = [r.get("usage") or {} for r in got.values()]
    tokens = sum(u.get("generated_tokens") or u.get("completion_tokens", 0) for u in usage)
    calls = sum(u.get("api_calls", 0) for u in usage)
    billed = sum(u.get("prompt_tokens", 0) + u.get("completion_tokens", 0) for u in usage)
    return dict(items=n, accuracy=sum(bool(r.get("correct")) for r in got.values()) / max(1, n),
                calls_per_token=calls / max(1, tokens) if calls else None,
                billed_per_token=billed / max(1, tokens) if calls else None)


def next_logprobs(scorer: Scorer, ids: list[int]) -> torch.Tensor:
    with torch.no_grad(), scorer.forward_context():
        return torch.log_softmax(scorer.model(torch.tensor([ids])).logits[0, -1].float(), -1)


def divergence(items, white: dict, chat_url: str, prefix_url: str, tokenizer_path: str, limit: int) -> dict:
    """Emulated (copy) against real (chat-prefix) continuations at every position of white-box's
    greedy answers, on the first ``limit`` items."""
    expert, anti = Scorer.pair_from_adapter(tokenizer_path, str(adapter_path()), render="chat")
    vocab = load_hosted_vocabulary(tokenizer_path)
    chat = HostedClient(base_url=chat_url, model="smollm2", mode="chat", dialect="openai", hosted_vocab=vocab,
                        max_retries=1)
    real = HostedClient(base_url=prefix_url, model="smollm2", mode="chat-prefix", hosted_vocab=vocab, max_retries=1)
    hosts = {"chat": chat.capabilities(20), "real": real.capabilities(20)}
    counts = dict(positions=0, copied=0, top1=0, tuned_real=0, tuned_emulated=0, tv=0.0)
    for item in items[:limit]:
        answer = white.get(item.id, {}).get("output") or ""
        messages = tuple((m["role"], m["content"]) for m in item.message_dicts())
        prompt = HostedPrompt(messages=messages)
        ids = vocab.encode_bytes(answer.encode("utf-8")) or []
        head = expert.prompt_ids(messages=item.message_dicts())
        for t in range(1, len(ids)):
            prefix = Prefix(vocab.bytes_of(ids[:t]), tuple(ids[:t]))
            a = real.complete(prompt.request(prefix, hosts["real"], max_tokens=1, temperature=0.0))[0]
            e = chat.complete(prompt.request(prefix, hosts["chat"], max_tokens=1, temperature=0.0))[0]
            counts["positions"] += 1
            if e.copy_failed or not e.positions or not a.positions:
                continue
            counts["copied"] += 1
            pa = {c.token_id: c.logprob for c in a.positions[0].candidates}
            pe = {c.token_id: c.logprob for c in e.positions[0].candidates}
            counts["top1"] += max(pa, key=pa.get) == max(pe, key=pe.get)
            keys = set(pa) | set(pe)
            gap = (abs(math.exp(pa.get(k, -math.inf)) - math.exp(pe.get(k, -math.inf))) for k in keys)
            counts["tv"] += 0.5 * sum(gap)
            le, la = next_logprobs(expert, head + ids[:t]), next_logprobs(anti, head + ids[:t])
            want = ids[t]
            for name, top in (("tuned_real", pa), ("tuned_emulated", pe)):
                scored = {k: v + float(le[k] - la[k]) for k, v in top.items() if k is not None}
                counts[name] += max(scored, key=scored.get) == want
    chat.close()
    real.close()
    n, c = max(1, counts["positions"]), max(1, counts["copied"])
    return dict(positions=counts["positions"], copied=counts["copied"] / n, top1_agreement=counts["top1"] / c,
                total_variation=counts["tv"] / c, tuned_argmax_real=counts["tuned_real"] / c,
                tuned_argmax_emulated=counts["tuned_emulated"] / c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--divergence", type=int, default=30, help="items whose positions are compared (0: none)")
    ap.add_argument("--chat-systems", default=",".join(CHAT_SYSTEMS))
    ap.add_argument("--prefix-systems", default=",".join(PREFIX_SYSTEMS))
    ap.add_argument("--out", type=Path, default=Path("bench_chat_only"))
    args = ap.parse_args()
    smol = str(prepare("smollm2"))
    task = load_task("arithmetic", None, limit=args.items)
    chat_names = [n for n in args.chat_systems.split(",") if n]
    prefix_names = [n for n in args.prefix_systems.split(",") if n]
    chat_runner = ModelRunner.from_pretrained(smol, name="smollm2")
    prefix_runner = ModelRunner.from_pretrained(smol, name="smollm2")
    common = dict(model="smollm2", expert_adapter=str(adapter_path()), anti_expert=smol, hosted_tokenizer=smol,
                  top_k=20, max_retries=2)
    with ServerThread(create_app(chat_runner, max_top_logprobs=20, openai_like=True)) as chat, \
            ServerThread(create_app(prefix_runner, max_top_logprobs=20)) as prefix:
        runs = (("chat", chat, chat_names, dict(dialect="openai")), ("chat-prefix", prefix, prefix_names, {}))
        for mode, server, names, extra in runs:
            if not names:
                continue
            run_eval(task, names, args.out / mode, tuner=dict(common, base_url=server.base_url, mode=mode, **extra),
                     settings=Settings(alpha=args.alpha, temperature=0.0, mode=mode), base=smol,
                     fingerprint=dict(model="smollm2", mode=mode, top_k=20, alpha=args.alpha, task=task.name,
                                      data=task.digest, bench="chat_only"),
                     concurrency=args.concurrency, progress=False)
        by_chat, by_prefix = rows_of(args.out / "chat"), rows_of(args.out / "chat-prefix")
        report = {"chat-only host": {n: summarise(by_chat.get(n, {})) for n in chat_names},
                  "continuing host": {n: summarise(by_prefix.get(n, {})) for n in prefix_names}}
        if args.divergence and by_prefix.get("white-box"):
            report["divergence"] = divergence(task.items, by_prefix["white-box"], chat.base_url, prefix.base_url, smol,
                                              args.divergence)
    hosted = report["chat-only host"].get("hosted") or {}
    gain = (report["continuing host"].get("per-step") or {}).get("accuracy", 0) - hosted.get("accuracy", 0)
    plain = hosted.get("billed_per_token")
    print(f"{args.items} items of the arithmetic task as chat messages, top-20, alpha {args.alpha:g}, greedy; "
          "hosted SmolLM2-135M-Instruct = the anti-expert, expert = + arithmetic LoRA")
    print("| host | system | accuracy | share of per-step's gain | API calls / token | billed tokens / token | "
          "bill vs plain |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for host, systems in (("chat-only", report["chat-only host"]), ("continuing", report["continuing host"])):
        for name, row in systems.items():
            share = (row["accuracy"] - hosted.get("accuracy", 0)) / gain if gain > 0 and name != "hosted" else None
            times = row["billed_per_token"] / plain if plain and row["billed_per_token"] else None
            print(f"| {host} | {name} | {row['accuracy']:.1%} ({round(row['accuracy'] * row['items'])}/{row['items']}) "
                  f"| {fmt(share, '.0%')} | {fmt(row['calls_per_token'], '.3f')} | "
                  f"{fmt(row['billed_per_token'], '.1f')} | {fmt(times, '.1f')}x |")
    if "divergence" in report:
        d = report["divergence"]
        print(f"\nEmulated continuation against a real one, at {d['positions']} positions of white-box's answers: "
              f"copied {d['copied']:.1%}; after a copy, top-1 agreement {d['top1_agreement']:.1%}, total variation "
              f"{d['total_variation']:.3f}, tuned argmax = white-box's {d['tuned_argmax_emulated']:.1%} "
              f"(real continuation: {d['tuned_argmax_real']:.1%})")
    (args.out / "chat_only.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
