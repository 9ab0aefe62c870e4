"""A long soak of `blackbox-proxy serve` under concurrent load, against a hosted API that fails.

    python benchmarks/soak.py [--minutes 10] [--clients 16] [--fault-rate 0.1] [--abandon 0.1] [--json]

Gemma-3-270M (base) is served on loopback by `blackbox-proxy serve-model` in a child process.
In front of it, in this process, a fault proxy forwards each hosted call and fails a share
``--fault-rate`` of them, each with a kind drawn from: a 500 or 503, a connection reset in the
middle of the answer, a stall past the tuner's timeout, a streamed event that is not JSON (a
whole answer cut in half), and a context-limit 400 (only on a call that continues an answer,
as a real host's context fills; the generation then ends with ``length``). The tuned server
(the embedded SmolLM2 pair, retries on) runs in this process too, and ``--clients`` openai SDK
clients send it held-out arithmetic problems for ``--minutes``: completions and chat routes,
streamed and not, per-step and speculative, greedy and sampled. A share ``--abandon`` of the
requests is abandoned by its client (a timeout before the answer, or a stream closed after
its first event).

Reported: requests answered, abandoned, refused with a reason (4xx), failed upstream (502/504:
the host failed past every retry), lost (no answer and no status: a broken connection or a
stream that ended without finishing), answered twice (a response id seen twice), 500s;
p50/p99 latency of answered requests; the process's resident memory, open file descriptors and
threads after warm-up (the first fifth) and at the end. Targets (issue 32): 0 lost, 0 answered
twice, 0 500s, memory and descriptors within 10% of warm-up at the end. Loopback only; every
server stops at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import threading
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import openai  # noqa: E402
import torch  # noqa: E402

from blackbox_proxy import AsyncProxyTuner  # noqa: E402
from blackbox_proxy.apps.openai_http import ServerThread  # noqa: E402
from blackbox_proxy.apps.tuned_server import create_tuned_app  # noqa: E402
from blackbox_proxy.evaluation.arithmetic import STOP, problems  # noqa: E402
from blackbox_proxy.harness.demo import HOSTED_NAME, load_pair, model_server  # noqa: E402
from blackbox_proxy.harness.embedded import prepare  # noqa: E402

KINDS = ("500", "503", "reset", "stall", "malformed", "context")
TIMEOUT = 30.0  # the tuner's per-call timeout (s): a stall outlasts it. The hosted model shares two cores
# with 16 clients' scoring, so a call waits seconds in its queue: a short timeout turns load into
# retries that pile up at the host (a first run with 4 s failed 95% of requests upstream that way)


class FaultProxy:
    """An ASGI app forwarding ``/v1/...`` to ``upstream`` and failing a share of the calls."""

    def __init__(self, upstream: str, *, rate: float, seed: int, stall: float) -> None:
        self.upstream, self.rate, self.stall = upstream.rstrip("/"), rate, stall
        self.root = self.upstream.removesuffix("/v1")  # /tokenize and the like sit beside /v1
        self.rng = random.Random(seed)
        self.counts: Counter = Counter()
        self.shortest: dict[str, int] = {}  # a prompt's start -> the shortest prompt seen with it
        self.http: httpx.AsyncClient | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        path = scope["path"]
        url = self.upstream + path.removeprefix("/v1") if path.startswith("/v1/") else self.root + path
        kind = self._kind(raw, scope["method"])
        self.counts[kind] += 1
        if kind in ("500", "503"):
            return await _json(send, int(kind), {"error": {"message": "injected failure", "type": "server_error"}})
        if kind == "context":
            return await _json(send, 400, {"error": {
                "message": "This model's maximum context length is 96 tokens. However, you requested 97 tokens. "
                           "Please reduce the length of the messages.", "type": "invalid_request_error",
                "code": "context_length_exceeded"}})
        if kind == "stall":
            await asyncio.sleep(self.stall)
            return await _json(send, 504, {"error": {"message": "too late", "type": "server_error"}})
        if self.http is None:
            self.http = httpx.AsyncClient(timeout=120)
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k.lower() in (b"content-type", b"authorization")}
        request = self.http.build_request(scope["method"], url, content=raw or None, headers=headers)
        response = await self.http.send(request, stream=True)
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(b"content-type", response.headers.get("content-type", "application/json").encode())]})
            body, sent = b"", 0
            async for piece in response.aiter_raw():
                body += piece
                if kind == "reset" and len(body) > 64:
                    raise ConnectionResetError("injected reset")  # uvicorn aborts the connection
                if kind == "malformed":
                    continue  # sent below, broken
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                sent += len(piece)
            if kind == "malformed":
                broken = body.replace(b"data: {", b"data: {\"broken\": ", 1) if b"data: {" in body \
                    else body[: len(body) // 2]
                await send({"type": "http.response.body", "body": broken, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    def _kind(self, raw: bytes, method: str) -> str:
        if method != "POST" or not raw or self.rng.random() >= self.rate:
            return "ok"
        kind = self.rng.choice(KINDS)
        if kind == "context" and not self._continues(raw):
            return "ok"  # a real host's context fills on later calls, not on the prompt alone
        return kind

    def _continues(self, raw: bytes) -> bool:
        """Whether this call continues an answer: its prompt is longer than the shortest one seen
        with the same start."""
        try:
            body = json.loads(raw)
        except ValueError:
            return False
        prompt = body.get("prompt") or json.dumps(body.get("messages"))
        if isinstance(prompt, list):
            prompt = json.dumps(prompt)
        start = str(prompt)[:48]
        shortest = self.shortest.setdefault(start, len(str(prompt)))
        self.shortest[start] = min(shortest, len(str(prompt)))
        return len(str(prompt)) > shortest


async def _json(send, status, obj):
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def process_stats() -> dict[str, float]:
    """Resident memory (MiB), open file descriptors and threads of this process."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024, "fds": len(os.listdir("/proc/self/fd")),
            "threads": int(status["Threads"]), "python_threads": threading.active_count()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else float("nan")


