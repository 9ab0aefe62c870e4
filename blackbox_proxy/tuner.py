"""Public entry points: :class:`ProxyTuner` (sync) and :class:`AsyncProxyTuner` (async).

Both share :class:`_TunerBase`, which holds every piece of non-I/O logic: argument validation,
loading the small models, the hosted vocabulary, the aligner, and building one
:class:`~blackbox_proxy.decoding.base.PerStepDecoder` per generation. The two subclasses only differ
in how they wait for the hosted API (and, for async, run local scoring in a worker thread so
the event loop stays free).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from . import _constants as C
from .tokens.aligner import Aligner
from .maths.combiner import validate_alpha, validate_temperature, validate_top_p
from .decoding import DecodeParams, DecoderBase, PerStepDecoder, ResampleDecoder, SpeculativeDecoder
from .errors import ConfigurationError, ModeNotSupportedError, TokenizerMismatchError
from .hosts.client import AsyncHostedClient, HostedClient
from .local.scorer import Scorer
from .local.sessions import open_sessions
from .types import MODES, GenerationResult, StreamEvent
from .tokens.vocab import Vocabulary, load_hosted_vocabulary

STRATEGIES = ("per-step", "speculative", "resample")
DEFAULT_SAMPLES = 16


def _load_scorer(spec: Any, *, device: str | None, render: str, role: str) -> Scorer:
    if isinstance(spec, Scorer):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ConfigurationError(f"{role} must be a model name/path or a Scorer, got {spec!r}")
    return Scorer.from_pretrained(spec, device=device, render=render, name=spec)


def load_small_models(*, expert: Any, anti_expert: Any, expert_adapter: str | None, device: str | None,
                      expert_render: str, anti_expert_render: str) -> tuple[Scorer, Scorer]:
    """(expert, anti-expert) scorers: two models, or one base with a LoRA adapter on and off."""
    if expert_adapter is not None:
        if expert is not None:
            raise ConfigurationError("pass either an expert model or an expert adapter (over the anti-expert), not both")
        if not isinstance(anti_expert, str):
            raise ConfigurationError("with an expert adapter, anti_expert must be the base model's name or path")
        return Scorer.pair_from_adapter(anti_expert, expert_adapter, device=device, render=anti_expert_render)
    if expert is None:
        raise ConfigurationError("no expert: pass an expert model (--expert) or a LoRA adapter (--expert-adapter)")
    e = _load_scorer(expert, device=device, render=expert_render, role="expert")
    a = _load_scorer(anti_expert, device=device, render=anti_expert_render, role="anti_expert")
    if not e.vocab.same_as(a.vocab):
        raise TokenizerMismatchError(
            f"expert {e.name!r} and anti-expert {a.name!r} have different tokenizers "
            f"({e.vocab.size} vs {a.vocab.size} ids); use the same small model before and after tuning"
        )
    return e, a


def _messages(prompt: str | None, messages: Sequence[dict[str, str]] | None) -> tuple[tuple[str, str], ...]:
    if messages is not None:
        out = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ConfigurationError("each message must be a dict with 'role' and 'content'")
            out.append((str(m["role"]), str(m["content"])))
        return tuple(out)
    return (("user", prompt or ""),)


class _TunerBase:
    """Configuration and non-I/O logic shared by :class:`ProxyTuner` and :class:`AsyncProxyTuner`.

    Args:
        model: the hosted model's name.
        expert, anti_expert: local models (name/path or :class:`Scorer`) sharing one tokenizer.
        expert_adapter: a LoRA adapter folder; the expert is then ``anti_expert`` with the adapter
            on, sharing one model in memory with the anti-expert (adapter off).
        base_url, api_key: the OpenAI-compatible endpoint; default ``OPENAI_BASE_URL`` /
            ``OPENAI_API_KEY``. The key never appears in logs, traces or errors.
        mode: ``completions`` | ``chat-prefix`` | ``chat`` (see :mod:`blackbox_proxy.hosts.client`).
        hosted_tokenizer: the hosted model's tokenizer if known (``tiktoken:o200k_base``, an
            OpenAI model name, an HF tokenizer path, or a :class:`Vocabulary`). Enables exact
            token-id prompts, the extension correction, and the same-tokenizer fast path.
        top_k: candidates per position asked of the API; by default 20, or 5 on OpenAI's
            legacy completions endpoint (its cap).
        dialect: ``openai`` | ``vllm`` | ``llama.cpp`` | ``deepseek`` | ``mistral`` (detected when left
            out; see ``hosts.dialects``).
        expert_render, anti_expert_render: ``auto`` | ``chat`` | ``raw`` prompt rendering.
        backoff: tokens dropped to reach a stable tokenisation boundary (aligner).
        timeout, max_retries: per-request timeout (s) and retries after the first attempt.
        cache: a SQLite file (or :class:`~blackbox_proxy.hosts.cache.ResponseCache`) so identical
            hosted requests are answered without paying again.
        batch_scoring: share the small models' forwards among concurrent generations
            (:mod:`blackbox_proxy.local.batching`); on by default in the async tuner.
    """

    _client_class: type = HostedClient
    batch_scoring = False  # share forwards with concurrent generations (async tuner)

    def __init__(
        self,
        *,
        model: str,
        anti_expert: Any,
        expert: Any = None,
        expert_adapter: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        mode: str = "completions",
        hosted_tokenizer: Any = None,
        top_k: int | None = None,
        dialect: str | None = None,
        device: str | None = None,
        expert_render: str = "auto",
        anti_expert_render: str = "auto",
        backoff: int = 1,
        timeout: float = C.DEFAULT_TIMEOUT,
        max_retries: int = C.MAX_RETRIES,
        token_prompts: bool | None = None,
        check_hosted: bool = False,
        cache: Any = None,
        batch_scoring: bool | None = None,
    ) -> None:
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise ConfigurationError(f"top_k must be an integer >= 1, got {top_k!r}")
        if backoff < 0:
            raise ConfigurationError(f"backoff must be >= 0, got {backoff}")
        self.mode = mode
        self.top_k = top_k
        if batch_scoring is not None:
            self.batch_scoring = bool(batch_scoring)
        self.hosted_vocab: Vocabulary | None = (
            load_hosted_vocabulary(hosted_tokenizer) if hosted_tokenizer is not None else None
        )
        self.client = self._client_class(
            model=model,
            base_url=base_url,
            api_key=api_key,
            mode=mode,
            dialect=dialect,
            hosted_vocab=self.hosted_vocab,
            timeout=timeout,
            max_retries=max_retries,
            token_prompts=token_prompts,
            cache=cache,
        )
        if check_hosted:
            self._check_hosted()
        self.expert, self.anti_expert = load_small_models(
            expert=expert, anti_expert=anti_expert, expert_adapter=expert_adapter, device=device,
            expert_render=expert_render, anti_expert_render=anti_expert_render,
        )
        self.same_vocab = bool(self.hosted_vocab is not None and self.hosted_vocab.same_as(self.expert.vocab))
        self.aligner = Aligner(self.expert.vocab, self.hosted_vocab, backoff=backoff)

    def _check_hosted(self) -> None:
        """Reach the hosted API before loading models (sync tuner only)."""

    def top_k_for_mode(self) -> int:
        """The k asked of the API: ``top_k`` if given, else the default for this host."""
        if self.top_k is not None:
            return self.top_k
        return self.client.default_top_k

    def check_request(
        self,
        *,
        prompt: str | None,
        messages: Sequence[dict[str, str]] | None = None,
        max_tokens: int = 64,
        alpha: float = 1.0,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        strategy: str = "per-step",
        chunk: int | None = None,
        samples: int | None = None,
    ) -> DecodeParams:
        """Validate one generation's arguments without calling the API; the error says what to fix.

        Checks every rule :meth:`generate` applies: alpha finite, temperature >= 0, top_p in
        (0, 1], max_tokens >= 1, k within the mode's range, a non-empty prompt that fits each small
        model's context, a known strategy and what it supports in this mode.
        """
        if strategy not in STRATEGIES:
            raise ConfigurationError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
        alpha = validate_alpha(alpha)
        temperature = validate_temperature(temperature)
        top_p = validate_top_p(top_p)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ConfigurationError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ConfigurationError(f"seed must be an integer, got {seed!r}")
        if prompt is None and messages is None:
            raise ConfigurationError("pass a prompt (text) or messages")
        if prompt is not None and messages is not None:
            raise ConfigurationError("pass either a prompt or messages, not both")
        if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
            raise ConfigurationError("the prompt is empty; pass some text")
        if messages is not None:
            _messages(None, messages)
            if not any(str(m.get("content", "")).strip() for m in messages):
                raise ConfigurationError("the messages are empty; pass some text")
        if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, (list, tuple)) and all(isinstance(x, str) and x for x in stop)
        ):
            raise ConfigurationError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise ConfigurationError(f"chunk must be an integer >= 1 (or left out for adaptive), got {chunk!r}")
        if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 1):
            raise ConfigurationError(f"samples must be an integer >= 1, got {samples!r}")
        if samples is not None and strategy != "resample":
            raise ConfigurationError("samples is for --strategy resample")
        if strategy == "resample" and (temperature != 1.0 or top_p != 1.0):
            raise ConfigurationError(
                f"the resample strategy draws whole answers at temperature 1 with top_p 1 and reweights them to the "
                f"proxy-tuned distribution; got temperature={temperature:g}, top_p={top_p:g}: pass temperature=1, "
                "top_p=1 (or use --strategy per-step)"
            )
        if strategy == "speculative":
            if self.mode == "chat":
                raise ModeNotSupportedError(
                    "the speculative strategy continues the text chunk by chunk, which chat mode cannot do: "
                    "use --mode completions or --mode chat-prefix"
                )
            if temperature not in (0.0, 1.0) or top_p != 1.0:
                raise ConfigurationError(
                    f"the speculative strategy samples the tuned distribution at temperature 1 (or greedy at 0) "
                    f"with top_p 1; got temperature={temperature:g}, top_p={top_p:g}: use --strategy per-step "
                    "for other settings"
                )
        if self.mode == "chat" and max_tokens > 1 and strategy != "resample":
            raise ModeNotSupportedError(
                "chat mode cannot continue a partial answer, so token-by-token proxy tuning applies to the first "
                "token only: use --strategy resample (whole answers, reweighted), max_tokens=1 (one-token answers), "
                "or --mode completions / --mode chat-prefix (a host that continues an assistant prefix)"
            )
        if self.mode == "completions" and prompt is None:
            raise ConfigurationError("completions mode takes a text prompt; pass prompt=TEXT or use a chat mode")
        top_k = self.top_k_for_mode()
        cap = self.client.top_k_cap
        if cap is not None and top_k > cap:
            raise ConfigurationError(
                f"top_k {top_k} is above what {self.client.dialect} allows in {self.mode} mode ({cap}); pass --top-k {cap} or less"
            )
        for scorer in (self.expert, self.anti_expert):
            scorer.prompt_ids(prompt=prompt, messages=messages)  # raises if it does not fit the context
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return DecodeParams(alpha, temperature, top_p, max_tokens, top_k, stops, seed, chunk)

    def _decoder(
        self,
        *,
        prompt: str | None,
        messages: Sequence[dict[str, str]] | None,
        max_tokens: int,
        alpha: float,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: str | Sequence[str] | None,
        strategy: str,
        chunk: int | None = None,
        samples: int | None = None,
    ) -> DecoderBase:
        params = self.check_request(
            prompt=prompt, messages=messages, max_tokens=max_tokens, alpha=alpha, temperature=temperature,
            top_p=top_p, seed=seed, stop=stop, strategy=strategy, chunk=chunk, samples=samples,
        )
        alpha, temperature, top_p, top_k = params.alpha, params.temperature, params.top_p, params.top_k
        expert_session, anti_session = open_sessions(
            self.expert, self.expert.prompt_ids(prompt=prompt, messages=messages),
            self.anti_expert, self.anti_expert.prompt_ids(prompt=prompt, messages=messages),
            batching=self.batch_scoring,
        )
        hosted_prompt_ids = None
        if self.mode == "completions" and self.client.token_prompts and self.hosted_vocab is not None:
            hosted_prompt_ids = self.hosted_vocab.encode_prompt(prompt or "")
        settings = {
            "strategy": strategy,
            "mode": self.mode,
            "model": self.client.model,
            "alpha": alpha,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "max_tokens": max_tokens,
            "seed": seed,
            "expert": self.expert.name,
            "anti_expert": self.anti_expert.name,
            "hosted_tokenizer": self.hosted_vocab.name if self.hosted_vocab else None,
            "alignment": "token ids (same tokenizer)" if self.same_vocab else self.aligner.description,
            "token_prompts": hosted_prompt_ids is not None,
            "chunk": (chunk or "adaptive") if strategy == "speculative" else None,
            "samples": (samples or DEFAULT_SAMPLES) if strategy == "resample" else None,
        }
        extra: dict[str, Any] = {}
        if strategy == "speculative":
            decoder_class: type = SpeculativeDecoder
        elif strategy == "resample":
            decoder_class = ResampleDecoder
            extra = {"samples": samples or DEFAULT_SAMPLES, "max_per_call": self.client.max_choices}
        else:
            decoder_class = PerStepDecoder
        decoder = decoder_class(
            **extra,
            mode=self.mode,
            expert=expert_session,
            anti_expert=anti_session,
            aligner=self.aligner,
            params=params,
            same_vocab=self.same_vocab,
            prompt=prompt,
            messages=_messages(prompt, messages),
            hosted_prompt_ids=hosted_prompt_ids,
            settings=settings,
        )
        if self.hosted_vocab is not None:
            decoder.end_ids = tuple(sorted(self.hosted_vocab.end_ids))
        return decoder


class ProxyTuner(_TunerBase):
    """Proxy-tune a hosted model, synchronously. See :class:`_TunerBase` for the arguments.

    Example::

        tuner = ProxyTuner(base_url="http://127.0.0.1:8000/v1", model="gemma-3-270m",
                           expert="path/to/expert", anti_expert="path/to/base")
        result = tuner.generate(prompt="Question: 12+7?\\nAnswer:", max_tokens=16)
        print(result.text, result.usage)
    """

    _client_class = HostedClient

    def _check_hosted(self) -> None:
        self.client.check()

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict[str, str]] | None = None,
        max_tokens: int = 64,
        alpha: float = 1.0,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        strategy: str = "per-step",
        chunk: int | None = None,
        samples: int | None = None,
    ) -> GenerationResult:
        """Generate proxy-tuned text.

        ``strategy="per-step"``: one hosted API call per token, choosing among the top-k.
        ``strategy="speculative"``: the API drafts chunks of ``chunk`` tokens (adaptive when
        left out) that are accepted or resampled to follow the full proxy-tuned distribution
        (temperature 1) or its greedy path (temperature 0).
        ``strategy="resample"``: ``samples`` whole answers (default 16) drawn by the API at
        temperature 1, one picked by importance resampling; works in chat mode too.
        """
        self.client.check()
        decoder = self._decoder(
            prompt=prompt, messages=messages, max_tokens=max_tokens, alpha=alpha,
            temperature=temperature, top_p=top_p, seed=seed, stop=stop, strategy=strategy, chunk=chunk,
            samples=samples,
        )
        try:
            while not decoder.done:
                request = decoder.request()
                started = time.perf_counter()
                results = self.client.complete(request)
                decoder.observe(results, time.perf_counter() - started)
        finally:
            decoder.expert.close()
            decoder.anti_expert.close()
        return decoder.result()

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "ProxyTuner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncProxyTuner(_TunerBase):
    """Async twin of :class:`ProxyTuner`; local scoring runs in a worker thread.

    Example::

        async with AsyncProxyTuner(model="m", expert=e, anti_expert=a) as tuner:
            result = await tuner.generate(prompt="Hello", max_tokens=8)
    """

    _client_class = AsyncHostedClient
    batch_scoring = True
    _executor: Any = None

    async def _in_thread(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Run local work in this tuner's threads (many, so concurrent generations can meet in
        the scoring queue; the model lock keeps their forwards one at a time)."""
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=32, thread_name_prefix="blackbox-proxy-scoring")
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict[str, str]] | None = None,
        max_tokens: int = 64,
        alpha: float = 1.0,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        strategy: str = "per-step",
        chunk: int | None = None,
        samples: int | None = None,
    ) -> GenerationResult:
        """See :meth:`ProxyTuner.generate`."""
        last = None
        async for event in self.stream(prompt, messages=messages, max_tokens=max_tokens, alpha=alpha,
                                       temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                                       strategy=strategy, chunk=chunk, samples=samples):
            last = event
        assert last is not None and last.result is not None
        return last.result

    async def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict[str, str]] | None = None,
        max_tokens: int = 64,
        alpha: float = 1.0,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        strategy: str = "per-step",
        chunk: int | None = None,
        samples: int | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """:meth:`generate`, as it happens: a :class:`StreamEvent` with the new text after every
        API call that added some, and a last one carrying the :class:`GenerationResult`. The
        pieces add up to the result's text.

        Example::

            async for event in tuner.stream("Hello", max_tokens=16):
                print(event.text, end="", flush=True)
        """
        await self.client.check()
        decoder = await self._in_thread(
            self._decoder,
            prompt=prompt, messages=messages, max_tokens=max_tokens, alpha=alpha,
            temperature=temperature, top_p=top_p, seed=seed, stop=stop, strategy=strategy, chunk=chunk,
            samples=samples,
        )
        shown = ""
        try:
            while not decoder.done:
                request = decoder.request()
                started = time.perf_counter()
                results = await self.client.complete(request)
                await self._in_thread(decoder.observe, results, time.perf_counter() - started)
                text = decoder.stable_text()
                if not decoder.done and len(text) > len(shown) and text.startswith(shown):
                    yield StreamEvent(text[len(shown):])
                    shown = text
        finally:
            decoder.expert.close()
            decoder.anti_expert.close()
        result = decoder.result()
        # The stable text never changes afterwards, so what was shown is a prefix of the result.
        yield StreamEvent(result.text[len(shown):] if result.text.startswith(shown) else "", result)

    async def close(self) -> None:
        await self.client.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def __aenter__(self) -> "AsyncProxyTuner":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
