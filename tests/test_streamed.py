"""Streamed speculative chunks (hosts/streaming.py, decoding/walks/draft.py): each chunk is walked
as its tokens arrive and closed at the first rejection; the output is the whole-chunk walk's,
draw for draw. Decoder-level oracles on a tiny model (the whole-chunk walk, exact proxy tuning),
then real HTTP on 127.0.0.1: the replay host streaming one token per event, a stream cut
mid-chunk, a host that streams without logprobs, the response cache."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import torch
from test_speculative import MemoSession, chi2_pvalue, concentrated, exact_joint

from decoders import build
from blackbox_proxy import AsyncProxyTuner, HostedResponseError, ProxyTuner
from blackbox_proxy.apps.openai_http import ServerThread
from blackbox_proxy.decoding.speculative import SpeculativeDecoder
from blackbox_proxy.harness.replay import LatencyModel, Recording, ReplayHost, create_replay_app
from blackbox_proxy.types import Candidate, HostedPosition, HostedResult, HostedUsage

PROMPT = "The quick brown"


# ----- the decoder, without HTTP ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_models(tok_a):
    from tiny import tiny_llama

    live = [tok_a.convert_tokens_to_ids(t) for t in ["a", "b", "c", "d", "e", "f"]]
    return [concentrated(tiny_llama(tok_a, s, hidden=32), live, s) for s in (10, 11, 12)], live


class Host:
    """The hosted tiny model answering a decoder's requests in-process: ``top_k`` candidates per
    position (the whole vocabulary when None) and the drawn token, drawn from the request's seed
    (greedy: the argmax), so the same request gets the same answer."""

    def __init__(self, tok, model, top_k=None):
        from blackbox_proxy.tokens.loaders import vocabulary_from_hf

        self.vocab = vocabulary_from_hf(tok)
        self.session = MemoSession(model, [])
        self.top_k = top_k
        self.memo = {}

    def _position(self, ids):
        key = tuple(ids)
        if key not in self.memo:
            lp = self.session.logprobs(ids)
            keep = range(len(lp)) if self.top_k is None else torch.topk(lp, self.top_k).indices.tolist()
            every = {t: Candidate("", self.vocab.token_bytes[t], float(lp[t]), t) for t in range(len(lp))
                     if self.vocab.token_bytes[t]}
            self.memo[key] = lp, every, tuple(every[t] for t in keep if t in every)
        return self.memo[key]

    def answer(self, request) -> HostedResult:
        gen = torch.Generator().manual_seed(request.seed if request.seed is not None else 0)
        ids, positions = list(request.prompt), []
        for _ in range(request.max_tokens):
            lp, every, top = self._position(ids)
            token = int(torch.argmax(lp)) if request.temperature == 0 else int(
                torch.multinomial(lp.exp().float(), 1, generator=gen))
            cands = top if every[token] in top else (*top, every[token])
            positions.append(HostedPosition(candidates=cands, sampled=every[token]))
            ids.append(token)
        return HostedResult("", tuple(positions), "length", HostedUsage())


def decoder(tok, sessions, prompt_ids, seed, temperature, *, streamed, chunk=6, max_tokens=10, top_k=4):
    from blackbox_proxy.tokens.loaders import vocabulary_from_hf

    vocab = vocabulary_from_hf(tok)
    return build(SpeculativeDecoder, sessions[0], sessions[1], vocab, prompt_ids=prompt_ids, top_k=top_k,
                 streams=streamed, alpha=1.0, temperature=temperature, max_tokens=max_tokens, chunk=chunk, seed=seed,
                 tail_calls=0)


def drive(dec, host, cuts: torch.Generator | None = None):
    """Run a decoder to the end. Streamed requests are fed as a stream would be: the positions so
    far, a random number more each time, until ``take`` says stop (the client reads at most one
    more event before it closes); the answer is then the positions read, unfinished."""
    requests = []
    while not dec.done:
        request = dec.request()
        requests.append(request)
        answer = host.answer(request)
        if not request.stream:
            dec.observe([answer], 0.0)
            continue
        assert cuts is not None
        read = 0
        while read < len(answer.positions):
            read = min(len(answer.positions), read + 1 + int(torch.randint(0, 3, (), generator=cuts)))
            if dec.take(HostedResult("", answer.positions[:read], None, HostedUsage())):
                read = min(len(answer.positions), read + int(torch.randint(0, 2, (), generator=cuts)))
                break
        finish = answer.finish_reason if read == len(answer.positions) else None
        dec.observe([HostedResult("", answer.positions[:read], finish, HostedUsage())], 0.0)
    return requests


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_streamed_walk_is_the_whole_chunk_walk_draw_for_draw(tok_a, live_models, temperature):
    """Same requests, same chunk outcomes, same text, for 60 seeds and random event sizes: the
    streamed walk consumes the generator exactly as the whole-chunk walk does."""
    (large, expert, anti), _ = live_models
    prompt = tok_a.encode(PROMPT)
    host = Host(tok_a, large, top_k=4)
    sessions = MemoSession(expert, prompt), MemoSession(anti, prompt)
    cuts = torch.Generator().manual_seed(7)
    rejected = 0
    for seed in range(60):
        whole = decoder(tok_a, sessions, prompt, seed, temperature, streamed=False)
        streamed = decoder(tok_a, sessions, prompt, seed, temperature, streamed=True)
        asked_whole = drive(whole, host)
        asked_streamed = drive(streamed, host, cuts)
        assert all(r.stream for r in asked_streamed) and not any(r.stream for r in asked_whole)
        assert [(r.prompt, r.max_tokens, r.seed) for r in asked_streamed] == [
            (r.prompt, r.max_tokens, r.seed) for r in asked_whole]
        assert streamed.prefix == whole.prefix
        outcome = [(c.accepted, c.rejected_at, c.replacement, c.accept_probs) for c in whole.chunks]
        assert [(c.accepted, c.rejected_at, c.replacement, c.accept_probs) for c in streamed.chunks] == outcome
        rejected += sum(c.rejected_at is not None for c in whole.chunks)
    assert rejected > 20  # the walks did reject mid-chunk (the streamed walk stopped early there)


@pytest.mark.slow
def test_streamed_draws_match_exact_proxy_tuning(tok_a, live_models):
    """The chi-square test of test_speculative, through the streamed walk: k = the vocabulary,
    10,000 draws of the first two tokens against exact proxy tuning."""
    (large, expert, anti), live = live_models
    prompt = tok_a.encode(PROMPT)
    host = Host(tok_a, large)
    sessions = MemoSession(expert, prompt), MemoSession(anti, prompt)
    cuts = torch.Generator().manual_seed(3)
    firsts = []
    for i in range(10_000):
        dec = decoder(tok_a, sessions, prompt, 50_000 + i, 1.0, streamed=True, chunk=2, max_tokens=2, top_k=400)
        drive(dec, host, cuts)
        firsts.append(tuple(list(dec.prefix.ids)[:2]))
    table = exact_joint((host.session, *sessions), prompt, live)
    p = chi2_pvalue(firsts, table)
    print(f"streamed speculative, first two tokens vs exact proxy tuning: chi-square p = {p:.3f}")
    assert p > 0.01
    assert chi2_pvalue(firsts, exact_joint((host.session, *sessions), prompt, live, alpha=0.0)) < 1e-6


# ----- over HTTP ---------------------------------------------------------------------------------------


def _tuner(base_url, scorers, tok, **kw):
    kw.setdefault("max_retries", 0)
    return ProxyTuner(base_url=base_url, model="tiny", expert=scorers[0], anti_expert=scorers[1],
                      hosted_tokenizer=tok, top_k=10, **kw)


RUNS = [dict(temperature=0.0, drafts=1), dict(temperature=1.0, seed=5, tail_calls=0)]  # one draft: whole chunks walk as streams do


@pytest.fixture(scope="module")
def recording(server_a, scorers_a, scorers_b, tok_a, tmp_path_factory):
    """The hosted answers of every request the tests below make, recorded from the real server."""
    path = tmp_path_factory.mktemp("streamed") / "answers.jsonl"
    with ReplayHost(path, upstream=server_a.base_url) as host:
        for scorers in (scorers_a, scorers_b):
            for streamed in (False, True):
                with _tuner(host.base_url, scorers, tok_a, stream_chunks=streamed) as t:
                    for kw in RUNS:
                        t.generate(PROMPT, max_tokens=16, strategy="speculative", chunk=16, **kw)
    return Recording(path)


@pytest.mark.parametrize("which", ["same", "cross"])
def test_streamed_chunks_over_http_equal_whole_chunks_and_stop_early(recording, scorers_a, scorers_b, tok_a, which):
    """Through a replay host that streams one token per event (50 ms apart): the same texts and
    chunk outcomes as whole chunks, and fewer tokens read: each stream was closed at its rejection."""
    scorers = scorers_a if which == "same" else scorers_b
    latency = LatencyModel(ttft=0.01, per_token=0.05, jitter=0.0)
    with ReplayHost(recording, latency=latency) as host:
        for kw in RUNS:
            with _tuner(host.base_url, scorers, tok_a, stream_chunks=False) as t:
                whole = t.generate(PROMPT, max_tokens=16, strategy="speculative", chunk=16, **kw)
            with _tuner(host.base_url, scorers, tok_a) as t:  # on by default (vLLM dialect)
                streamed = t.generate(PROMPT, max_tokens=16, strategy="speculative", chunk=16, **kw)
                assert t.client.dialect == "vllm" and t.client.streams_logprobs
            assert streamed.text == whole.text
            assert [(c.accepted, c.rejected_at, c.replacement) for c in streamed.chunks] == [
                (c.accepted, c.rejected_at, c.replacement) for c in whole.chunks]
            assert streamed.usage.api_calls == whole.usage.api_calls
            assert streamed.usage.prompt_tokens == whole.usage.prompt_tokens  # the replay streams usage
            if any(c.rejected_at is not None and c.rejected_at < 12 for c in whole.chunks):
                assert streamed.usage.completion_tokens < whole.usage.completion_tokens
        assert not host.stats.missed


def test_the_async_tuner_streams_chunks_too(recording, scorers_b, tok_a):
    latency = LatencyModel(ttft=0.01, per_token=0.02, jitter=0.0)

    async def run(base_url, streamed):
        async with AsyncProxyTuner(base_url=base_url, model="tiny", expert=scorers_b[0], anti_expert=scorers_b[1],
                                   hosted_tokenizer=tok_a, top_k=10, max_retries=0, stream_chunks=streamed) as t:
            return await t.generate(PROMPT, max_tokens=16, strategy="speculative", chunk=16, **RUNS[0])

    with ReplayHost(recording, latency=latency) as host:
        whole, streamed = asyncio.run(run(host.base_url, False)), asyncio.run(run(host.base_url, True))
        assert not host.stats.missed
    assert streamed.text == whole.text and streamed.usage.api_calls == whole.usage.api_calls
    assert streamed.usage.completion_tokens <= whole.usage.completion_tokens


class StreamFault:
    """ASGI wrapper of a real app: ``cut_after``: a streamed answer's connection dies after that
    many events (uvicorn aborts it mid-body); ``strip``: streamed events lose their logprobs;
    ``end_first``: the first streams end before any event; ``garble_first``: the first streams'
    first event is not JSON; ``repeat_at``: every stream sends that event twice."""

    def __init__(self, app, *, cut_after=None, strip=False, end_first=0, garble_first=0, repeat_at=None):
        self.app, self.cut_after, self.strip, self.end_first = app, cut_after, strip, end_first
        self.garble_first, self.repeat_at = garble_first, repeat_at
        self.streams = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        events = 0
        streaming = ended = False

        async def forward(message):
            nonlocal events, streaming, ended
            if ended:
                return  # ``end_first``: the rest of the answer is dropped, the response already complete
            if message["type"] == "http.response.start":
                streaming = any(k == b"content-type" and v.startswith(b"text/event-stream")
                                for k, v in message.get("headers", []))
                self.streams += streaming
            elif message["type"] == "http.response.body" and streaming and message.get("body"):
                events += 1
                if self.cut_after is not None and events > self.cut_after:
                    raise ConnectionError("the stream is cut here on purpose")
                if self.streams <= self.end_first:  # a clean end before any event: no finish_reason, no [DONE]
                    ended = True
                    message = {"type": "http.response.body", "body": b"", "more_body": False}
                elif self.strip:
                    message = dict(message, body=_without_logprobs(message["body"]))
                elif events == 1 and self.streams <= self.garble_first:
                    message = dict(message, body=b'data: {"choices": [{"text": \n\n')
                elif events == self.repeat_at:
                    await send(message)
            await send(message)

        await self.app(scope, receive, forward)


def _without_logprobs(body: bytes) -> bytes:
    out = []
    for line in body.decode().split("\n"):
        if line.startswith("data: {"):
            event = json.loads(line[len("data: "):])
            for choice in event.get("choices") or []:
                choice["logprobs"] = None
            line = "data: " + json.dumps(event)
        out.append(line)
    return "\n".join(out).encode()


def test_a_stream_cut_mid_chunk_keeps_what_arrived(recording, server_a, scorers_b, tok_a, caplog):
    """The connection dies after 3 events of every stream: the positions read are walked as a
    shorter chunk, nothing is lost, and greedy output is that of whole chunks."""
    with ReplayHost(recording) as host, _tuner(host.base_url, scorers_b, tok_a, stream_chunks=False) as t:
        whole = t.generate(PROMPT, max_tokens=16, strategy="speculative", chunk=16, **RUNS[0])
    # shorter chunks ask from new prefixes: the real server answers what the recording lacks
    app = StreamFault(create_replay_app(recording, upstream=server_a.base_url), cut_after=3)
    with ServerThread(app) as server, _tuner(server.base_url, scorers_b, tok_a) as t:
        t.client.stream_chunks = True  # an unknown host: streamed because asked
        with caplog.at_level(logging.INFO, logger="blackbox_proxy.hosts.streaming"):
            cut = t.generate(PROMPT, max_tokens=16, strategy="speculative", chunk=16, **RUNS[0])
    assert app.streams >= 1
    assert any("broke after 3 tokens" in r.getMessage() for r in caplog.records)
    assert cut.text == whole.text  # greedy: any chunking gives the per-step greedy text


def test_a_stream_that_ends_before_its_first_event_is_retried(recording, server_a, scorers_b, tok_a):
    """A proxy that ends the first two streams cleanly before any event (no finish_reason, no
    [DONE]): each is a broken stream, retried under the retry policy, not an answer without
    logprobs (which is asked again only once)."""
    with ReplayHost(recording) as host, _tuner(host.base_url, scorers_b, tok_a, stream_chunks=False) as t:
        whole = t.generate(PROMPT, max_tokens=16, strategy="speculative", chunk=16, **RUNS[0])
    app = StreamFault(create_replay_app(recording, upstream=server_a.base_url), end_first=2)
    with ServerThread(app) as server, _tuner(server.base_url, scorers_b, tok_a, max_retries=3) as t:
        t.client.stream_chunks = True
        got = t.generate(PROMPT, max_tokens=16, strategy="speculative", chunk=16, **RUNS[0])
    assert app.streams >= 3 and got.text == whole.text


def test_a_repeated_event_is_dropped_not_read_as_another_token(recording, server_a, scorers_b, tok_a, caplog):
    """A host (or proxy) that sends the same SSE event twice: before, the repeat was read as the
    next position and changed the greedy text; it is dropped, and said once in the log."""
    with ReplayHost(recording) as host, _tuner(host.base_url, scorers_b, tok_a, stream_chunks=False) as t:
        whole = t.generate(PROMPT, max_tokens=16, strategy="speculative", chunk=16, **RUNS[0])
    app = StreamFault(create_replay_app(recording, upstream=server_a.base_url), repeat_at=2)
    with ServerThread(app) as server, _tuner(server.base_url, scorers_b, tok_a) as t:
        t.client.stream_chunks = True
        with caplog.at_level(logging.WARNING, logger="blackbox_proxy.hosts.streaming"):
            got = t.generate(PROMPT, max_tokens=16, strategy="speculative", chunk=16, **RUNS[0])
    assert app.streams >= 1 and got.text == whole.text
    assert sum("repeated" in r.getMessage() for r in caplog.records) >= 1


def test_a_malformed_event_is_not_called_unreachable(recording, server_a, scorers_b, tok_a):
    """An event that is not JSON before any position: retried like a body cut off, and when it
    keeps coming, an error about the host's answers, not "cannot reach ... check --base-url"."""
    with ReplayHost(recording) as host, _tuner(host.base_url, scorers_b, tok_a, stream_chunks=False) as t:
        whole = t.generate(PROMPT, max_tokens=16, strategy="speculative", chunk=16, **RUNS[0])
    app = StreamFault(create_replay_app(recording, upstream=server_a.base_url), garble_first=1)
    with ServerThread(app) as server, _tuner(server.base_url, scorers_b, tok_a, max_retries=2) as t:
        t.client.stream_chunks = True
        assert t.generate(PROMPT, max_tokens=16, strategy="speculative", chunk=16, **RUNS[0]).text == whole.text
    app = StreamFault(create_replay_app(recording, upstream=server_a.base_url), garble_first=100)
    with ServerThread(app) as server, _tuner(server.base_url, scorers_b, tok_a, max_retries=1) as t:
        t.client.stream_chunks = True
        with pytest.raises(HostedResponseError) as info:
            t.generate(PROMPT, max_tokens=16, strategy="speculative", chunk=16, **RUNS[0])
    assert "not valid JSON" in str(info.value) and "cannot reach" not in str(info.value)