class Outcomes:
    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.statuses: Counter = Counter()
        self.latencies: list[float] = []
        self.ids: Counter = Counter()
        self.lost: list[str] = []
        self.failed: list[str] = []  # in-stream errors' messages


async def one_request(server_url: str, rng: random.Random, item, out: Outcomes, abandon: float) -> None:
    route = rng.choice(["completions", "chat"])
    stream = rng.random() < 0.5
    options = dict(model="tuned", max_tokens=rng.choice([6, 10, 16]), stop=STOP,
                   temperature=rng.choice([0.0, 1.0]), seed=rng.randrange(1000),
                   extra_body={"strategy": rng.choice(["per-step", "speculative"])})
    abandoning = rng.random() < abandon
    timeout = rng.uniform(0.2, 1.5) if abandoning and not stream else 300.0
    started = time.perf_counter()
    async with openai.AsyncOpenAI(base_url=server_url, api_key="-", max_retries=0, timeout=timeout) as client:
        try:
            if route == "completions":
                call = client.completions.create(prompt=item.hosted_prompt(), stream=stream, **options)
            else:
                call = client.chat.completions.create(messages=[{"role": "user", "content": item.question}],
                                                      stream=stream, **options)
            resp = await call
            rid = None
            if stream:
                finish, rid = None, None
                async for event in resp:
                    rid = rid or event.id
                    if abandoning:
                        await resp.close()
                        out.counts["abandoned"] += 1
                        return
                    for choice in event.choices:  # (error events raise openai.APIError, below)
                        finish = choice.finish_reason or finish
                if finish is None:
                    out.counts["lost"] += 1
                    out.lost.append(f"{route} stream ended without a finish_reason")
                    return
            else:
                rid = resp.id
            out.counts["answered"] += 1
            out.ids[rid] += 1
            out.latencies.append(time.perf_counter() - started)
        except openai.APITimeoutError:
            if abandoning:
                out.counts["abandoned"] += 1
            else:
                out.counts["lost"] += 1
                out.lost.append(f"{route} timed out")
        except openai.APIStatusError as exc:  # (before APIError, its base)
            out.statuses[exc.status_code] += 1
            out.counts["upstream failed" if exc.status_code in (502, 504) else
                       "500" if exc.status_code >= 500 else "refused"] += 1
            if exc.status_code == 500:
                out.lost.append(f"500: {exc.message[:200]}")
        except (openai.APIConnectionError, httpx.HTTPError) as exc:
            out.counts["lost"] += 1
            out.lost.append(f"{route} {type(exc).__name__}: {str(exc)[:200]}")
        except openai.APIError as exc:  # an error event inside a stream: the generation failed, and said why
            out.counts["upstream failed" if "hosted API" in str(exc) else "500"] += 1
            out.failed.append(str(exc)[:200])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--fault-rate", type=float, default=0.1)
    ap.add_argument("--abandon", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    # the injected resets' tracebacks (uvicorn logs every exception an app raises)
    logging.getLogger("uvicorn.error").addFilter(lambda r: not (r.exc_info and "injected" in str(r.exc_info[1])))
    gemma = prepare("gemma3")
    items = problems("test", 64)
    expert, anti = load_pair()
    out = Outcomes()
    samples: list[tuple[float, dict]] = []
    with model_server(gemma, name=HOSTED_NAME, threads=1) as hosted_url:
        proxy = FaultProxy(hosted_url.rsplit("/v1", 1)[0] + "/v1", rate=args.fault_rate, seed=args.seed,
                           stall=TIMEOUT * 1.5)
        with ServerThread(proxy) as faulty:
            tuner = AsyncProxyTuner(base_url=faulty.base_url, model=HOSTED_NAME, expert=expert, anti_expert=anti,
                                    hosted_tokenizer=str(gemma), top_k=20, timeout=TIMEOUT, max_retries=4)
            with ServerThread(create_tuned_app(tuner, name="tuned")) as server:
                async def run() -> float:
                    deadline = time.monotonic() + args.minutes * 60

                    async def client_loop(k: int) -> None:
                        rng = random.Random(args.seed * 1000 + k)
                        while time.monotonic() < deadline:
                            await one_request(server.base_url, rng, rng.choice(items), out, args.abandon)

                    async def monitor() -> None:
                        while time.monotonic() < deadline:
                            samples.append((time.monotonic(), process_stats()))
                            await asyncio.sleep(5)

                    started = time.monotonic()
                    await asyncio.gather(monitor(), *(client_loop(k) for k in range(args.clients)))
                    await asyncio.sleep(2)  # abandoned generations wind down
                    samples.append((time.monotonic(), process_stats()))
                    return time.monotonic() - started

                wall = asyncio.run(run())
    start = samples[0][0]
    warm = next(s for t, s in samples if t - start >= wall / 5)
    end = samples[-1][1]
    report = {
        "minutes": round(wall / 60, 1), "clients": args.clients, "fault_rate": args.fault_rate,
        "abandon": args.abandon, "requests": sum(out.counts.values()), "outcomes": dict(out.counts),
        "statuses": dict(out.statuses), "answered_twice": sum(1 for n in out.ids.values() if n > 1),
        "p50_s": statistics.median(out.latencies) if out.latencies else None,
        "p99_s": percentile(out.latencies, 0.99), "faults_injected": dict(proxy.counts),
        "after_warmup": warm, "at_end": end,
        "rss_growth": end["rss_mib"] / warm["rss_mib"] - 1, "fd_growth": end["fds"] / warm["fds"] - 1,
        "lost_examples": out.lost[:5],
        # resident memory through the run (MiB at each fifth): a plateau or a slope
        "rss_by_fifth": [round(next(s for t, s in samples if t - start >= wall * k / 5 - 1e-9)["rss_mib"])
                         if k < 5 else round(end["rss_mib"]) for k in range(1, 6)],
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['minutes']} min, {args.clients} clients, {args.fault_rate:.0%} hosted calls failed on purpose "
          f"({', '.join(f'{k} {v}' for k, v in sorted(proxy.counts.items()))}), {args.abandon:.0%} abandoned")
    print("| requests | answered | abandoned | refused (4xx) | upstream failed (502/504) | lost | answered twice | 500s "
          "| p50 s | p99 s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    c = out.counts
    print(f"| {report['requests']} | {c['answered']} | {c['abandoned']} | {c['refused']} | {c['upstream failed']} "
          f"| {c['lost']} | {report['answered_twice']} | {c['500']} | {report['p50_s'] or float('nan'):.1f} "
          f"| {report['p99_s']:.1f} |")
    print("| | after warm-up | at the end | growth |")
    print("|---|---|---|---|")
    for key in ("rss_mib", "fds", "threads", "python_threads"):
        growth = end[key] / warm[key] - 1 if warm[key] else 0.0
        print(f"| {key} | {warm[key]:.0f} | {end[key]:.0f} | {growth:+.0%} |")
    print("resident memory (MiB) at each fifth of the run:", report["rss_by_fifth"])
    for line in out.lost[:5]:
        print("lost:", line)


if __name__ == "__main__":
    main()
