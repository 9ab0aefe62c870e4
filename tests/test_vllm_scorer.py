"""The scoring backend interface and the vLLM backend, against a loopback stub of vLLM's API.

The stub (real HTTP on 127.0.0.1) answers ``/v1/models``, ``/tokenize`` and ``/v1/completions``
as vLLM 0.32 does (``logprobs`` keyed ``"token_id:N"``, list prompts, LoRA modules listed with a
``parent``), computing each answer with a tiny local model in float32. The backend's dense
distributions, and whole generations through it, must then equal the local scorer's. The real
vLLM server is the interop tier's (``tests/test_interop_scorer.py``).
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from blackbox_proxy import ProxyTuner
from blackbox_proxy.apps.cli import main
from blackbox_proxy.apps.openai_http import free_port
from blackbox_proxy.errors import ConfigurationError, ScorerBackendError
from blackbox_proxy.local.backend import ScoringBackend, ScoringSession
from blackbox_proxy.local.sessions import open_sessions
from blackbox_proxy.local.vllm_scorer import ModelGate, VLLMConnection, VLLMScorer, connect, dense_logprobs


class StubVLLM:
    """vLLM's scoring routes over ``models`` {served name: causal LM}; ``parents`` lists LoRA modules."""

    def __init__(self, tokenizer, root, models, parents=None, top=-1):
        self.tokenizer, self.root, self.models, self.parents, self.top = tokenizer, str(root), models, parents or {}, top
        self.requests: list[dict] = []
        self.faults: list[str] = []  # the next completions requests fail so: "503", "drop", "garbage", "400"
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body, headers=()):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                data = [{"id": name, "root": stub.root if name not in stub.parents else "/adapters/" + name,
                         "parent": stub.parents.get(name), "max_model_len": 256 if name not in stub.parents else None}
                        for name in stub.models]
                self._send(200, {"object": "list", "data": data})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                fault = stub.faults.pop(0) if stub.faults and self.path == "/v1/completions" else None
                if fault == "drop":  # the connection closes without an answer
                    self.close_connection = True
                    return
                if fault == "garbage":  # a 200 cut off on the way
                    return self._send(200, b'{"choices": [{"ind')
                if fault in ("503", "400"):
                    return self._send(int(fault), {"error": {"message": f"injected {fault}"}},
                                      [("Retry-After", "0")] if fault == "503" else [])
                status, answer = stub.answer(self.path, body)
                self._send(status, answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path, body):
        if path == "/tokenize":
            return 200, {"tokens": self.tokenizer.encode(body["prompt"], add_special_tokens=body["add_special_tokens"])}
        if body.get("logprobs") != self.top or not body.get("return_tokens_as_token_ids"):
            return 400, {"error": {"message": "Requested more than max_logprobs"}}
        prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        model = self.models[body["model"]]
        choices = []
        for i, ids in enumerate(prompts):
            with torch.inference_mode():
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            keep = range(len(logprobs)) if body["logprobs"] == -1 else torch.topk(logprobs, self.top).indices.tolist()
            top = {f"token_id:{t}": float(logprobs[t]) for t in keep}
            choices.append({"index": i, "logprobs": {"top_logprobs": [top]}})
        return 200, {"choices": choices}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def folder_a(tmp_path_factory, tok_a, models_a):
    root = tmp_path_factory.mktemp("served_a")
    tok_a.save_pretrained(root)
    (root / "config.json").write_text(json.dumps({"vocab_size": models_a[1].config.vocab_size}))
    return root


@pytest.fixture(scope="module", params=["two models", "lora"])
def stub_a(request, tok_a, models_a, folder_a):
    parents = {"E": "A"} if request.param == "lora" else {}
    stub = StubVLLM(tok_a, folder_a, {"E": models_a[1], "A": models_a[2]}, parents)
    yield stub
    stub.close()


def test_the_local_scorer_is_a_scoring_backend(scorers_a):
    expert, _ = scorers_a
    assert isinstance(expert, ScoringBackend)
    session = expert.session(expert.prompt_ids(prompt="The quick"))
    assert isinstance(session, ScoringSession)
    session.close()


