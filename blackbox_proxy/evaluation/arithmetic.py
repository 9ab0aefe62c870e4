"""The demo's task: GSM-style arithmetic word problems with a checkable ``#### N`` answer.

Problems are generated from templates with a seeded ``random.Random``, so the training split
(for the expert's LoRA adapter) and the held-out split (for evaluation) are reproducible and
disjoint. An answer is correct when its ``#### N`` line holds the right number (strict), and a
lenient score also accepts the last number written, for a model that never learned the format.

Why this task: it has a checker, the expert learns the worked format and much of the arithmetic
from a few hundred LoRA steps on CPU, while the hosted base model (Gemma-3-270M, one-shot
prompt) copies the format but gets the sums wrong. Every digit is a single token in both
tokenizers, so the expert's arithmetic can reach the hosted model through its top-k
candidates. Left out: harder problems (models this small rarely solve them).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = [("Tom", "he"), ("Anna", "she"), ("Ravi", "he"), ("Mia", "she"), ("Lucas", "he"), ("Sara", "she"),
         ("Omar", "he"), ("Lena", "she"), ("Ben", "he"), ("Yuki", "she")]
ITEMS = ["apples", "books", "stickers", "marbles", "coins", "pencils", "cookies", "cards", "shells", "stamps"]
# The hosted base model's one-shot example: it shows the format, not the arithmetic.
SHOT_QUESTION = "Ben has 25 marbles. He buys 17 more. How many marbles does he have now?"
SHOT = f"Question: {SHOT_QUESTION}\nAnswer:\n25 + 17 = 42\n#### 42\n\n"
_ANSWER = re.compile(r"####\s*(-?\d+)")
_NUMBER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    solution: str  # worked answer in the expert's format, ending with "#### N"

    def hosted_prompt(self) -> str:
        """Raw-text prompt for a base model behind a completions API: one worked example
        (so the base model knows where the answer goes), then the question."""
        return f"{SHOT}Question: {self.question}\nAnswer:\n"

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]


def make_problem(rng: random.Random) -> Problem:
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    kind = rng.choice(["add", "sub", "mul", "two"])
    if kind == "add":
        a, b = rng.randint(2, 89), rng.randint(2, 89)
        c = a + b
        q = f"{name} has {a} {item}. {pronoun.capitalize()} buys {b} more. How many {item} does {pronoun} have now?"
        work = f"{a} + {b} = {c}"
    elif kind == "sub":
        a = rng.randint(20, 99)
        b = rng.randint(2, a - 1)
        c = a - b
        q = f"{name} has {a} {item}. {pronoun.capitalize()} gives {b} of them to a friend. How many {item} are left?"
        work = f"{a} - {b} = {c}"
    elif kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        c = a * b
        q = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} does {pronoun} buy?"
        work = f"{a} * {b} = {c}"
    else:
        a, b = rng.randint(10, 60), rng.randint(2, 30)
        s = a + b
        d = rng.randint(2, s - 1)
        c = s - d
        q = (f"{name} has {a} {item} and buys {b} more. Then {pronoun} gives away {d}. "
             f"How many {item} does {pronoun} have?")
        work = f"{a} + {b} = {s}\n{s} - {d} = {c}"
    return Problem(q, c, f"{work}\n#### {c}")


def problems(split: str, n: int) -> list[Problem]:
    """``n`` problems of ``split`` ('train' or 'test'); test questions never appear in train."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if split == "train":
        rng = random.Random(20240101)
        return [make_problem(rng) for _ in range(n)]
    train = {p.question for p in problems("train", 4000)} | {SHOT_QUESTION}
    rng = random.Random(777)
    out: list[Problem] = []
    while len(out) < n:
        p = make_problem(rng)
        if p.question not in train:
            out.append(p)
    return out


def extract_answer(text: str) -> int | None:
    """The number on the ``#### N`` line, or None."""
    match = _ANSWER.search(text)
    return int(match.group(1)) if match else None


def last_number(text: str) -> int | None:
    numbers = _NUMBER.findall(text)
    return int(numbers[-1]) if numbers else None


def score(text: str, problem: Problem) -> dict[str, bool]:
    """strict: ``#### N`` with the right N; lenient: the last number is right; formatted: has ``####``."""
    return {
        "strict": extract_answer(text) == problem.answer,
        "lenient": last_number(text) == problem.answer,
        "formatted": extract_answer(text) is not None,
    }


STOP = ["\nQuestion:", "\n\n"]
