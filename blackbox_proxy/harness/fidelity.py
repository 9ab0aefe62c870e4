"""How close is black-box proxy tuning to exact proxy tuning? (``blackbox-proxy compare``)

On teacher-forced text (a reference continuation: the white-box greedy output by default), at
every position t and for every k, against the exact proxy-tuned distribution p~_t:

- ``per_step``: the per-step strategy's distribution (the hosted top-k, offsets added,
  renormalised over the k candidates), produced by the real pipeline (this project's model
  server over HTTP, the client's parser, the scorers and the combiner): total variation,
  KL(q || p~) (finite: q's support lies inside p~'s), and whether its argmax is p~'s;
- ``floor``: the mass of p~ outside the k candidates, the least TV any method that only puts
  mass on the top-k can reach;
- ``speculative``: the TV of the distribution the speculative strategy draws from at that
  position. Same tokenizer, with tail probes (:func:`~blackbox_proxy.maths.tail.probed_distribution`:
  exact given a probe's draws, averaged over ``PROBE_SAMPLES`` simulated probes of
  ``tail_draws`` draws from the exact tilted p_L, seeded; the Monte Carlo noise only adds to the
  TV), with ``tail_calls_per_token``, the probability that a position asks a probe (one call;
  each walked position yields one token). ``speculative_old``: the candidates-only rule, what
  hosts without ``logit_bias`` get, computed exactly
  (:func:`~blackbox_proxy.maths.rejection.speculative_distribution`: drafts from the full p_L,
  accepted with min(1, w/Z^), Z^ over the top-k plus the draft with the small models' tail
  weight, residual over those). Cross-tokenizer the strategy keeps the candidates-only rule, so
  both columns are that rule there;
- ``alignment``: the byte aligner's P_M(b | s) against the model's own token probability
  for the top candidates whose bytes tokenise back to themselves, at positions whose context is
  the canonical tokenisation of its text (same tokenizer only; elsewhere the two are different
  quantities: the aligner reads the text, the model was fed other ids).

Cross-tokenizer (the hosted model's tokenizer is not the small models'), no exact p~ exists: the
reference is the same pipeline at the largest k asked for (``k_ref``), and every distribution is
taken over those k_ref candidates (the hosted mass outside them is reported), which separates
the cost of the top-k truncation from that of the alignment.

This module runs the pipeline; ``fidelity_report.py`` writes the report. Left out: the maths itself (the distances
are :mod:`blackbox_proxy.maths.metrics`, the exact speculative distribution
:mod:`blackbox_proxy.maths.rejection`) and the resample strategy, which is not measured here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._constants import PROB_FLOOR
from ..maths import combiner
from ..maths.metrics import kl_divergence, mass_outside, total_variation
from ..maths.rejection import speculative_distribution
from ..maths.greedy_tail import suspects, tail_cap
from ..maths.tail import DEFAULT_DRAWS, log_weights, probed_distribution

from .fidelity_report import markdown, plot, write_report  # noqa: E402,F401 - re-exported

KS = (1, 2, 5, 10, 20, "all")
PROBE_SAMPLES = 64  # simulated probes per position and k (the probed TV's Monte Carlo)


@dataclass
class Totals:
    """Per-k sums over positions (averaged in :meth:`summary`)."""

    positions: int = 0
    cut_texts: int = 0
    per_k: dict[str, dict[str, float]] = field(default_factory=dict)
    alignment_errors: list[float] = field(default_factory=list)
    hosted_mass_outside_ref: list[float] = field(default_factory=list)

    def add(self, k: str, **values: float) -> None:
        row = self.per_k.setdefault(k, {})
        for name, value in values.items():
            row[name] = row.get(name, 0.0) + value

    def summary(self) -> dict[str, Any]:
        n = max(1, self.positions)
        per_k = {k: {name: value / n for name, value in row.items()} for k, row in self.per_k.items()}
        for row in per_k.values():
            # below 1e-6 both are float noise and their ratio means nothing
            row["per_step_tv_over_floor"] = row["per_step_tv"] / row["floor_tv"] if row["floor_tv"] > 1e-6 else None
        out: dict[str, Any] = {"positions": self.positions, "cut_texts": self.cut_texts, "per_k": per_k}
        if self.alignment_errors:
            errs = sorted(self.alignment_errors)
            out["alignment"] = {"candidates": len(errs), "mean_abs_prob_error": sum(errs) / len(errs),
                                "p99_abs_prob_error": errs[min(len(errs) - 1, int(0.99 * len(errs)))],
                                "max_abs_prob_error": errs[-1]}
        if self.hosted_mass_outside_ref:
            out["hosted_mass_outside_reference"] = sum(self.hosted_mass_outside_ref) / len(self.hosted_mass_outside_ref)
        return out


def _position(totals: Totals, ks: Sequence[Any], k_all: int, target: torch.Tensor, p_l: torch.Tensor,
              lp_e: torch.Tensor, lp_a: torch.Tensor, order: torch.Tensor, hosted_lp: torch.Tensor,
              delta: torch.Tensor, alpha: float, probes: dict[str, Any] | None = None,
              greedy: dict[str, Any] | None = None) -> None:
    """Metrics of one position. ``order``: universe indices of the API's candidates, best first;
    ``hosted_lp``/``delta``: the pipeline's numbers for them (same order). ``probes``: the tail
    probes' settings (``generator``, ``cap``, ``draws``), or None where the strategy asks none;
    ``greedy``: ``log_w`` ``[V]`` and the ``logit_bias`` ``cap`` of greedy's tail probe, or None
    where greedy chooses among the candidates alone."""
    totals.positions += 1
    best = int(torch.argmax(target))
    for k in ks:
        kk = k_all if k == "all" else min(int(k), k_all)
        cand = order[:kk]
        q = torch.zeros_like(target)
        q[cand] = combiner.tuned_distribution(hosted_lp[:kk] + alpha * delta[:kk], 1.0, 1.0)
        old = speculative_distribution(p_l, lp_e, lp_a, alpha, cand)
        spec, asked = old, 0.0
        if probes is not None:
            spec, asked = probed_distribution(p_l, lp_e, lp_a, alpha, cand, samples=PROBE_SAMPLES, **probes)
        pick, greedy_asked = int(cand[int(torch.argmax(q[cand]))]), 0.0
        if greedy is not None:
            pick, greedy_asked = _greedy_with_tail(cand, hosted_lp[:kk] + alpha * delta[:kk], hosted_lp[:kk], p_l,
                                                   **greedy)
        totals.add(str(k), per_step_tv=total_variation(q, target), per_step_kl=kl_divergence(q, target),
                   top1_agreement=float(int(torch.argmax(q)) == best),
                   floor_tv=mass_outside(target, cand),
                   speculative_tv=total_variation(spec, target), speculative_old_tv=total_variation(old, target),
                   tail_calls_per_token=asked, greedy_top1_agreement=float(pick == best),
                   greedy_tail_calls=greedy_asked)


def _greedy_with_tail(cand: torch.Tensor, scores: torch.Tensor, hosted_lp: torch.Tensor, p_l: torch.Tensor, *,
                      log_w: torch.Tensor, cap: int) -> tuple[int, float]:
    """Greedy's pick with the tail probe (:mod:`blackbox_proxy.maths.greedy_tail`), simulated
    exactly (the host's pick under the probe's biases is the tuned argmax among c* and the
    suspects it asks about), and whether the position asked one."""
    i = int(torch.argmax(scores))
    found = suspects(cand, s_best=float(scores[i]), cap=tail_cap(hosted_lp), log_w=log_w)
    if found.numel() == 0:
        return int(cand[i]), 0.0
    asked = found[: max(0, cap - cand.numel())]
    exact = p_l.double()[asked].log() + log_w.double()[asked]
    j = int(torch.argmax(exact)) if asked.numel() else 0
    return (int(asked[j]) if asked.numel() and float(exact[j]) > float(scores[i]) else int(cand[i])), 1.0


def run_same_tokenizer(white: Any, tuner: Any, prompts: Sequence[Any], *, alpha: float, max_tokens: int,
                       ks: Sequence[Any] = KS, references: Sequence[Sequence[int]] | None = None,
                       alignment_candidates: int = 20, progress: bool | None = None,
                       tail_draws: int = DEFAULT_DRAWS, seed: int = 0) -> dict[str, Any]:
    """Fidelity when the hosted model shares the small models' tokenizer (exact p~ exists).

    ``white``: a :class:`~blackbox_proxy.whitebox.WhiteBoxTuner` over the base and the pair;
    ``tuner``: a :class:`~blackbox_proxy.tuner.ProxyTuner` whose API serves that base and
    allows ``top_k`` = the whole vocabulary. ``prompts``: texts, or chat messages (each model
    renders them with its chat template; the tuner in a chat mode). ``references``: token ids
    per prompt (default: the white-box greedy continuation). The speculative column uses tail
    probes of ``tail_draws`` draws under the host's ``logit_bias`` cap (none when the client
    knows of none), simulated from ``seed``; the greedy column, greedy's tail probe (simulated
    exactly) under the same cap.
    """
    from tqdm.auto import tqdm

    vocab = white.vocab
    k_all = vocab.size
    tuner.client.check()  # detect the dialect: token-id prompts and ids in the answers
    cap = tuner.client.logit_bias_cap
    probes = dict(generator=torch.Generator().manual_seed(seed), cap=cap, draws=tail_draws) if cap else None
    if references is None:
        references = white.generate_ids(prompts, max_tokens=max_tokens, alpha=alpha)
    totals = Totals()
    for prompt, ref in tqdm(list(zip(prompts, references)), desc="prompts", unit="prompt",
                            disable=(not progress) if progress is not None else None):
        chat = None if isinstance(prompt, str) else list(prompt)
        lp_l, lp_e, lp_a = white.teacher_forced(None if chat else prompt, ref, messages=chat)
        decoder = tuner.decoder(None if chat else prompt, messages=chat, max_tokens=len(ref) + 1, alpha=alpha,
                                temperature=0.0, top_p=1.0, seed=0, stop=None, strategy="per-step")
        try:
            for t, token in enumerate(ref):
                [result] = tuner.client.complete(decoder.request())
                cands = [c for c in result.positions[0].candidates if c.token_id is not None and not c.is_end]
                ends = [c for c in result.positions[0].candidates if c.is_end]
                cands = sorted(cands + ends, key=lambda c: -c.logprob)
                [offsets] = decoder.scoring.score([(decoder.prefix, cands)])
                ids = [c.token_id if c.token_id is not None else min(vocab.end_ids) for c in cands]
                order = torch.tensor(ids)
                scores = white.tuned_scores(lp_l[t], lp_e[t], lp_a[t], alpha)
                target = torch.softmax(scores, 0)
                greedy = None
                if cap:
                    log_w = log_weights(lp_e[t], lp_a[t], alpha, math.log(PROB_FLOOR), sorted(vocab.end_ids))
                    log_w[list(vocab.textless_ids)] = -math.inf
                    greedy = dict(log_w=log_w, cap=cap)
                _position(totals, ks, len(cands), target, lp_l[t].double().exp(), lp_e[t], lp_a[t], order,
                          torch.tensor([c.logprob for c in cands], dtype=torch.float64),
                          torch.tensor(offsets.delta, dtype=torch.float64), alpha, probes, greedy)
                if vocab.encode_bytes(decoder.prefix.data) == list(ref[:t]):  # the context is canonical too
                    totals.alignment_errors.extend(
                        _alignment_errors(decoder, cands[:alignment_candidates], lp_e[t], vocab))
                chosen = next((c for c in cands if c.token_id == token), None)
                if chosen is None:  # a token the API does not report (a special token): stop this text
                    totals.cut_texts += 1
                    break
                decoder.append(chosen)
        finally:
            decoder.scoring.close()
    out = totals.summary()
    out.update(k_all=k_all, tail_probes=dict(draws=tail_draws, logit_bias_cap=cap, samples=PROBE_SAMPLES) if cap else None)
    return out


def _alignment_errors(decoder: Any, cands: Sequence[Any], exact_lp: torch.Tensor, vocab: Any) -> list[float]:
    """|aligned P_E(b | s) − P_E(token)| for candidates that tokenise back to themselves (in
    probability: a log difference is meaningless for tokens both give ~0)."""
    aligner = decoder.scoring.aligner
    canonical = [c for c in cands if not c.is_end and vocab.encode_bytes(c.data) == [c.token_id]]
    if not canonical:
        return []
    plan = aligner.plan(decoder.prefix.data, canonical)
    [dist] = decoder.scoring.expert.distributions_groups([(plan.kept_ids, plan.paths)])
    aligned = aligner.evaluate(plan, dist)
    return [abs(math.exp(float(x)) - math.exp(float(exact_lp[c.token_id]))) for x, c in zip(aligned, canonical)]


def run_cross_tokenizer(tuner: Any, prompts: Sequence[str], *, alpha: float, max_tokens: int,
                        ks: Sequence[Any] = (1, 2, 5, 10, 20), k_ref: int = 100,
                        progress: bool | None = None) -> dict[str, Any]:
    """Fidelity when the tokenizers differ: everything against the pipeline at k = ``k_ref``,
    over those k_ref candidates, on the reference text the pipeline itself writes greedily at
    k_ref (``tuner.top_k`` must be >= k_ref)."""
    from tqdm.auto import tqdm

    totals = Totals()
    tuner.client.check()
    for prompt in tqdm(list(prompts), desc="prompts", unit="prompt",
                       disable=(not progress) if progress is not None else None):
        decoder = tuner.decoder(prompt, max_tokens=max_tokens, alpha=alpha, temperature=0.0,
                                 top_p=1.0, seed=0, stop=None, strategy="per-step")
        try:
            while not decoder.done:
                [result] = tuner.client.complete(decoder.request())
                position = result.positions[0]
                cands = sorted(position.candidates, key=lambda c: -c.logprob)[:k_ref]
                cands, _ = decoder.prompt.consistent(decoder.prefix, cands)
                if not cands:
                    break
                [offsets] = decoder.scoring.score([(decoder.prefix, cands)])
                hosted = torch.tensor([c.logprob for c in cands], dtype=torch.float64)
                lp_e = torch.tensor(offsets.expert, dtype=torch.float64)
                lp_a = torch.tensor(offsets.anti_expert, dtype=torch.float64)
                covered = float(hosted.exp().sum())
                totals.hosted_mass_outside_ref.append(max(0.0, 1.0 - covered))
                p_l = hosted.exp() / covered
                target = combiner.tuned_distribution(hosted + alpha * (lp_e - lp_a), 1.0, 1.0)
                order = torch.arange(len(cands))
                _position(totals, list(ks) + ["all"], len(cands), target, p_l, lp_e, lp_a, order, hosted,
                          lp_e - lp_a, alpha)
                decoder.append(cands[int(torch.argmax(target))])
        finally:
            decoder.scoring.close()
    out = totals.summary()
    out["per_k"][f"{k_ref} (reference)"] = out["per_k"].pop("all")
    out["k_ref"] = k_ref
    return out


# ----- presets on the embedded models ---------------------------------------------------------

PRESETS = ("same-tokenizer", "same-tokenizer-chat", "cross-tokenizer")


def run_preset(preset: str, *, prompts: int = 8, max_tokens: int = 24, alpha: float = 1.0, k_ref: int = 100,
               progress: bool | None = None) -> dict[str, Any]:
    """Run a preset on the embedded models (installed by the demo's extras) and return the report.

    ``same-tokenizer``: SmolLM2-135M-Instruct (adapter off) is the hosted model, behind this
    project's server allowing k = its whole vocabulary; the expert is it with the arithmetic LoRA.
    ``same-tokenizer-chat``: the same, the questions sent as chat messages in ``chat-prefix`` mode
    (all three models render them with their chat template): the hosted model is then the
    anti-expert exactly, and exact proxy tuning the expert itself.
    ``cross-tokenizer``: Gemma-3-270M (base) hosted, the same SmolLM2 pair; reference k = ``k_ref``.
    Prompts: the first ``prompts`` held-out problems of :mod:`blackbox_proxy.evaluation.arithmetic`.
    """
    from .demo import HOSTED_NAME, check_installed, load_pair
    from .embedded import prepare
    from ..errors import ConfigurationError
    from ..local.scorer import Scorer
    from ..apps.model_server import create_app
    from ..apps.openai_http import ServerThread
    from ..local.runner import ModelRunner
    from ..evaluation.arithmetic import problems
    from ..tuner import ProxyTuner
    from ..whitebox import WhiteBoxTuner

    if preset not in PRESETS:
        raise ConfigurationError(f"preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    check_installed()
    chat = preset == "same-tokenizer-chat"
    items = problems("test", prompts)
    texts = [p.messages() for p in items] if chat else [p.hosted_prompt() for p in items]
    expert, anti = load_pair()
    if preset.startswith("same-tokenizer"):
        path = prepare("smollm2")
        base = Scorer(anti.model, anti.tokenizer, render="chat" if chat else "raw", adapter=False,
                      name="SmolLM2-135M-Instruct (base)", vocabulary=anti.vocab)
        runner = ModelRunner.from_pretrained(str(path), name="smollm2")
        size = anti.vocab.size
        with ServerThread(create_app(runner, max_top_logprobs=size)) as server:
            tuner = ProxyTuner(base_url=server.base_url, model="smollm2", expert=expert, anti_expert=anti, top_k=size,
                               hosted_tokenizer=str(path), mode="chat-prefix" if chat else "completions")
            white = WhiteBoxTuner(base=base, expert=expert, anti_expert=anti)
            report = run_same_tokenizer(white, tuner, texts, alpha=alpha, max_tokens=max_tokens, progress=progress)
        description = ("Hosted SmolLM2-135M-Instruct (adapter off) on this project's server, k up to its whole "
                       f"vocabulary ({size}); expert SmolLM2 + arithmetic LoRA, anti-expert SmolLM2; exact p~ from "
                       "white-box; teacher-forced on the white-box greedy continuation"
                       + ("; questions sent as chat messages (chat-prefix mode)." if chat else "; raw prompts."))
    else:
        gemma = prepare("gemma3")
        runner = ModelRunner.from_pretrained(str(gemma), name=HOSTED_NAME)
        with ServerThread(create_app(runner, max_top_logprobs=k_ref)) as server:
            tuner = ProxyTuner(base_url=server.base_url, model=HOSTED_NAME, expert=expert, anti_expert=anti,
                               top_k=k_ref, hosted_tokenizer=str(gemma))
            report = run_cross_tokenizer(tuner, texts, alpha=alpha, max_tokens=max_tokens, k_ref=k_ref,
                                         progress=progress)
        description = (f"Hosted Gemma-3-270M (base) on this project's server; SmolLM2 pair aligned through bytes; "
                       f"reference = the same pipeline at k = {k_ref}, over those candidates, on its own greedy text.")
    report.update(preset=preset, prompts=prompts, max_tokens=max_tokens, alpha=alpha, description=description)
    return report
