"""Public entry points: :class:`ProxyTuner` (sync) and :class:`AsyncProxyTuner` (async).

Both share :class:`_TunerBase`, the composition root: it loads the small models, finds the hosted
vocabulary, builds the aligner, checks what depends on this tuner (the strategy on this host, k
within its cap, context lengths) on top of :class:`~blackbox_proxy.request.GenerationRequest`'s
checks, and builds each generation's decoder whole. The twins differ in how they wait for the
hosted API (async: local scoring in worker threads). Options are GenerationRequest fields, as
keywords or ``request=``. A context limit met after paid calls ends a generation with
``finish_reason="length"`` and the text so far (:mod:`~blackbox_proxy.decoding.driver`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

from . import _constants as C
from .decoding import DECODERS, Decoder, HostedPrompt, Scoring, choose
from .decoding.driver import check_fits, round_async, round_sync
from .decoding.resample import DEFAULT_SAMPLES
from .errors import ConfigurationError
from .hosts.client import AsyncHostedClient, HostedClient
from .hosts.discover import discover, text_prompt_warning
from .local.scorer import load_small_models
from .local.sessions import open_sessions
from .rendering import (MISMATCH_WARNING, adapter_render, auto_render, hosted_chat_text, read_template,
                        renderings_disagree)
from .request import STRATEGIES, GenerationRequest
from .tokens.aligner import Aligner
from .tokens.loaders import load_hosted_vocabulary
from .tokens.vocab import Vocabulary
from .types import MODES, GenerationResult, HostCapabilities, StreamEvent

__all__ = ["AsyncProxyTuner", "ProxyTuner", "STRATEGIES"]

logger = logging.getLogger(__name__)


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
        expert_render, anti_expert_render: ``auto`` | ``chat`` | ``raw`` prompt rendering of the
            small models. ``auto`` renders them as the hosted model sees the prompt: raw text in
            ``completions`` mode, their chat template (when they have one) in the chat modes, so
            the three models continue the same context and the offsets measure the tuning, not the
            formatting. Pass ``chat`` when the expert was tuned on chat-rendered prompts but the
            hosted model continues raw text (the demo's arithmetic adapter; README, "Prompt
            rendering"). Ignored for :class:`Scorer` objects, which carry their own.
        backoff: tokens dropped to reach a stable tokenisation boundary (aligner).
        timeout, max_retries: per-request timeout (s) and retries after the first attempt.
        cache: a SQLite file (or :class:`~blackbox_proxy.hosts.cache.ResponseCache`) so identical
            hosted requests are answered without paying again.
        chat_template: a Jinja chat template (the text, or a file holding it) for chat messages
            sent to a ``completions`` host; by default the hosted tokenizer's template when it has
            one, else the expert's (the small models render messages with their own templates).
        batch_scoring: share the small models' forwards among concurrent generations
            (:mod:`blackbox_proxy.local.batching`); on by default in the async tuner.
        scorer_url: a vLLM server that serves the small models (:mod:`blackbox_proxy.local.vllm_scorer`);
            ``expert`` and ``anti_expert`` then name served models (e.g. a LoRA module and its base).
            Default: the models run in this process. Scoring backends built by hand (a
            :class:`~blackbox_proxy.local.backend.ScoringBackend`) can be passed as expert/anti_expert.
        stream_chunks: stream speculative chunk calls and close each at its first rejected draft
            (:mod:`blackbox_proxy.hosts.streaming`); None (default): where the host's dialect
            streams logprobs (OpenAI, vLLM, this project's servers).
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
        chat_template: str | None = None,
        scorer_url: str | None = None,
        stream_chunks: bool | None = None,
    ) -> None:
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise ConfigurationError(f"top_k must be an integer >= 1, got {top_k!r}")
        if backoff < 0:
            raise ConfigurationError(f"backoff must be >= 0, got {backoff}")
        self.mode = mode
        self.top_k = top_k
        self.chat_template = read_template(chat_template)
        if batch_scoring is not None:
            self.batch_scoring = bool(batch_scoring)
        discover = hosted_tokenizer is None or hosted_tokenizer == "auto"
        off = isinstance(hosted_tokenizer, str) and hosted_tokenizer.lower() == "none"
        self.hosted_vocab: Vocabulary | None = (
            None if discover or off else load_hosted_vocabulary(hosted_tokenizer)
        )
        self.hosted_tokenizer_source = (
            "none (text prompts, as asked)" if off else "discovery pending" if discover else "given"
        )
        self.hosted_context: int | None = None  # tokens, when the host says (see hosts/discover.py)
        self.client = self._client_class(model=model, base_url=base_url, api_key=api_key, mode=mode, dialect=dialect,
                                         hosted_vocab=self.hosted_vocab, timeout=timeout, max_retries=max_retries,
                                         token_prompts=token_prompts, cache=cache, stream_chunks=stream_chunks)
        if check_hosted:
            self._check_hosted()
        if expert_adapter is None:
            renders = auto_render(expert_render, mode), auto_render(anti_expert_render, mode)
        else:
            renders = (adapter_render(expert_render, anti_expert_render, mode),) * 2
        self.expert, self.anti_expert = load_small_models(
            expert=expert, anti_expert=anti_expert, expert_adapter=expert_adapter, device=device,
            expert_render=renders[0], anti_expert_render=renders[1], scorer_url=scorer_url,
        )
        if discover:
            self._discover_hosted_tokenizer()
        self.same_vocab = bool(self.hosted_vocab is not None and self.hosted_vocab.same_as(self.expert.vocab))
        self.aligner = Aligner(self.expert.vocab, self.hosted_vocab, backoff=backoff)

    def _discover_hosted_tokenizer(self) -> None:
        """Find the hosted tokenizer (``hosts/discover.py``) and hand it to the client; one warning
        when none is found, since text prompts make proxy tuning inexact."""
        found = discover(base_url=self.client.base_url, api_key=self.client.api_key_for_probes(),
                         model=self.client.model, small_vocab=self.expert.vocab, timeout=min(self.client.timeout, 5.0))
        self.hosted_tokenizer_source = found.source
        self.hosted_context = found.context
        if found.vocab is None:
            logger.warning(text_prompt_warning(found.source))
            return
        logger.info("hosted tokenizer: %s", found.source)
        self.hosted_vocab = found.vocab
        self.client.use_vocabulary(found.vocab)

    def _check_hosted(self) -> None:
        """Reach the hosted API before loading models (sync tuner only)."""

    _warned_renderings = False

    def _check_renderings(self, decoder: Decoder) -> None:
        """Warn once when chat-rendered small models find the raw hosted prompt's candidates
        implausible (:func:`blackbox_proxy.rendering.renderings_disagree`)."""
        if self._warned_renderings or self.mode != "completions" or not decoder.steps:
            return
        if renderings_disagree({self.expert.render, self.anti_expert.render}, decoder.steps[0].candidates):
            type(self)._warned_renderings = True
            logger.warning(MISMATCH_WARNING)

    _warned_tail: str | None = None

    def _check_tail(self, decoder: Decoder) -> None:
        """Warn once per tuner (one host) when tail probes stopped because the host's answers
        cannot be trusted; every generation also says so in ``usage.untrusted_tail_calls`` and
        ``settings["tail_off"]``."""
        if decoder.tail_off and self._warned_tail is None:
            self._warned_tail = decoder.tail_off
            logger.warning("tail probes stopped on %s: %s; generations use the candidates-only rule there "
                           "(usage.untrusted_tail_calls counts the probes; --tail-calls 0 asks none)",
                           self.client.model, decoder.tail_off)

    def top_k_for_mode(self) -> int:
        """The k asked of the API: ``top_k`` if given, else the default for this host."""
        return self.top_k if self.top_k is not None else self.client.default_top_k

    @staticmethod
    def request_for(prompt: str | None = None, request: GenerationRequest | None = None,
                    **options: Any) -> GenerationRequest:
        """The validated :class:`GenerationRequest` of a call: ``request`` as given, or one built
        from ``prompt`` and the keyword options."""
        if request is None:
            return GenerationRequest.build(prompt=prompt, **options)
        if prompt is not None or options:
            raise ConfigurationError("pass either request=GenerationRequest(...) or a prompt and options, not both")
        if not isinstance(request, GenerationRequest):
            raise ConfigurationError(f"request must be a GenerationRequest, got {type(request).__name__}")
        return request

    def check_request(self, prompt: str | None = None, *, request: GenerationRequest | None = None,
                      **options: Any) -> GenerationRequest:
        """Validate one generation's options without calling the API; the error says what to fix.

        Every rule :meth:`generate` applies: those of :class:`GenerationRequest`, then what this
        tuner's mode and host support, k within the host's cap, and a prompt that fits each
        small model's context. Returns the request, its strategy chosen when it asked ``auto``
        (:func:`~blackbox_proxy.decoding.strategies.choose`).
        """
        return self._prepare(self.request_for(prompt, request, **options))[0]

    def _prepare(self, req: GenerationRequest, hosted_ids: Any = None) -> tuple[
            GenerationRequest, str, HostCapabilities, HostedPrompt, list[list[int]]]:
        """The checks of :meth:`check_request`, and what they computed on the way: the request with
        its strategy chosen, why, the host's capabilities, the hosted prompt (``hosted_ids``: its
        ids as a client sent them, after the tokenizer's prefix ids) and each small model's prompt
        ids."""
        host = self.client.capabilities(self.top_k)
        strategy, why = choose(req, host)
        if strategy != req.strategy:
            req = req.model_copy(update={"strategy": strategy})  # choose() keeps what the strategy needs
        DECODERS[strategy].check(req, host)
        text, messages = self.prompt_text(req), req.message_dicts()
        small_ids = []
        for role, scorer in (("expert", self.expert), ("anti-expert", self.anti_expert)):
            small_ids.append(scorer.prompt_ids(prompt=text, messages=messages))  # raises if it alone does not fit
            check_fits(f"the {role}", len(small_ids[-1]), req.max_tokens, scorer.max_length)
        ids = None
        vocab = self.hosted_vocab
        if self.mode == "completions" and vocab is not None:
            if self.hosted_context:
                ids = vocab.encode_prompt(text or "")
                check_fits(f"the hosted model {self.client.model!r}", len(ids), req.max_tokens, self.hosted_context)
            if not self.client.token_prompts:
                ids = None
            elif hosted_ids is not None:
                ids = list(vocab.prompt_prefix_ids) + list(hosted_ids)
            elif ids is None:
                ids = vocab.encode_prompt(text or "")
        prompt = HostedPrompt(text=text, messages=req.message_pairs(), ids=tuple(ids) if ids is not None else None)
        return req, why, host, prompt, small_ids

    def prompt_text(self, req: GenerationRequest) -> str | None:
        """The text the hosted model continues in completions mode: the prompt, or chat messages
        rendered with a chat template (:func:`blackbox_proxy.rendering.hosted_chat_text`); None
        in the chat modes, where the host renders the messages itself."""
        if self.mode != "completions" or req.messages is None:
            return req.prompt
        return hosted_chat_text(req.message_dicts() or [], template=self.chat_template,
                                hosted_vocab=self.hosted_vocab, expert_tokenizer=self.expert.tokenizer)

    def decoder(self, prompt: str | None = None, *, request: GenerationRequest | None = None,
                hosted_ids: Any = None, **options: Any) -> Decoder:
        """A fresh decoder for one generation (its small models' sessions open: close them with
        ``decoder.scoring.close()``). ``hosted_ids``: the prompt's hosted token ids as a client
        sent them (used as they are when the tuner sends token-id prompts)."""
        req, why, host, hosted_prompt, (expert_ids, anti_ids) = self._prepare(self.request_for(prompt, request, **options),
                                                                               hosted_ids)
        logger.info("strategy %s: %s", req.strategy, why)
        expert_session, anti_session = open_sessions(self.expert, expert_ids, self.anti_expert, anti_ids,
                                                     batching=self.batch_scoring)
        scoring = Scoring(expert_session, anti_session, self.aligner, same_vocab=self.same_vocab, alpha=req.alpha)
        settings = {
            "strategy": req.strategy, "strategy_reason": why, "mode": self.mode, "model": self.client.model, "alpha": req.alpha,
            "temperature": req.temperature, "top_p": req.top_p, "top_k": host.top_k,
            "max_tokens": req.max_tokens, "seed": req.seed, "expert": self.expert.name,
            "anti_expert": self.anti_expert.name,
            "hosted_tokenizer": self.hosted_vocab.name if self.hosted_vocab else None,
            "hosted_tokenizer_source": self.hosted_tokenizer_source,
            "alignment": scoring.alignment,
            "token_prompts": hosted_prompt.ids is not None,
            "chunk": (req.chunk or "adaptive") if req.strategy == "speculative" else None,
            "samples": (req.samples or DEFAULT_SAMPLES) if req.strategy == "resample" else None,
        }
        return DECODERS[req.strategy](req, host=host, scoring=scoring, prompt=hosted_prompt, settings=settings)


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

    def generate(self, prompt: str | None = None, *, request: GenerationRequest | None = None,
                 **options: Any) -> GenerationResult:
        """Generate proxy-tuned text. Options (:class:`GenerationRequest`): ``messages``,
        ``max_tokens`` (64), ``alpha`` (1), ``temperature`` (0 = greedy), ``top_p``, ``seed``,
        ``stop``, ``strategy`` (``per-step``: one call per token; ``speculative``: API-drafted
        chunks accepted or resampled, ``chunk`` tokens each; ``resample``: ``samples`` whole
        answers reweighted, chat mode included), ``drafts``, ``tail_calls``."""
        self.client.check()
        decoder = self.decoder(prompt, request=request, **options)
        try:
            while not decoder.done:
                round_sync(self.client, decoder, self._prefetcher())
        finally:
            decoder.scoring.close()
        self._check_renderings(decoder)
        self._check_tail(decoder)
        return decoder.result()

    def _prefetcher(self) -> Any:
        """One worker thread for :meth:`Decoder.prefetch` (torch releases the GIL)."""
        if self._prefetch_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._prefetch_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blackbox-proxy-prefetch")
        return self._prefetch_pool

    _prefetch_pool: Any = None

    def close(self) -> None:
        self.client.close()
        if self._prefetch_pool is not None:
            self._prefetch_pool.shutdown(wait=True)
            self._prefetch_pool = None

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

    async def generate(self, prompt: str | None = None, *, request: GenerationRequest | None = None,
                       **options: Any) -> GenerationResult:
        """See :meth:`ProxyTuner.generate`."""
        last = None
        async for event in self.stream(prompt, request=request, **options):
            last = event
        assert last is not None and last.result is not None
        return last.result

    async def stream(self, prompt: str | None = None, *, request: GenerationRequest | None = None,
                     **options: Any) -> AsyncIterator[StreamEvent]:
        """:meth:`generate`, as it happens: a :class:`StreamEvent` with the new text (and trace
        steps) after every API call that added some, and a last one carrying the
        :class:`GenerationResult`. The pieces add up to the result's text.

        Example::

            async for event in tuner.stream("Hello", max_tokens=16):
                print(event.text, end="", flush=True)
        """
        await self.client.check()
        decoder = await self._in_thread(self.decoder, prompt, request=request, **options)
        shown, sent = "", 0  # text and trace steps handed out so far
        try:
            while not decoder.done:
                await round_async(self.client, decoder, self._in_thread)
                text = decoder.stable_text()
                if not decoder.done and len(text) > len(shown) and text.startswith(shown):
                    yield StreamEvent(text[len(shown):], steps=tuple(decoder.steps[sent:]))
                    shown, sent = text, len(decoder.steps)
        finally:
            decoder.scoring.close()
        self._check_renderings(decoder)
        self._check_tail(decoder)
        result = decoder.result()
        # The stable text never changes afterwards, so what was shown is a prefix of the result.
        yield StreamEvent(result.text[len(shown):] if result.text.startswith(shown) else "", result,
                          tuple(decoder.steps[sent:]))

    async def close(self) -> None:
        await self.client.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    async def __aenter__(self) -> "AsyncProxyTuner":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
