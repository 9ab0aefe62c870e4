"""Shared fixtures: tiny real tokenizers and models built in-test, and real loopback servers.

Nothing is downloaded: tokenizers are trained on a small in-test corpus, models are random
tiny Llamas with fixed seeds, and servers are this project's own model server on 127.0.0.1
(started in a thread, stopped at the end of the session).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

from tiny import save, tiny_llama, train_bpe  # noqa: E402

from blackbox_proxy import Scorer  # noqa: E402
from blackbox_proxy.apps.model_server import create_app  # noqa: E402
from blackbox_proxy.apps.openai_http import ServerThread  # noqa: E402
from blackbox_proxy.local.runner import ModelRunner  # noqa: E402


@pytest.fixture(scope="session")
def tok_a():
    """Byte-level BPE, 400 ids: the hosted tokenizer (and the small one in same-vocab tests)."""
    return train_bpe(400)


@pytest.fixture(scope="session")
def tok_b():
    """A different byte-level BPE (more merges, digits split): the small models' tokenizer in
    cross-tokenizer tests."""
    return train_bpe(520, digits=True)


@pytest.fixture(scope="session")
def models_a(tok_a):
    """(L, E, A) on tok_a: a peaky 'large' model and a flatter expert/anti-expert pair."""
    return tiny_llama(tok_a, 0, sharpness=20.0), tiny_llama(tok_a, 1), tiny_llama(tok_a, 2)


@pytest.fixture(scope="session")
def models_b(tok_b):
    """(E, A) on tok_b."""
    return tiny_llama(tok_b, 3), tiny_llama(tok_b, 4)


@pytest.fixture(scope="session")
def server_a(tok_a, models_a):
    """The project's server with L behind it, allowing k = the whole vocabulary."""
    runner = ModelRunner(models_a[0], tok_a, name="tiny")
    with ServerThread(create_app(runner, max_top_logprobs=len(tok_a))) as server:
        yield server


@pytest.fixture(scope="session")
def server_capped(tok_a, models_a):
    """The same model behind a server that allows at most 5 top logprobs."""
    runner = ModelRunner(models_a[0], tok_a, name="tiny")
    with ServerThread(create_app(runner, max_top_logprobs=5)) as server:
        yield server


@pytest.fixture(scope="session")
def scorers_a(tok_a, models_a):
    """Raw-rendering scorers for E and A on tok_a."""
    return Scorer(models_a[1], tok_a, render="raw", name="E"), Scorer(models_a[2], tok_a, render="raw", name="A")


@pytest.fixture(scope="session")
def scorers_b(tok_b, models_b):
    return Scorer(models_b[0], tok_b, render="raw", name="Eb"), Scorer(models_b[1], tok_b, render="raw", name="Ab")


@pytest.fixture(scope="session")
def saved_a(tmp_path_factory, tok_a, models_a):
    """The three tok_a models saved as HF folders (for the CLI and from_pretrained)."""
    root = tmp_path_factory.mktemp("models_a")
    return {name: save(m, tok_a, root / name) for name, m in zip(("L", "E", "A"), models_a)}