def test_dense_logprobs_spreads_what_is_left_and_keeps_returned_values():
    top = {"token_id:3": math.log(0.6), "token_id:1": math.log(0.2), "token_id:9": -1.0}  # id 9 is past the vocabulary
    dist = dense_logprobs(top, 5)
    assert dist.dtype == torch.float32 and dist.shape == (5,)
    assert dist.exp().tolist() == pytest.approx([0.2 / 3, 0.2, 0.2 / 3, 0.6, 0.2 / 3], abs=1e-6)
    # nothing left over: the floor; a left-over share above the smallest returned value is capped at it
    assert dense_logprobs({"token_id:0": 0.0}, 3).tolist()[1] == pytest.approx(math.log(1e-12))
    capped = dense_logprobs({"token_id:0": math.log(0.5), "token_id:1": math.log(0.01)}, 3)
    assert float(capped[2]) == pytest.approx(math.log(0.01))
    with pytest.raises(ScorerBackendError, match="token_id"):
        dense_logprobs({" the": -0.5}, 5)
    for broken in ({"token_id:x": -0.5}, {"token_id:1": "high"}, {"token_id:1 2": -0.5}, {}, {1: -0.5}):
        with pytest.raises(ScorerBackendError, match="token_id"):
            dense_logprobs(broken, 5)


def test_the_vllm_backend_gives_the_local_distributions(stub_a, scorers_a):
    expert, anti = connect(stub_a.url, expert="E", anti_expert="A", expert_render="raw", anti_expert_render="raw")
    assert isinstance(expert, ScoringBackend) and expert.vocab is anti.vocab
    assert expert.max_length == 256 and expert.size == len(expert.vocab.token_bytes)
    ids = expert.prompt_ids(prompt="The quick brown")
    assert ids == scorers_a[0].prompt_ids(prompt="The quick brown")
    remote = open_sessions(expert, ids, anti, ids)
    local = open_sessions(scorers_a[0], ids, scorers_a[1], ids)
    groups = [([], [(5, 7), (9,)]), ([11], [(3,)]), ([11, 12], [])]
    stub_a.requests.clear()
    for r, l in zip(remote, local):
        got, want = r.distributions_groups(groups), l.distributions_groups(groups)
        assert [set(g) for g in got] == [set(w) for w in want]
        for g, w in zip(got, want):
            for node in w:
                assert torch.allclose(g[node], w[node], atol=1e-4), node
    # both models asked in the expert's round, the anti-expert's call answered from memory
    assert remote[0].forwards == 1 and remote[1].forwards == 0
    prompts = [p for body in stub_a.requests for p in (body["prompt"] if isinstance(body["prompt"][0], list)
                                                         else [body["prompt"]])]
    assert len(prompts) == 2 * 7  # per model: 4 nodes of the first group, 2 of the second, 1 of the third
    lora = bool(stub_a.parents)
    assert all(not isinstance(b["prompt"][0], list) for b in stub_a.requests) == lora  # one prompt per request with LoRA


def test_generations_through_the_vllm_backend_equal_the_local_ones(stub_a, server_a, tok_a, scorers_a):
    common = dict(base_url=server_a.base_url, model="tiny", hosted_tokenizer=tok_a, top_k=50, max_retries=0)
    local = ProxyTuner(**common, expert=scorers_a[0], anti_expert=scorers_a[1])
    remote = ProxyTuner(**common, scorer_url=stub_a.url, expert="E", anti_expert="A", expert_render="raw",
                        anti_expert_render="raw")
    assert remote.same_vocab
    for strategy in ("per-step", "speculative"):
        want = local.generate("The quick brown", max_tokens=8, strategy=strategy)
        got = remote.generate("The quick brown", max_tokens=8, strategy=strategy)
        assert got.text == want.text
        for a, b in zip(got.trace, want.trace):
            assert [c.delta for c in a.candidates] == pytest.approx([c.delta for c in b.candidates], abs=1e-4)


def test_cross_tokenizer_generations_through_the_vllm_backend(tok_b, models_b, scorers_b, server_a, tok_a,
                                                              tmp_path):
    tok_b.save_pretrained(tmp_path)
    stub = StubVLLM(tok_b, tmp_path, {"E": models_b[0], "A": models_b[1]}, {"E": "A"})
    try:
        common = dict(base_url=server_a.base_url, model="tiny", hosted_tokenizer=tok_a, top_k=20, max_retries=0)
        local = ProxyTuner(**common, expert=scorers_b[0], anti_expert=scorers_b[1])
        remote = ProxyTuner(**common, scorer_url=stub.url, expert="E", anti_expert="A", expert_render="raw",
                            anti_expert_render="raw")
        assert not remote.same_vocab
        want, got = (t.generate("Numbers: 12 and 3", max_tokens=8) for t in (local, remote))
        assert got.text == want.text
        for a, b in zip(got.trace, want.trace):
            assert [c.delta for c in a.candidates] == pytest.approx([c.delta for c in b.candidates], abs=1e-4)
    finally:
        stub.close()


