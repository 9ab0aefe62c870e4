"""Find the hosted model's tokenizer, so exact token-id continuation is the default.

Without the hosted tokenizer the client sends text prompts that the server re-tokenises at every
step: the hosted model then sees the canonical tokenisation of the generated text instead of the
tokens it generated, and the proxy-tuned distribution is no longer the one the maths describes.
With it, prompts go as token ids, candidates carry ids, and when the small models share the
tokenizer the offsets are exact (the same-tokenizer path).

How a tokenizer is found (the first that holds wins):

1. **A tokenize route answers**, and a locally available tokenizer reproduces the server's ids on
   a probe text (mixed scripts, digits, whitespace runs, code, emoji). Routes tried: vLLM's and
   this project's ``POST /tokenize`` (``{"prompt", "add_special_tokens"}``, also under ``/v1``),
   llama.cpp's ``POST /tokenize`` (``{"content", "add_special"}``) and llama-cpp-python's
   ``POST /extras/tokenize`` (``{"input"}``). Candidates, in order: the small models' own
   tokenizer (the same-tokenizer case), tiktoken's encoding for the model name, and a Hugging
   Face tokenizer cached on this machine under the served model's name or the ``root`` that
   ``/v1/models`` reports (vLLM and this project's server report where the weights came from).
   A name alone is never trusted when a route can check it.
2. **No route answers** (OpenAI, most paid APIs) and the model name is in tiktoken's model table
   (``gpt-4o`` → ``o200k_base``): that encoding, as OpenAI documents it.
3. Otherwise none: text prompts, with one warning that says what is lost and names
   ``--hosted-tokenizer``.

The probe costs one or a few short unbilled requests at start-up, each with a short timeout; a
host that refuses them (401, 404, 405, a connection error) simply has no route. Left out: chat
templates (``/tokenize`` with messages), and building a vocabulary from ``/detokenize`` alone
(one request per id, 262k for Gemma).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from ..tokens.vocab import Vocabulary

logger = logging.getLogger("blackbox_proxy")

# What the server's ids are checked on: scripts, digits, whitespace runs, code, an emoji.
PROBE = ("Hello, world! The year 2024 had 366 days; naïve café, Ærøskøbing, Привет, 東京タワー 🙂.\n"
         "\tdef f(x):\n        return x ** 2  # two  spaces\n\n  ...?!")
PROBE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Discovery:
    """What was found: ``vocab`` (None when nothing was) and ``source``, said in words;
    ``context``: the hosted model's context length when the tokenize route reports it (vLLM's and
    this project's ``max_model_len``)."""

    vocab: Vocabulary | None
    source: str
    context: int | None = None


def _root(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def _routes(base_url: str, model: str) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(url, body, adds special tokens) for each known tokenize route shape."""
    root, base = _root(base_url), base_url.rstrip("/")
    yield f"{root}/tokenize", {"model": model, "prompt": PROBE, "add_special_tokens": True}, True
    if base != root:
        yield f"{base}/tokenize", {"model": model, "prompt": PROBE, "add_special_tokens": True}, True
    yield f"{root}/extras/tokenize", {"model": model, "input": PROBE}, True


def server_ids(http: httpx.Client, base_url: str, model: str) -> tuple[list[int], str, int | None] | None:
    """The ids the host gives the probe text, the route that answered and the context length it
    reports (None: no route)."""
    for url, body, _ in _routes(base_url, model):
        try:
            response = http.post(url, json=body)
        except httpx.HTTPError:
            return None  # the host is not reachable this way at all; the real calls will say why
        if response.status_code == 400 and "prompt" in body:
            # llama.cpp's own server names its field "content"
            try:
                response = http.post(url, json={"content": PROBE, "add_special": True})
            except httpx.HTTPError:
                continue
        if response.status_code != 200:
            continue
        try:
            answer = response.json()
            tokens, context = answer.get("tokens"), answer.get("max_model_len")
        except (ValueError, AttributeError):
            continue
        if isinstance(tokens, list) and tokens and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            good = isinstance(context, int) and not isinstance(context, bool) and context > 0
            return tokens, httpx.URL(url).path, context if good else None
    return None


def served_root(http: httpx.Client, base_url: str, model: str) -> str | None:
    """The ``root`` that ``/v1/models`` reports for ``model`` (vLLM, this project), if any."""
    try:
        response = http.get(f"{base_url.rstrip('/')}/models")
        entries = response.json().get("data") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("id") == model and isinstance(entry.get("root"), str):
            return entry["root"] or None
    return None


def _tiktoken_for(model: str) -> Vocabulary | None:
    """tiktoken's encoding for an OpenAI model name (offline), or None for any other name."""
    from ..tokens.loaders import vocabulary_from_tiktoken

    try:
        return vocabulary_from_tiktoken(model)
    except Exception:  # noqa: BLE001 - not an OpenAI model name, or its encoding is not on this machine
        return None


def _hf_cached(name: str) -> Vocabulary | None:
    """A Hugging Face tokenizer available without the network (a local folder or the HF cache)."""
    from ..tokens.loaders import vocabulary_from_hf

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not on this machine, or not a tokenizer at all
        return None
    try:
        return vocabulary_from_hf(tokenizer, name=name)
    except Exception:  # noqa: BLE001 - a tokenizer without a byte view (refused by the loader)
        return None


def _matches(vocab: Vocabulary, ids: list[int]) -> bool:
    try:
        return vocab.encode_prompt(PROBE) == ids
    except Exception:  # noqa: BLE001 - a candidate that cannot encode the probe is not the one
        return False


def discover(*, base_url: str, api_key: str, model: str, small_vocab: Vocabulary | None,
             timeout: float = PROBE_TIMEOUT) -> Discovery:
    """Find the hosted tokenizer (see the module docstring); never raises for a host's answers."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key and api_key != "no-key" else {}
    with httpx.Client(timeout=timeout, headers=headers, follow_redirects=False) as http:
        answered = server_ids(http, base_url, model)
        root = served_root(http, base_url, model) if answered else None
    candidates: list[tuple[str, Callable[[], Vocabulary | None]]] = []
    if small_vocab is not None:
        candidates.append((f"the small models' tokenizer ({small_vocab.name})", lambda: small_vocab))
    candidates.append((f"tiktoken's encoding for {model!r}", lambda: _tiktoken_for(model)))
    for name in dict.fromkeys(n for n in (root, model) if n):
        candidates.append((f"the Hugging Face tokenizer {name!r} found locally", lambda name=name: _hf_cached(name)))
    if answered is None:
        vocab = _tiktoken_for(model)
        if vocab is not None:
            return Discovery(vocab, f"tiktoken's model table ({vocab.name} for {model!r}; the host has no tokenize route)")
        return Discovery(None, "none (no tokenize route, and the model name is not in tiktoken's table)")
    ids, route, context = answered
    tried = []
    for label, load in candidates:
        vocab = load()
        if vocab is None:
            continue
        tried.append(label)
        if _matches(vocab, ids):
            return Discovery(vocab, f"{label}, checked against the host's {route}", context)
    return Discovery(None, f"none: the host's {route} answered, but no local tokenizer reproduces its ids "
                           f"(tried {', '.join(tried) or 'nothing loadable'})", context)


def text_prompt_warning(source: str) -> str:
    return ("hosted tokenizer not found (" + source + "): prompts go as text that the server re-tokenises at "
            "every step, so the hosted model may see a different tokenisation of the generated text than it "
            "produced and proxy tuning is not exact; pass --hosted-tokenizer (a local tokenizer folder, a "
            "Hugging Face name, or tiktoken:NAME) to fix it, or --hosted-tokenizer none to silence this")
