"""Behaviour as one canonical JSON: seeded runs of every strategy, both servers' answers, teacher
forcing, white-box and the fidelity report, on tiny models built here (nothing downloaded).

Run it on two commits and diff the files: a refactoring that changes no behaviour writes the
same file (timings, response ids and creation times are left out; everything else is kept:
texts, finish reasons, call and token counts, every trace step's candidates and offsets, every
speculative chunk, the served JSON and SSE events).

    python benchmarks/equivalence.py --out before.json        # on the old commit
    python benchmarks/equivalence.py --out after.json         # on the new one
    python benchmarks/equivalence.py --diff before.json after.json

Run the old commit's package with ``PYTHONPATH=<its checkout>`` (an editable install of the new
one would be imported otherwise).

What it covers: per-step (greedy, sampled), speculative (greedy and sampled; whole and streamed
chunks; fixed and adaptive chunks; draft trees; tail probes and the candidates-only rule),
resample, on the same tokenizer, across tokenizers (byte alignment) and with text prompts; the
completions, chat-prefix and chat modes; the async tuner's stream; ``serve`` (completions,
chat, streaming, logprobs, echo, n) and ``serve-model`` (logprobs, seeded draws, chat, echo);
``teacher_force``; ``WhiteBoxTuner``; the fidelity report (same and cross tokenizer).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tiny.py: the tests' tiny tokenizers and models

DROP = {"api_seconds", "scoring_seconds", "overlapped_seconds", "id", "created", "wall_seconds", "system_fingerprint"}
PROMPTS = ["The quick brown", "A café in Zürich sells"]


def canonical(value: Any) -> Any:
    """JSON-ready, without timings and per-call identities; floats rounded to 12 digits."""
    if hasattr(value, "to_dict") and not isinstance(value, dict):
        value = value.to_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0])) if k not in DROP}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, bytes):
        return list(value)
    if isinstance(value, float):
        return repr(value) if not math.isfinite(value) else float(f"{value:.12g}")
    return value


def build_models():
    import torch
    from tiny import concentrated, tiny_llama, train_bpe

    torch.set_num_threads(1)
    tok_a, tok_b = train_bpe(400), train_bpe(520, digits=True)
    large, expert, anti = tiny_llama(tok_a, 0, sharpness=20.0), tiny_llama(tok_a, 1), tiny_llama(tok_a, 2)
    expert_b, anti_b = tiny_llama(tok_b, 3), tiny_llama(tok_b, 4)
    live = [tok_a.convert_tokens_to_ids(t) for t in ["a", "b", "c", "d", "e", "f"]]
    letters = [concentrated(tiny_llama(tok_a, s, hidden=32), live, s) for s in (10, 11, 12)]
    return tok_a, tok_b, (large, expert, anti), (expert_b, anti_b), letters


def generations(out: dict, name: str, tuner: Any, configs: list[tuple[str, dict]], prompts=PROMPTS) -> None:
    for label, options in configs:
        for i, prompt in enumerate(prompts):
            key = f"{name}/{label}/{i}"
            try:
                out[key] = canonical(tuner.generate(prompt, **options))
            except Exception as exc:  # noqa: BLE001 - the refusal is behaviour too
                out[key] = {"error": type(exc).__name__, "message": str(exc)}


SPECULATIVE = [
    ("per-step greedy", dict(max_tokens=12)),
    ("per-step sampled", dict(max_tokens=12, temperature=0.8, top_p=0.9, seed=1)),
    ("speculative greedy", dict(max_tokens=12, strategy="speculative")),
    ("speculative greedy chunk 3", dict(max_tokens=12, strategy="speculative", chunk=3)),
    ("speculative greedy one draft", dict(max_tokens=12, strategy="speculative", drafts=1)),
    ("speculative greedy tree 3", dict(max_tokens=12, strategy="speculative", drafts=3, seed=4)),
    ("speculative sampled", dict(max_tokens=12, strategy="speculative", temperature=1.0, seed=2)),
    ("speculative sampled no probes", dict(max_tokens=12, strategy="speculative", temperature=1.0, seed=2,
                                           tail_calls=0)),
    ("speculative sampled tree 3", dict(max_tokens=12, strategy="speculative", temperature=1.0, seed=5, drafts=3)),
    ("speculative stop", dict(max_tokens=12, strategy="speculative", temperature=1.0, seed=6, stop=["e"])),
    ("resample", dict(max_tokens=8, strategy="resample", temperature=1.0, samples=4, seed=3)),
]


def tuners_and_runs(out: dict, models) -> None:
    from blackbox_proxy import AsyncProxyTuner, ProxyTuner, Scorer
    from blackbox_proxy.apps.model_server import create_app
    from blackbox_proxy.apps.openai_http import ServerThread
    from blackbox_proxy.local.runner import ModelRunner

    tok_a, tok_b, (large, expert, anti), (expert_b, anti_b), letters = models
    e_a, a_a = Scorer(expert, tok_a, render="raw", name="E"), Scorer(anti, tok_a, render="raw", name="A")
    e_b, a_b = Scorer(expert_b, tok_b, render="raw", name="Eb"), Scorer(anti_b, tok_b, render="raw", name="Ab")
    e_l, a_l = (Scorer(letters[1], tok_a, render="raw", name="El"), Scorer(letters[2], tok_a, render="raw", name="Al"))
    with ServerThread(create_app(ModelRunner(large, tok_a, name="tiny"), max_top_logprobs=len(tok_a))) as server, \
            ServerThread(create_app(ModelRunner(letters[0], tok_a, name="letters"), max_top_logprobs=50)) as lserver:
        common = dict(base_url=server.base_url, model="tiny", max_retries=0, top_k=5)
        for stream in (False, True):
            suffix = " streamed" if stream else ""
            with ProxyTuner(**common, expert=e_a, anti_expert=a_a, hosted_tokenizer=tok_a,
                            stream_chunks=stream) as same:
                generations(out, "same" + suffix, same, SPECULATIVE)
            with ProxyTuner(**common, expert=e_b, anti_expert=a_b, hosted_tokenizer=tok_a,
                            stream_chunks=stream) as cross:
                generations(out, "cross" + suffix, cross, SPECULATIVE)
            with ProxyTuner(**common, expert=e_a, anti_expert=a_a, hosted_tokenizer="none",
                            stream_chunks=stream) as text:
                generations(out, "text prompts" + suffix, text, SPECULATIVE)
            with ProxyTuner(base_url=lserver.base_url, model="letters", max_retries=0, top_k=3, expert=e_l,
                            anti_expert=a_l, hosted_tokenizer=tok_a, stream_chunks=stream) as letter:
                generations(out, "letters" + suffix, letter, SPECULATIVE, prompts=["The quick brown"] * 3)
        with ProxyTuner(**common, mode="chat-prefix", expert=e_a, anti_expert=a_a, hosted_tokenizer=tok_a) as prefix:
            generations(out, "chat-prefix", prefix, SPECULATIVE[:7])
        with ProxyTuner(**common, mode="chat", expert=e_a, anti_expert=a_a, hosted_tokenizer=tok_a) as chat:
            generations(out, "chat", chat, [("one token", dict(max_tokens=1)), SPECULATIVE[-1],
                                            ("multi-token", dict(max_tokens=4)),
                                            ("speculative", dict(max_tokens=4, strategy="speculative"))])
        from blackbox_proxy import teacher_force

        with ProxyTuner(**common, expert=e_a, anti_expert=a_a, hosted_tokenizer=tok_a) as same:
            out["teacher_force/ids"] = canonical(teacher_force(same, " jumps over the", prompt="The quick brown"))
        with ProxyTuner(**common, expert=e_b, anti_expert=a_b, hosted_tokenizer="none") as text:
            out["teacher_force/bytes"] = canonical(teacher_force(text, " jumps over the", prompt="The quick brown"))

        async def stream_events() -> None:
            for label, options in SPECULATIVE[:7]:
                async with AsyncProxyTuner(**common, expert=e_a, anti_expert=a_a, hosted_tokenizer=tok_a,
                                           batch_scoring=False) as tuner:
                    events = [canonical({"text": ev.text, "steps": len(ev.steps), "result": ev.result})
                              async for ev in tuner.stream("The quick brown", **options)]
                out[f"async stream/{label}"] = events

        asyncio.run(stream_events())
        servers(out, server, tok_a, e_a, a_a)
        fidelity(out, server, tok_a, (large, expert, anti), (e_a, a_a), (e_b, a_b))


def servers(out: dict, server: Any, tok_a: Any, e_a: Any, a_a: Any) -> None:
    import httpx

    from blackbox_proxy import AsyncProxyTuner
    from blackbox_proxy.apps.openai_http import ServerThread
    from blackbox_proxy.apps.tuned_server import create_tuned_app

    def post(base: str, route: str, body: dict) -> Any:
        response = httpx.post(f"{base}/{route}", json=body, timeout=120)
        if body.get("stream") and response.status_code == 200:
            events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
            return [canonical(json.loads(e)) if e != "[DONE]" else e for e in events]
        return {"status": response.status_code, "body": canonical(response.json())}

    model_bodies = {
        "completions logprobs": ("completions", dict(model="tiny", prompt="The quick", max_tokens=5, logprobs=5,
                                                    temperature=0)),
        "completions sampled n": ("completions", dict(model="tiny", prompt="The quick", max_tokens=5, logprobs=2,
                                                     temperature=1.0, seed=5, n=3)),
        "completions echo": ("completions", dict(model="tiny", prompt="The quick", max_tokens=2, logprobs=2,
                                                echo=True, seed=1)),
        "completions stream": ("completions", dict(model="tiny", prompt="The quick", max_tokens=4, logprobs=2,
                                                  stream=True, seed=2)),
        "chat": ("chat/completions", dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          logprobs=True, top_logprobs=3, seed=3)),
        "chat continue": ("chat/completions", dict(model="tiny", messages=[{"role": "user", "content": "Hi"},
                                                                           {"role": "assistant", "content": "The"}],
                                                   max_tokens=4, continue_final_message=True,
                                                   add_generation_prompt=False, seed=4)),
        "bad": ("completions", dict(model="tiny", prompt="The", max_tokens=-1)),
    }
    for label, (route, body) in model_bodies.items():
        out[f"serve-model/{label}"] = post(server.base_url, route, body)
    tuned_bodies = {
        "completions": ("completions", dict(model="tuned", prompt="The quick", max_tokens=6, seed=5)),
        "completions list n": ("completions", dict(model="tuned", prompt=["The quick", "A café"], max_tokens=4,
                                                   temperature=1.0, seed=3, n=2)),
        "completions logprobs": ("completions", dict(model="tuned", prompt="The quick", max_tokens=6, logprobs=3,
                                                     temperature=0)),
        "completions speculative logprobs": ("completions", dict(model="tuned", prompt="The quick", max_tokens=6,
                                                                 logprobs=3, temperature=0, strategy="speculative")),
        "completions speculative sampled": ("completions", dict(model="tuned", prompt="The quick", max_tokens=6,
                                                                logprobs=2, temperature=1, seed=9,
                                                                strategy="speculative")),
        "completions echo": ("completions", dict(model="tuned", prompt="The quick brown", max_tokens=2, logprobs=2,
                                                 echo=True, temperature=0)),
        "completions echo zero": ("completions", dict(model="tuned", prompt="The quick brown", max_tokens=0,
                                                      logprobs=1, echo=True)),
        "completions stream": ("completions", dict(model="tuned", prompt="The quick", max_tokens=6, logprobs=2,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True})),
        "completions stream speculative": ("completions", dict(model="tuned", prompt="The quick", max_tokens=6,
                                                               temperature=0, stream=True, strategy="speculative")),
        "chat": ("chat/completions", dict(model="tuned", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)),
        "chat stream": ("chat/completions", dict(model="tuned", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=5, temperature=0, stream=True, logprobs=True)),
        "resample logprobs refused": ("completions", dict(model="tuned", prompt="x", max_tokens=2, logprobs=1,
                                                          strategy="resample", temperature=1)),
        "alpha out of range": ("completions", dict(model="tuned", prompt="x", max_tokens=2, alpha=1000)),
        "chunk out of range": ("completions", dict(model="tuned", prompt="x", max_tokens=2, chunk=65,
                                                   strategy="speculative")),
        "unknown field": ("completions", dict(model="tuned", prompt="x", max_tokens=2, best_of=3)),
    }
    tuner = AsyncProxyTuner(base_url=server.base_url, model="tiny", expert=e_a, anti_expert=a_a, hosted_tokenizer=tok_a,
                            top_k=5, max_retries=0, batch_scoring=False)
    with ServerThread(create_tuned_app(tuner, name="tuned")) as tuned:
        for label, (route, body) in tuned_bodies.items():
            out[f"serve/{label}"] = post(tuned.base_url, route, body)


def fidelity(out: dict, server: Any, tok_a: Any, models, pair_a, pair_b) -> None:
    from blackbox_proxy import ProxyTuner, Scorer
    from blackbox_proxy.harness.fidelity import run_cross_tokenizer, run_same_tokenizer
    from blackbox_proxy.whitebox import WhiteBoxTuner

    large = models[0]
    white = WhiteBoxTuner(base=Scorer(large, tok_a, render="raw", name="L"), expert=pair_a[0], anti_expert=pair_a[1])
    out["white-box/greedy"] = canonical(white.generate(PROMPTS, max_tokens=8))
    out["white-box/sampled"] = canonical(white.generate(PROMPTS, max_tokens=8, temperature=1.0, seed=7))
    with ProxyTuner(base_url=server.base_url, model="tiny", expert=pair_a[0], anti_expert=pair_a[1],
                    top_k=len(tok_a), hosted_tokenizer=tok_a, max_retries=0) as tuner:
        out["fidelity/same"] = canonical(run_same_tokenizer(white, tuner, PROMPTS, alpha=1.0, max_tokens=6,
                                                            progress=False))
    with ProxyTuner(base_url=server.base_url, model="tiny", expert=pair_b[0], anti_expert=pair_b[1],
                    top_k=40, hosted_tokenizer=tok_a, max_retries=0) as tuner:
        out["fidelity/cross"] = canonical(run_cross_tokenizer(tuner, PROMPTS, alpha=1.0, max_tokens=6, k_ref=40,
                                                              progress=False))


def diff(a: Any, b: Any, path: str = "", ignore: frozenset[str] = frozenset(), tolerance: float = 0.0) -> list[str]:
    if isinstance(a, float) and isinstance(b, float):
        return [] if math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance) else [f"{path}: {a!r} != {b!r}"]
    if type(a) is not type(b):
        return [f"{path}: {a!r:.200} != {b!r:.200}"]
    if isinstance(a, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k in ignore:
                continue
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'after' if k in b else 'before'}")
            else:
                out += diff(a[k], b[k], f"{path}/{k}", ignore, tolerance)
        return out
    if isinstance(a, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items != {len(b)}"] + diff(a[: len(b)], b[: len(a)], path, ignore, tolerance)
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]", ignore, tolerance)]
    return [] if a == b else [f"{path}: {a!r:.200} != {b!r:.200}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the canonical JSON here")
    parser.add_argument("--diff", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), help="compare two files")
    parser.add_argument("--ignore", action="append", default=[], metavar="KEY",
                        help="with --diff: leave this key out of the comparison (a field one side adds)")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="with --diff: floats this close (relative or absolute) count as equal. The hosted "
                             "stand-in reuses cached prompts, so a run that makes other calls before an entry "
                             "can move that entry's logprobs in the 7th digit")
    parser.add_argument("--entries", action="store_true", help="with --diff: list the entries that differ, not how")
    args = parser.parse_args()
    if args.diff:
        before, after = (json.loads(p.read_text()) for p in args.diff)
        if args.entries:
            changed = [k for k in before if diff(before[k], after.get(k), k, frozenset(args.ignore), args.tolerance)]
            print("\n".join(changed) or "identical")
            print(f"{len(changed)} of {len(before)} entries differ")
            sys.exit(1 if changed else 0)
        lines = diff(before, after, ignore=frozenset(args.ignore), tolerance=args.tolerance)
        print("\n".join(lines[:200]) or "identical")
        print(f"{len(lines)} difference(s) over {len(before)} entries")
        sys.exit(1 if lines else 0)
    out: dict[str, Any] = {}
    tuners_and_runs(out, build_models())
    text = json.dumps(out, indent=1, ensure_ascii=False, sort_keys=True)
    if args.out:
        args.out.write_text(text + "\n")
        print(f"{len(out)} entries written to {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
