"""The embedded default with real models from PyPI, offline: SmolLM2-135M-Instruct (expert with
the shipped LoRA adapter, anti-expert without) and Gemma-3-270M base (hosted, over HTTP).

These take a few minutes the first time (conversion to the cache); CI runs them.
"""

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from blackbox_proxy import ProxyTuner, Scorer
from blackbox_proxy.harness.embedded import adapter_path, is_valid, prepare
from blackbox_proxy.evaluation.arithmetic import STOP, problems, score

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_dir():
    return prepare("smollm2", progress=False)


@pytest.fixture(scope="module")
def gemma_dir():
    return prepare("gemma3", progress=False)


@pytest.fixture(scope="module")
def pair(smollm2_dir):
    return Scorer.pair_from_adapter(str(smollm2_dir), str(adapter_path()))


@pytest.fixture(scope="module")
def gemma_server(gemma_dir):
    from blackbox_proxy.apps.model_server import create_app
    from blackbox_proxy.apps.openai_http import ServerThread
    from blackbox_proxy.local.runner import ModelRunner

    runner = ModelRunner.from_pretrained(str(gemma_dir), name="gemma-3-270m")
    with ServerThread(create_app(runner)) as server:
        yield server, runner


def test_smollm2_tokenizer_splits_digits(pair):
    expert, anti = pair
    tok = anti.tokenizer
    assert tok.tokenize("Call 12345 at 3.14") == ["Call", "Ġ", "1", "2", "3", "4", "5", "Ġat", "Ġ", "3", ".", "1", "4"]
    for text in ["Mia has 33 cards and buys 20 more.", "café 12€ naïve 日本 🙂", "x = 2024 * 7"]:
        assert anti.vocab.bytes_of(anti.vocab.encode_text(text)) == text.encode()
    assert anti.vocab.size == 49152 and anti.render == "chat"
    assert {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")} <= anti.vocab.end_ids
    assert expert.model is anti.model  # one model in memory


def test_gemma_vocabulary(gemma_server):
    _, runner = gemma_server
    vocab = runner.vocab
    assert vocab.size == 262144
    assert vocab.prompt_prefix_ids == (2,)  # <bos>
    assert {1, 106} <= vocab.end_ids  # <eos>, <end_of_turn>
    text = "The café costs 12€"
    assert vocab.bytes_of(vocab.encode_text(text)) == text.encode()


def test_adapter_pair_matches_separate_copies(smollm2_dir, pair):
    """The toggled pair's offsets equal those of two independent models (merged copy vs base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    expert, anti = pair
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32), str(adapter_path())
    ).merge_and_unload()
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    separate = (Scorer(merged, anti.tokenizer, vocabulary=anti.vocab), Scorer(base, anti.tokenizer, vocabulary=anti.vocab))
    messages = problems("test", 1)[0].messages()
    continuation = [int(i) for i in anti.vocab.encode_text("33 + 20 =")]
    deltas = []
    for e, a in (pair, separate):
        de = e.session(e.prompt_ids(messages=messages)).distributions(continuation)[()]
        da = a.session(a.prompt_ids(messages=messages)).distributions(continuation)[()]
        deltas.append(de - da)
    top = torch.topk(deltas[1].abs(), 50).indices
    assert torch.allclose(deltas[0][top], deltas[1][top], atol=2e-3)
    assert float(deltas[0].abs().max()) > 0.5  # the adapter matters


def test_proxy_tuned_generation_over_http(gemma_server, gemma_dir, pair):
    """Black-box per-step across tokenizers on real models: the expert's arithmetic reaches the
    hosted base model (which copies the one-shot format but gets the sums wrong alone)."""
    server, _ = gemma_server
    expert, anti = pair
    tuner = ProxyTuner(base_url=server.base_url, model="gemma-3-270m", expert=expert, anti_expert=anti,
                       hosted_tokenizer=str(gemma_dir), top_k=20, max_retries=0)
    tuned_right = hosted_right = 0
    for problem in problems("test", 3)[1:]:
        result = tuner.generate(problem.hosted_prompt(), max_tokens=30, stop=STOP, strategy="per-step")
        assert "hosted vocabulary" in result.settings["alignment"] and result.settings["token_prompts"]
        assert result.usage.api_calls == len(result.trace)
        alone = tuner.client._client.completions.create(model="gemma-3-270m", prompt=problem.hosted_prompt(),
                                                        max_tokens=30, temperature=0, stop=STOP).choices[0].text
        assert score(alone, problem)["formatted"] and score(result.text, problem)["formatted"]
        tuned_right += score(result.text, problem)["strict"]
        hosted_right += score(alone, problem)["strict"]
    assert tuned_right > hosted_right


def test_cache_detects_corruption_and_rebuilds(smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BLACKBOX_PROXY_CACHE", str(tmp_path))
    target = tmp_path / "models" / smollm2_dir.name
    shutil.copytree(smollm2_dir, target)
    assert is_valid(target, verify_hashes=True)
    weights = target / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    assert not is_valid(target)
    assert prepare("smollm2", progress=False) == target
    assert is_valid(target, verify_hashes=True)


def test_demo_command_end_to_end():
    """README command #1's last step: the demo runs and stops the server it started."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "blackbox_proxy", "demo", "--prompts", "1", "--max-tokens", "16",
                           "--port", str(port)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hosted alone" in proc.stdout and "proxy-tuned" in proc.stdout and "API calls" in proc.stdout
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))  # nobody listens any more: the server was stopped


