"""Two ``serve`` replicas behind a round-robin load balancer answer as one server (tuned_server.py,
"Replicas"; docs/deploy.md).

Everything runs on 127.0.0.1: a deterministic hosted stand-in (the project's model server
behind a memo, so an identical hosted request gets identical bytes, as the premise of "the same
answer from any replica" needs), two replicas with their own copies of the small models (as two
processes would have), and :class:`RoundRobin`, a tiny proxy that sends request i to
replica i mod 2, skips a replica that refuses the connection, and names the replica that
answered in an ``x-upstream`` header. One replica is warmed first with a prompt that shares a
long prefix with the test prompts (its prompt cache then holds that prefix); the answers of both
are compared bit for bit, logprobs included.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections import Counter
from contextlib import ExitStack

import httpx
import openai
import pytest

from blackbox_proxy import AsyncProxyTuner, Scorer
from blackbox_proxy.apps.model_server import create_app
from blackbox_proxy.apps.openai_http import ServerThread
from blackbox_proxy.apps.served_fingerprint import fingerprinter
from blackbox_proxy.apps.tuned_server import create_tuned_app
from blackbox_proxy.local import sessions
from blackbox_proxy.local.runner import ModelRunner

NAME = "tiny-tuned"
FEW_SHOT = ("Question: what is 12 + 30? Answer: 42. Question: what is 7 * 6? Answer: 42. "
            "Question: what is 50 - 8? Answer: 42. Question: what is ")  # 47 tokens: a 32-token block is reused
HOP = {b"host", b"content-length", b"connection", b"keep-alive", b"transfer-encoding"}


async def _body(receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


class Memo:
    """ASGI wrapper: the first answer to each (method, path, body) is kept and replayed whole."""

    def __init__(self, app) -> None:
        self.app, self.answers = app, {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = await _body(receive)
        key = (scope["method"], scope["path"], body)
        if key not in self.answers:
            sent, given = [], [False]

            async def replay_body():
                if given[0]:  # the client stays connected until the answer is whole
                    await asyncio.Event().wait()
                given[0] = True
                return {"type": "http.request", "body": body, "more_body": False}

            async def keep(message):
                sent.append(message)

            await self.app(scope, replay_body, keep)
            self.answers.setdefault(key, sent)
        for message in self.answers[key]:
            await send(message)


class RoundRobin:
    """A tiny load balancer (ASGI): request i goes to upstream i mod N; an upstream that refuses
    the connection is counted in ``refused`` and the request goes to the next one. Answers
    stream through as they arrive; ``served`` counts the answers of each upstream."""

    def __init__(self, upstreams: list[str]) -> None:
        self.upstreams = upstreams
        self.turn = itertools.count()
        self.served: Counter = Counter()
        self.refused: Counter = Counter()

    async def __call__(self, scope, receive, send):
        assert scope["type"] == "http"
        body = await _body(receive)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP]
        url = scope["path"] + ("?" + scope["query_string"].decode() if scope["query_string"] else "")
        for _ in self.upstreams:
            upstream = self.upstreams[next(self.turn) % len(self.upstreams)]
            async with httpx.AsyncClient(base_url=upstream, timeout=60) as client:
                try:
                    answer = await client.send(client.build_request(scope["method"], url, headers=headers,
                                                                    content=body), stream=True)
                except httpx.ConnectError:
                    self.refused[upstream] += 1
                    continue
                self.served[upstream] += 1
                kept = [(k, v) for k, v in answer.headers.raw if k.lower() not in HOP]
                await send({"type": "http.response.start", "status": answer.status_code,
                            "headers": kept + [(b"x-upstream", upstream.encode())]})
                async for part in answer.aiter_raw():
                    await send({"type": "http.response.body", "body": part, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                await answer.aclose()
                return
        await send({"type": "http.response.start", "status": 502, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"no upstream answered"})


class RecordingStore(sessions.PromptStore):
    """The prompt store, noting how many prompt tokens each session of each scorer reused."""

    def __init__(self) -> None:
        super().__init__()
        self.reused: dict[int, list[int]] = {}

    def seed(self, owner, kind, context, ids):
        n = super().seed(owner, kind, context, ids)
        self.reused.setdefault(id(owner), []).append(n)
        return n


def root(server: ServerThread) -> str:
    return f"http://{server.host}:{server.port}"


@pytest.fixture(scope="module")
def farm(tok_a, models_a):
    """(proxy, balancer, replicas, tuners, store): two replicas of one configuration behind RoundRobin."""
    with ExitStack() as stack:
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        store = RecordingStore()
        patch.setattr(sessions, "PROMPTS", store)
        hosted = stack.enter_context(ServerThread(Memo(create_app(ModelRunner(models_a[0], tok_a, name="tiny"),
                                                                  max_top_logprobs=len(tok_a)))))
        tuners, replicas = [], []
        for _ in range(2):
            expert = Scorer(copy.deepcopy(models_a[1]), tok_a, render="raw", name="E")
            anti = Scorer(copy.deepcopy(models_a[2]), tok_a, render="raw", name="A")
            # the dialect given, as serve pins the one its start-up probe finds (this project's server: vllm's)
            tuners.append(AsyncProxyTuner(base_url=hosted.base_url, model="tiny", expert=expert, anti_expert=anti,
                                          top_k=8, hosted_tokenizer=tok_a, max_retries=0, dialect="vllm"))
            replicas.append(stack.enter_context(ServerThread(create_tuned_app(tuners[-1], name=NAME))))
        balancer = RoundRobin([root(r) for r in replicas])
        proxy = stack.enter_context(ServerThread(balancer))
        yield proxy, balancer, replicas, tuners, store


def ask(proxy: ServerThread, body: dict) -> tuple[str, dict]:
    """(the replica that answered, its JSON) for one completions request through the proxy."""
    resp = httpx.post(proxy.base_url + "/completions", json={"model": NAME, **body}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.headers["x-upstream"], resp.json()


def answer(reply: dict) -> list:
    """What must not depend on the replica: texts, logprobs, finish reasons, token counts."""
    return [reply["choices"], reply["usage"], reply["system_fingerprint"]]


def test_replicas_answer_alike_through_a_round_robin(farm):
    proxy, balancer, replicas, tuners, store = farm
    first, second = (root(r) for r in replicas)
    fingerprints = {}
    for _ in range(2):  # liveness route, no key: what a load balancer's health check asks
        resp = httpx.get(f"http://{proxy.host}:{proxy.port}/health", timeout=10)
        assert resp.status_code == 200 and resp.json()["status"] == "ok"
        fingerprints[resp.headers["x-upstream"]] = resp.json()["system_fingerprint"]
    assert set(fingerprints) == {first, second} and len(set(fingerprints.values())) == 1
    # another default alpha is another configuration: its fingerprint says so
    assert fingerprinter(tuners[0], alpha=2.0)() != fingerprinter(tuners[0], alpha=1.0)()

    # the first replica alone serves a prompt sharing its first 47 tokens with those below
    warm = httpx.post(root(replicas[0]) + "/v1/completions", timeout=60, json={
        "model": NAME, "prompt": FEW_SHOT + "2 + 3? Answer:", "max_tokens": 4, "temperature": 0})
    assert warm.status_code == 200

    prompt = FEW_SHOT + "9 - 4? Answer:"
    for body in ({"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 3},  # greedy
                 {"prompt": prompt, "max_tokens": 8, "temperature": 0.9, "seed": 11, "logprobs": 3, "n": 2},
                 {"prompt": prompt, "max_tokens": 8, "temperature": 1.0, "seed": 5, "strategy": "speculative"}):
        (one, a), (other, b) = ask(proxy, body), ask(proxy, body)
        assert {one, other} == {first, second}  # both replicas answered, one each
        assert answer(a) == answer(b), body  # bit for bit: the logprobs are floats straight from the scoring
        assert a["choices"][0]["text"] and a["system_fingerprint"] == fingerprints[first]
        if "logprobs" in body:
            assert a["choices"][0]["logprobs"]["token_logprobs"]
    assert balancer.served[first] >= 4 and balancer.served[second] >= 4 and not balancer.refused
    # the first pair met a warm replica (32 prompt tokens from its cache) and a fresh one
    assert store.reused[id(tuners[0].expert)][:2] == [0, 32] and store.reused[id(tuners[1].expert)][0] == 0

    # streaming through the proxy: several events, the same text from each replica
    want = ask(proxy, {"prompt": prompt, "max_tokens": 8, "temperature": 0})[1]["choices"][0]["text"]
    sdk = openai.OpenAI(base_url=proxy.base_url, api_key="-", max_retries=0)
    for _ in range(2):
        with sdk.completions.with_streaming_response.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0,
                                                            stream=True) as raw:
            upstream = raw.headers["x-upstream"]
            events = list(raw.parse())
        assert len(events) >= 3 and "".join(e.choices[0].text for e in events) == want, upstream

    # one replica goes away: the next requests go to the other, with the same answer
    before = dict(balancer.served)
    replicas[1].stop()
    greedy = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 3}
    wanted = answer(ask(proxy, greedy)[1])
    for _ in range(2):
        upstream, reply = ask(proxy, greedy)
        assert upstream == first and answer(reply) == wanted
    assert balancer.refused[second] >= 1 and balancer.served[first] == before[first] + 3
    assert balancer.served[second] == before[second]


def test_concurrent_requests_through_the_proxy_match_sequential_ones(tok_a, models_a):
    """Without batch scoring, overlapping requests on two replicas get what one at a time gets."""
    with ExitStack() as stack:
        hosted = stack.enter_context(ServerThread(Memo(create_app(ModelRunner(models_a[0], tok_a, name="tiny"),
                                                                  max_top_logprobs=len(tok_a)))))
        replicas = []
        for _ in range(2):
            tuner = AsyncProxyTuner(base_url=hosted.base_url, model="tiny", top_k=8, hosted_tokenizer=tok_a,
                                    max_retries=0, dialect="vllm", batch_scoring=False,
                                    expert=Scorer(copy.deepcopy(models_a[1]), tok_a, render="raw", name="E"),
                                    anti_expert=Scorer(copy.deepcopy(models_a[2]), tok_a, render="raw", name="A"))
            replicas.append(stack.enter_context(ServerThread(create_tuned_app(tuner, name=NAME))))
        balancer = RoundRobin([root(r) for r in replicas])
        proxy = stack.enter_context(ServerThread(balancer))
        bodies = [{"model": NAME, "prompt": FEW_SHOT + f"{i} + {i}? Answer:", "max_tokens": 6, "temperature": 0.8,
                   "seed": i, "logprobs": 2} for i in range(4)]
        alone = [answer(ask(proxy, {k: v for k, v in b.items() if k != "model"})[1]) for b in bodies]

        async def together():
            async with httpx.AsyncClient(base_url=proxy.base_url, timeout=60) as client:
                replies = await asyncio.gather(*(client.post("/completions", json=b) for b in bodies * 2))
            return [answer(r.json()) for r in replies]

        assert asyncio.run(together()) == alone * 2
        assert set(balancer.served) == {root(r) for r in replicas}
