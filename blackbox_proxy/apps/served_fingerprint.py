"""``system_fingerprint`` of ``blackbox-proxy serve``: what decides an answer besides the request.

OpenAI's ``system_fingerprint`` names the backend configuration a model runs with, to be read
with ``seed``: two answers to one seeded request may differ only where their fingerprints do.
Here it is a digest (``fp_`` + 12 hex digits) of everything a tuned answer depends on that the
request does not say: the hosted model, its URL, mode and dialect, the hosted tokenizer (its
tokens), the candidates asked per position, token-id prompts, streamed chunks, the small models
(name, rendering, tokens), batch scoring, the server's defaults and limits, and the versions of
this package, torch and transformers. Every response carries it, and ``GET /health`` shows it:
replicas behind a load balancer that show the same one are configured alike, and one that shows
another was started with other flags or found another dialect or tokenizer at start-up (pin
them with ``--dialect`` and ``--hosted-tokenizer``).

Left out of the digest: the weights' bytes (the small models count by name, rendering and
vocabulary; hashing gigabytes at every start is not worth it) and the hardware. The same image
on the same kind of machine is the deployment's part (``docs/deploy.md``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from importlib import metadata
from typing import Any


def vocabulary_digest(vocab: Any) -> str | None:
    """A digest of a vocabulary's tokens and end ids (None for none): two tokenizers that split
    text alike have the same one, whatever their names or paths."""
    if vocab is None:
        return None
    digest = hashlib.sha256()
    for data in vocab.token_bytes:
        digest.update(b"\xff" if data is None else len(data).to_bytes(4, "big") + data)
    digest.update(json.dumps(sorted(vocab.end_ids)).encode())
    return digest.hexdigest()[:16]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def fingerprinter(tuner: Any, **defaults: Any) -> Callable[[], str]:
    """A function returning the server's fingerprint now (see the module docstring). ``defaults``:
    the server's own settings (name, alpha, strategy, limits). The parts that cannot change are
    read once; the host's dialect and streaming are read at every call, since a client learns
    them as it goes (``hosts/client.py``).

    Example::

        fingerprint = fingerprinter(tuner, name="tuned", alpha=1.0)
        fingerprint()   # 'fp_3f2a9c0d1b7e'
    """
    from .. import __version__

    def model(scorer: Any) -> list[Any]:
        return [getattr(scorer, "name", None), getattr(scorer, "render", None),
                vocabulary_digest(getattr(scorer, "vocab", None))]

    fixed = {"server": defaults, "expert": model(tuner.expert), "anti_expert": model(tuner.anti_expert),
             "hosted_tokenizer": vocabulary_digest(tuner.hosted_vocab), "same_vocab": bool(tuner.same_vocab),
             "batch_scoring": bool(getattr(tuner, "batch_scoring", False)),
             "versions": [__version__, _version("torch"), _version("transformers")]}

    def fingerprint() -> str:
        client = tuner.client
        now = dict(fixed, model=client.model, base_url=client.base_url, mode=tuner.mode, dialect=client.dialect,
                   top_k=tuner.top_k_for_mode(), token_prompts=bool(client.token_prompts),
                   stream_chunks=bool(client.streams_logprobs))
        text = json.dumps(now, sort_keys=True, default=str)
        return "fp_" + hashlib.sha256(text.encode()).hexdigest()[:12]

    return fingerprint