def test_a_host_that_streams_no_logprobs_is_asked_whole(recording, scorers_b, tok_a, caplog):
    app = StreamFault(create_replay_app(recording, upstream=None), strip=True)
    with ReplayHost(recording) as host, _tuner(host.base_url, scorers_b, tok_a, stream_chunks=False) as t:
        whole = t.generate(PROMPT, max_tokens=16, strategy="speculative", chunk=16, **RUNS[0])
    with ServerThread(app) as server, _tuner(server.base_url, scorers_b, tok_a, stream_chunks=True) as t:
        with caplog.at_level(logging.WARNING, logger="blackbox_proxy.hosts.streaming"):
            got = t.generate(PROMPT, max_tokens=16, strategy="speculative", chunk=16, **RUNS[0])
        assert not t.client.streams_logprobs
    assert app.streams == 1  # tried once, then whole chunks
    assert got.text == whole.text
    assert sum("without logprobs" in r.getMessage() for r in caplog.records) == 1


def test_a_closed_stream_is_cached_and_not_paid_again(recording, scorers_b, tok_a, tmp_path):
    latency = LatencyModel(ttft=0.01, per_token=0.02, jitter=0.0)
    cache = tmp_path / "cache.sqlite"
    with ReplayHost(recording, latency=latency) as host:
        with _tuner(host.base_url, scorers_b, tok_a, cache=cache) as t:
            first = t.generate(PROMPT, max_tokens=16, strategy="speculative", chunk=16, **RUNS[1])
        calls = host.stats.replayed
        with _tuner(host.base_url, scorers_b, tok_a, cache=cache) as t:
            again = t.generate(PROMPT, max_tokens=16, strategy="speculative", chunk=16, **RUNS[1])
        # the rerun asked the host /v1/models once (the client's check), and every chunk from the cache
        assert host.stats.replayed == calls + 1 and first.usage.api_calls > 1
    assert again.text == first.text and any(c.rejected_at is not None for c in first.chunks)