def test_a_top_n_server_and_its_refusal(tok_a, models_a, folder_a):
    stub = StubVLLM(tok_a, folder_a, {"A": models_a[2]}, top=5)
    try:
        scorer = VLLMScorer(VLLMConnection(stub.url), "A", render="raw")
        with pytest.raises(ScorerBackendError, match="--max-logprobs -1"):
            scorer.session([1, 2]).distributions([])
        approx = VLLMScorer(VLLMConnection(stub.url, top_logprobs=5), "A", render="raw")
        dist = approx.session([1, 2]).distributions([])[()]
        assert float(dist.exp().sum()) == pytest.approx(1.0, abs=1e-5)
        with pytest.raises(ConfigurationError, match="serves no model 'B'.*A"):
            VLLMScorer(VLLMConnection(stub.url), "B")
    finally:
        stub.close()


def test_failed_scoring_requests_are_retried_and_then_given_up(tok_a, models_a, folder_a):
    """503s (with Retry-After), dropped connections and bodies cut off are asked again and give the
    same distribution; a 400 is not retried; past max_retries the failure is one ScorerBackendError."""
    stub = StubVLLM(tok_a, folder_a, {"A": models_a[2]})
    try:
        conn = VLLMConnection(stub.url, seed=0)

        def ask(connection=conn):
            return VLLMScorer(connection, "A", render="raw").session([1, 2]).distributions([], [(3,)])

        want = ask()
        for faults in (["503"], ["drop", "garbage"], ["503", "drop", "503", "503"]):
            stub.faults[:] = faults
            before = len(stub.requests)
            got = ask()
            assert stub.faults == [] and len(stub.requests) - before == 2 + len(faults)  # two nodes asked
            assert all(torch.equal(got[node], want[node]) for node in want)
        stub.faults[:] = ["400"]
        before = len(stub.requests)
        with pytest.raises(ScorerBackendError, match="answered 400 to /v1/completions: injected 400") as info:
            ask()
        assert len(stub.requests) - before <= 2 and "gave up" not in str(info.value)  # not asked again
        stub.faults[:] = ["503"] * 3
        with pytest.raises(ScorerBackendError, match="answered 503.*gave up after 2 failed attempt"):
            ask(VLLMConnection(stub.url, max_retries=1))
        with pytest.raises(ConfigurationError, match="max_retries"):
            VLLMConnection(stub.url, max_retries=-1)
    finally:
        stub.close()


def test_an_unreachable_scorer_url_is_one_configuration_error(server_a, tok_a):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ConfigurationError, match="--scorer-url") as info:
        ProxyTuner(base_url=server_a.base_url, model="tiny", scorer_url=url, expert="E", anti_expert="A")
    assert "\n" not in str(info.value) and url.removesuffix("/v1") in str(info.value)
    from click.testing import CliRunner

    out = CliRunner().invoke(main, ["generate", "--base-url", server_a.base_url, "--model", "tiny", "--expert", "E",
                                    "--anti-expert", "A", "--scorer-url", url, "--prompt", "Hi"])
    assert out.exit_code == 1 and "--scorer-url" in out.output
    assert len(out.output.strip().splitlines()) == 1 and "Traceback" not in out.output
    with pytest.raises(ConfigurationError, match="--expert-adapter"):
        connect(url, expert=None, anti_expert="A", expert_adapter="/some/adapter")


def test_the_gate_lets_one_model_at_a_time_through():
    gate, inside, seen = ModelGate(exclusive=True), {}, []
    lock = threading.Lock()

    def work(model):
        with gate.hold(model):
            with lock:
                inside[model] = inside.get(model, 0) + 1
                seen.append(set(m for m, n in inside.items() if n))
            threading.Event().wait(0.01)
            with lock:
                inside[model] -= 1

    threads = [threading.Thread(target=work, args=("AE"[i % 2],)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(models) == 1 for models in seen) and len(seen) == 12