PLAIN_PROMPTS = [
    "What is 38 + 45?", "Write a haiku about rain", "Explain what a hash map is.", "def fibonacci(n):",
    "The capital of France is", "Translate 'good morning' into French.", "List three primary colors",
    "Once upon a time", "Why is the sky blue?", "import numpy as np\n", "Give me a name for a cat",
]


def _readable(text: str, specials: set[str]) -> bool:
    return all(ch.isprintable() or ch in "\n\t\r" for ch in text) and not any(s in text for s in specials)


def test_plain_prompts_give_text_not_hosted_special_tokens(pair, gemma_server, gemma_dir):
    """Plain prompts on the embedded default (raw hosted prompt, chat-rendered pair, completions
    mode): the hosted special tokens the small models cannot say (``<start_of_image>`` answered
    "What is 38 + 45?" sixteen times before) never win, at alpha 1 and 2, from the library and
    through `serve` with the openai SDK."""
    import openai
    from transformers import AutoTokenizer

    from blackbox_proxy import AsyncProxyTuner
    from blackbox_proxy.apps.openai_http import ServerThread
    from blackbox_proxy.apps.tuned_server import create_tuned_app

    server, _ = gemma_server
    hosted_tok = AutoTokenizer.from_pretrained(str(gemma_dir))
    # control tokens: those marked special, and the image markers (not marked, no text either;
    # Gemma's other added tokens such as "<strong>" are ordinary text)
    specials = {t.content for t in hosted_tok.added_tokens_decoder.values() if t.special and len(t.content) > 2}
    specials |= {"<start_of_image>", "<end_of_image>"}
    expert, anti = pair
    kw = dict(base_url=server.base_url, model="gemma-3-270m", expert=expert, anti_expert=anti,
              hosted_tokenizer=str(gemma_dir), max_retries=0)
    tuner = ProxyTuner(**kw)
    for alpha in (1.0, 2.0):
        for prompt in PLAIN_PROMPTS:
            text = tuner.generate(prompt, max_tokens=6, alpha=alpha).text
            assert text.strip() and _readable(text, specials), (prompt, alpha, text)
    with ServerThread(create_tuned_app(AsyncProxyTuner(**kw), name="tuned")) as served:
        client = openai.OpenAI(base_url=served.base_url, api_key="-", max_retries=0)
        for alpha, prompt in zip((1.0, 2.0) * 6, PLAIN_PROMPTS):
            text = client.completions.create(model="tuned", prompt=prompt, max_tokens=6, temperature=0,
                                             extra_body={"alpha": alpha}).choices[0].text
            assert text.strip() and _readable(text, specials), (prompt, alpha, text)


def _readme_block(containing: str) -> str:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    return next(b for b in re.findall(r"^```text\n(.*?)^```", readme, re.S | re.M) if containing in b)


def test_the_readmes_generate_run_holds(gemma_server, gemma_dir, smollm2_dir):
    """The README's `generate` run, as printed there, against the embedded default: the command
    (its server address and the cache's paths put in) gives the text the README shows."""
    import codecs
    import re
    import shlex

    server, _ = gemma_server
    block = _readme_block("$ blackbox-proxy generate")
    prompt = codecs.decode(re.search(r"^\$ PROMPT=\$'(.*)'$", block, re.M).group(1), "unicode_escape")
    command = re.search(r"^\$ (blackbox-proxy generate .*?)\n(?!\s)", block, re.S | re.M).group(1)
    command = re.sub(r"\\\n\s*", " ", command).replace("$'\\n\\n'", "'\n\n'").replace('"$PROMPT"', "PROMPT")
    command = command.replace("http://127.0.0.1:8011/v1", server.base_url)
    command = command.replace("~/.cache/blackbox_proxy/models/smollm2-135m-instruct", str(smollm2_dir))
    args = ["\n\n" if a == "\n\n" else prompt if a == "PROMPT" else a for a in shlex.split(command)[1:]]
    args = [str(adapter_path()) if a == "blackbox_proxy/data/smollm2-arith-lora" else a for a in args]
    shown = block.split(command.split()[0], 1)[1]
    want = re.search(r"--stop \$'\\n\\n'\n(.*?)\n\[", shown, re.S).group(1)
    proc = subprocess.run([sys.executable, "-m", "blackbox_proxy", *args], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == want.strip() == "59 + 87 = 146\n#### 146"


def test_the_readmes_serve_client_holds(gemma_server, gemma_dir, pair):
    """The README's client.py against `serve` on the embedded default prints what the README shows."""
    import asyncio
    import contextlib
    import io
    import re

    from blackbox_proxy import AsyncProxyTuner
    from blackbox_proxy.apps.openai_http import ServerThread
    from blackbox_proxy.apps.tuned_server import create_tuned_app

    server, _ = gemma_server
    block = _readme_block("$ cat client.py")
    code = block.split("$ cat client.py\n", 1)[1].split("$ python client.py\n", 1)
    client_py, shown = code[0], code[1]
    expert, anti = pair
    tuner = AsyncProxyTuner(base_url=server.base_url, model="gemma-3-270m", expert=expert, anti_expert=anti,
                            hosted_tokenizer=str(gemma_dir))
    with ServerThread(create_tuned_app(tuner, name="gemma-3-270m-proxy-tuned")) as tuned:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(client_py.replace("http://127.0.0.1:8080/v1", tuned.base_url), "client.py", "exec"), {})
        asyncio.run(tuner.close())
    got = re.sub(r"\d+ API calls", "N API calls", out.getvalue().strip())
    assert got == re.sub(r"\d+ API calls", "N API calls", shown.strip())