def test_chat_prefix_chunks_stream_too(server_a, tok_a, models_a, tmp_path):
    """chat-prefix: the replay streams chat chunks one token per event (``logprobs.content``);
    streamed and whole chunks give the same answer, and the stream is read to its rejection only."""
    from blackbox_proxy import Scorer

    scorers = (Scorer(models_a[1], tok_a, render="chat", name="Ec"), Scorer(models_a[2], tok_a, render="chat", name="Ac"))
    messages = [{"role": "user", "content": "Tell me about a café"}]

    def run(base_url, streamed):
        with ProxyTuner(base_url=base_url, model="tiny", expert=scorers[0], anti_expert=scorers[1], mode="chat-prefix",
                        hosted_tokenizer=tok_a, top_k=10, max_retries=0, stream_chunks=streamed) as t:
            return t.generate(messages=messages, max_tokens=12, strategy="speculative", chunk=12, **RUNS[0])

    with ReplayHost(tmp_path / "chat.jsonl", upstream=server_a.base_url) as host:
        recorded = run(host.base_url, False)
    with ReplayHost(tmp_path / "chat.jsonl", latency=LatencyModel(ttft=0.01, per_token=0.05, jitter=0.0)) as host:
        whole, streamed = run(host.base_url, False), run(host.base_url, True)
        assert not host.stats.missed
    assert streamed.text == whole.text == recorded.text
    assert [(c.accepted, c.rejected_at) for c in streamed.chunks] == [(c.accepted, c.rejected_at) for c in whole.chunks]
    assert any(c.rejected_at is not None and c.rejected_at < 8 for c in whole.chunks)
    assert streamed.usage.completion_tokens < whole.usage.completion_tokens  # closed at the rejections
