"""One proxy-tuning workload run against any OpenAI-compatible host, and two hosts compared.

This is how the project checks that it works unchanged against llama.cpp and vLLM (``pytest -m
interop``, tests/test_interop.py): the same hosted model is served by the project's own
server (the reference) and by the other server, the same workload runs against each, and
:func:`compare` measures how far the answers are apart. Two servers never compute exactly the
same numbers (llama.cpp runs the quantised GGUF, vLLM bf16 kernels), so agreement is measured,
not assumed:

- ``positions``: the hosted top-k at teacher-forced prefixes, through the real client (dialect,
  parser, byte recovery): top-1 agreement, |difference| of the logprobs both report, and the end
  of text where the reference puts it in the top-k;
- ``per-step``, ``speculative`` (greedy and seeded sampling) and ``resample`` (2 whole answers,
  one picked) generations in ``completions`` mode, and ``per-step`` in ``chat-prefix`` mode
  where the host can continue an assistant message: texts, finish reasons, API calls per token.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigurationError
from ..hosts.client import HostedClient
from ..tokens.vocab import common_prefix
from ..types import HostedRequest

RUNS = ("per-step", "speculative-greedy", "speculative-sampled", "resample", "chat-prefix")
RESAMPLE_SAMPLES = 2


@dataclasses.dataclass
class Generation:
    text: str
    finish_reason: str
    api_calls: int
    generated_tokens: int


@dataclasses.dataclass
class Position:
    prompt: str
    top: list[tuple[str, float]]  # (key, logprob), best first; key "<end>" for the end of text
    dropped: int


@dataclasses.dataclass
class WorkloadResult:
    dialect: str | None
    positions: list[Position]
    runs: dict[str, list[Generation]]  # run name -> one generation per prompt
    errors: dict[str, str]  # run name -> the one-line error a run raised (e.g. chat-prefix refused)


def _key(cand: Any) -> str:
    return "<end>" if cand.is_end else cand.data.decode("utf-8", "backslashreplace")


def hosted_positions(client: HostedClient, prompts: Sequence[str], top_k: int) -> list[Position]:
    """The hosted top-k after each prompt (greedy, one token), parsed by ``client``."""
    ends = sorted(client.vocab.end_ids) if client.vocab is not None else []
    out = []
    for prompt in prompts:
        request = HostedRequest(mode="completions", prompt=prompt, max_tokens=1, top_k=top_k, temperature=0.0)
        [result] = client.complete(request)
        if not result.positions and ends:
            # the server drew the end and reported nothing (OpenAI, llama.cpp): ask again with the
            # end banned from the draw, as the decoders do; the logprobs are the unbanned ones
            request = dataclasses.replace(request, logit_bias=tuple((i, -100.0) for i in ends))
            [result] = client.complete(request)
        if not result.positions:
            out.append(Position(prompt, [], 0))
            continue
        pos = result.positions[0]
        out.append(Position(prompt, [(_key(c), c.logprob) for c in pos.candidates], pos.dropped))
    return out


def run_workload(base_url: str, *, model: str, expert: Any, anti_expert: Any, hosted_tokenizer: str,
                 prompts: Sequence[str], position_prompts: Sequence[str] = (), max_tokens: int = 24,
                 top_k: int = 10, alpha: float = 1.0, stop: Sequence[str] | None = None,
                 runs: Sequence[str] = RUNS, dialect: str | None = None) -> WorkloadResult:
    """Run the workload against the host at ``base_url`` (see the module docstring)."""
    from ..tuner import ProxyTuner

    unknown = set(runs) - set(RUNS)
    if unknown:
        raise ConfigurationError(f"unknown runs {sorted(unknown)}; choose from {', '.join(RUNS)}")
    common = dict(base_url=base_url, model=model, expert=expert, anti_expert=anti_expert,
                  hosted_tokenizer=hosted_tokenizer, top_k=top_k, dialect=dialect, check_hosted=True)
    results: dict[str, list[Generation]] = {}
    errors: dict[str, str] = {}
    with ProxyTuner(mode="completions", **common) as tuner:
        detected = tuner.client.dialect
        positions = hosted_positions(tuner.client, position_prompts, top_k) if position_prompts else []
        settings = {"per-step": dict(strategy="per-step"),
                    "speculative-greedy": dict(strategy="speculative"),
                    "speculative-sampled": dict(strategy="speculative", temperature=1.0),
                    "resample": dict(strategy="resample", temperature=1.0, samples=RESAMPLE_SAMPLES)}
        for name, kw in settings.items():
            if name not in runs:
                continue
            gens = []
            for i, prompt in enumerate(prompts):
                r = tuner.generate(prompt, max_tokens=max_tokens, alpha=alpha, stop=stop, seed=i, **kw)
                gens.append(Generation(r.text, r.finish_reason, r.usage.api_calls, r.usage.generated_tokens))
            results[name] = gens
    if "chat-prefix" in runs:
        try:
            with ProxyTuner(mode="chat-prefix", **common) as tuner:
                gens = []
                for prompt in prompts:
                    r = tuner.generate(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                       alpha=alpha, stop=stop)
                    gens.append(Generation(r.text, r.finish_reason, r.usage.api_calls, r.usage.generated_tokens))
                results["chat-prefix"] = gens
        except ConfigurationError as exc:
            errors["chat-prefix"] = str(exc)
    return WorkloadResult(detected, positions, results, errors)


def compare(reference: WorkloadResult, other: WorkloadResult, *, end_floor: float = -4.0) -> dict[str, Any]:
    """How far ``other``'s answers are from ``reference``'s (same prompts, same order).

    positions: ``top1`` (share of positions whose best candidate is the same), ``logprob_diff``
    (median / 95th percentile / max of |difference| over candidates both report), ``end`` (at
    positions where the reference gives the end a logprob above ``end_floor``: how many times
    the other host reports it too, and the largest |difference|). runs: per run, texts that are
    equal, the mean share of the longer text that is a common prefix, and API calls per token.
    """
    out: dict[str, Any] = {}
    if reference.positions:
        if len(reference.positions) != len(other.positions):
            raise ValueError("the two results hold different numbers of positions")
        same_top, diffs, end_seen, end_diffs, ends, missing = 0, [], 0, [], 0, []
        for ref, oth in zip(reference.positions, other.positions):
            ref_top, oth_top = dict(ref.top), dict(oth.top)
            same_top += bool(ref.top and oth.top and ref.top[0][0] == oth.top[0][0])
            diffs += [abs(v - oth_top[k]) for k, v in ref_top.items() if k in oth_top]
            if ref_top.get("<end>", -1e9) > end_floor:
                ends += 1
                if "<end>" in oth_top:
                    end_seen += 1
                    end_diffs.append(abs(ref_top["<end>"] - oth_top["<end>"]))
                else:
                    missing.append({"prompt_end": ref.prompt[-40:], "reference": ref.top[:4], "other": oth.top[:4],
                                    "other_dropped": oth.dropped})
        diffs.sort()
        out["positions"] = {
            "count": len(reference.positions),
            "top1": same_top / len(reference.positions),
            "logprob_diff": {"median": statistics.median(diffs) if diffs else None,
                             "p95": diffs[int(0.95 * (len(diffs) - 1))] if diffs else None,
                             "max": diffs[-1] if diffs else None, "pairs": len(diffs)},
            "end": {"reference_positions": ends, "reported": end_seen, "max_diff": max(end_diffs, default=None),
                    "missing": missing[:3]},
        }
    runs = {}
    for name, ref_gens in reference.runs.items():
        gens = other.runs.get(name)
        if gens is None:
            continue
        equal = sum(a.text == b.text for a, b in zip(ref_gens, gens))
        prefix = statistics.mean(common_prefix(a.text, b.text) / max(1, len(a.text), len(b.text))
                                 for a, b in zip(ref_gens, gens))
        calls = sum(g.api_calls for g in gens) / max(1, sum(g.generated_tokens for g in gens))
        ref_calls = sum(g.api_calls for g in ref_gens) / max(1, sum(g.generated_tokens for g in ref_gens))
        runs[name] = {"equal": equal, "of": len(ref_gens), "prefix_share": prefix, "calls_per_token": calls,
                      "reference_calls_per_token": ref_calls}
    out["runs"] = runs
    return out
