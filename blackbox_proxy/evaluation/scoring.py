"""Distributions an evaluation reads: answer letters at the first position, and teacher forcing.

- Letters: a token *reads as* a letter when its text, stripped of whitespace, is the letter
  (``"B"``, ``" B"``, ``"\\nB"``). A letter's probability is the summed probability of the tokens
  that read as it: over the whole vocabulary for local models, over the API's candidates for
  the hosted and proxy-tuned systems (whose distribution lives on those candidates only).
- Teacher forcing, per step: :mod:`blackbox_proxy.decoding.forcing` (shared with ``serve``'s ``echo``;
  :func:`forced_step` is re-exported here): the per-step strategy's tuned distribution at a
  position, softmax over the candidates C of logprob_L + alpha·(log P_E − log P_A) (temperature
  1), read at the reference token. A reference token outside C is a *miss*: it has no tuned
  probability, the text goes on with it appended, and the miss is counted (coverage), never
  given a made-up probability.
- Teacher forcing, local (:func:`forward_logprobs`): one forward of a local model over the
  prompt and the reference ids (full vocabulary, so nothing is missed).

Left out: running systems (``systems.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..decoding.forcing import ForcedStep, forced_step  # noqa: F401 - re-exported (evaluation's teacher forcing)


def reads_as(text: str, letter: str) -> bool:
    """Whether a token's text reads as the answer ``letter`` (see the module docstring).

    >>> [reads_as(t, "B") for t in ("B", " B", "\\nB", "B.", "b", " Be")]
    [True, True, True, False, False, False]
    """
    return text.strip() == letter


def letters_from_candidates(texts: Sequence[str], logprobs: Sequence[float], letters: Sequence[str]) -> dict[str, float]:
    """Each letter's probability: the summed exp(logprob) of the candidates that read as it.

    >>> letters_from_candidates([" A", "A", " B", " the"], [math.log(.3), math.log(.1), math.log(.2), math.log(.4)], "AB")
    {'A': 0.4, 'B': 0.2}
    """
    out = {letter: 0.0 for letter in letters}
    for text, lp in zip(texts, logprobs):
        for letter in letters:
            if reads_as(text, letter):
                out[letter] += math.exp(lp)
    return {k: round(v, 12) for k, v in out.items()}


def letter_ids(vocab: Any, letters: Sequence[str]) -> dict[str, list[int]]:
    """The ids of ``vocab`` that read as each letter."""
    out: dict[str, list[int]] = {letter: [] for letter in letters}
    for i, data in enumerate(vocab.token_bytes):
        if data and len(data) <= 8:
            text = data.decode("utf-8", errors="ignore")
            for letter in letters:
                if reads_as(text, letter):
                    out[letter].append(i)
    return out


def letters_from_vocab(logprobs: torch.Tensor, vocab: Any, letters: Sequence[str]) -> dict[str, float]:
    """Each letter's probability under a full-vocabulary distribution ``logprobs`` ``[V]``."""
    probs = logprobs.double().exp()
    return {letter: float(probs[ids].sum()) if ids else 0.0 for letter, ids in letter_ids(vocab, letters).items()}


def choice_record(probs: dict[str, float], answer: str) -> dict[str, Any]:
    """The result of a choice item: the most probable letter (None when no letter has any
    probability), whether it is the answer, and the mass the letters hold together.

    >>> choice_record({"A": 0.1, "B": 0.6}, "B")["choice"]
    'B'
    """
    mass = sum(probs.values())
    choice = max(probs, key=lambda k: probs[k]) if mass > 0 else None
    return {"choice": choice, "answer": answer, "correct": choice == answer, "letter_mass": round(mass, 6),
            "letter_probs": probs}


def forward_logprobs(scorer: Any, prompt_ids: Sequence[int], ids: Sequence[int]) -> torch.Tensor:
    """log P(next token) of a local model after the prompt and after each of ``ids``:
    ``[len(ids) + 1, V]`` from one forward (row t predicts ``ids[t]``)."""
    tokens = torch.tensor([list(prompt_ids) + list(ids)], device=scorer.device)
    with scorer.lock, torch.inference_mode(), scorer.forward_context():
        logits = scorer.model(input_ids=tokens).logits[0, len(prompt_ids) - 1:, : scorer.vocab.size].float()
    return torch.log_softmax(logits, dim=-1)


def sequence_loglik(logprobs: torch.Tensor, ids: Sequence[int]) -> list[float]:
    """log P of each of ``ids`` from :func:`forward_logprobs`-shaped rows."""
    if not ids:
        return []
    return logprobs[torch.arange(len(ids)), torch.tensor(list(ids))].double().tolist()
