"""End-to-end generation over loopback HTTP in every mode, sync and async, same and cross
tokenizer, greedy and seeded sampling."""

import asyncio

import pytest
import torch

from blackbox_proxy import AsyncProxyTuner, ProxyTuner, Scorer

from test_aligner import reference_logprob


def make(server, scorers, **kw):
    args = dict(base_url=server.base_url, model="tiny", expert=scorers[0], anti_expert=scorers[1], max_retries=0)
    args.update(kw)
    return ProxyTuner(**args)


@pytest.fixture(scope="module")
def chat_scorers(tok_a, models_a):
    return (Scorer(models_a[1], tok_a, render="chat", name="Ec"), Scorer(models_a[2], tok_a, render="chat", name="Ac"))


def test_chat_prefix_equals_completions_on_the_rendered_prompt(server_a, tok_a, chat_scorers):
    """chat-prefix continues an assistant message; it must see what completions mode sees when
    that mode is given the same rendered text (both re-tokenise text on the server)."""
    k = len(tok_a)
    chat = make(server_a, chat_scorers, mode="chat-prefix", top_k=k, hosted_tokenizer=tok_a)
    result = chat.generate(messages=[{"role": "user", "content": "Tell me about a café"}], max_tokens=8)
    assert chat.client.dialect == "vllm"  # detected from /v1/models
    rendered = "<|im_start|>user\nTell me about a café<|im_end|>\n<|im_start|>assistant\n"
    comp = make(server_a, chat_scorers, mode="completions", top_k=k, hosted_tokenizer=tok_a, token_prompts=False)
    # the small models render chat either way; only the hosted request differs
    reference = comp.generate(rendered, max_tokens=8)
    assert result.text == reference.text
    assert len(result.trace) == len(reference.trace) > 0


def test_chat_mode_tunes_the_first_token(server_a, tok_a, models_a, chat_scorers):
    k = len(tok_a)
    t = make(server_a, chat_scorers, mode="chat", top_k=k, hosted_tokenizer=tok_a)
    result = t.generate("Say one word", max_tokens=1, alpha=1.0)
    assert result.usage.api_calls == 1 and len(result.trace) == 1
    ids = tok_a.encode("<|im_start|>user\nSay one word<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        lp = [torch.log_softmax(m(torch.tensor([ids])).logits[0, -1].double(), -1) for m in models_a]
    scores = lp[0] + lp[1] - lp[2]
    scores[1] = -torch.inf  # <|im_start|> has no text
    want = int(torch.argmax(scores))
    assert result.trace[0].candidates[result.trace[0].chosen].token_id == want


def test_async_equals_sync(server_a, tok_a, scorers_a):
    kw = dict(top_k=8, hosted_tokenizer=tok_a)
    sync = make(server_a, scorers_a, **kw).generate("The quick brown", max_tokens=6, temperature=0.9, seed=3)

    async def run():
        async with AsyncProxyTuner(base_url=server_a.base_url, model="tiny", expert=scorers_a[0],
                                   anti_expert=scorers_a[1], max_retries=0, **kw) as tuner:
            return await asyncio.gather(*[tuner.generate("The quick brown", max_tokens=6, temperature=0.9, seed=3)
                                          for _ in range(3)])

    results = asyncio.run(run())
    assert all(r.text == sync.text for r in results)


def test_seeded_sampling_is_repeatable_and_varies(server_a, tok_a, scorers_a):
    t = make(server_a, scorers_a, top_k=10, hosted_tokenizer=tok_a)
    a = t.generate("A café in", max_tokens=6, temperature=1.0, seed=11)
    assert t.generate("A café in", max_tokens=6, temperature=1.0, seed=11).text == a.text
    texts = {t.generate("A café in", max_tokens=6, temperature=1.0, seed=s).text for s in range(5)}
    assert len(texts) > 1
    # top-p = tiny keeps only the most likely tuned candidate: sampling becomes greedy over the candidates
    nucleus = t.generate("A café in", max_tokens=6, temperature=1.0, top_p=1e-9, seed=5)
    assert nucleus.trace and all(
        step.chosen == max(range(len(step.candidates)), key=lambda i: (step.candidates[i].score, -i))
        for step in nucleus.trace)


def test_stop_strings_and_max_tokens(server_a, tok_a, scorers_a):
    t = make(server_a, scorers_a, top_k=len(tok_a), hosted_tokenizer=tok_a)
    full = t.generate("Numbers: 1 2", max_tokens=10)
    assert full.finish_reason == "length" and full.usage.generated_tokens == 10
    stop = full.text[2:4]
    cut = t.generate("Numbers: 1 2", max_tokens=10, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


def test_cross_tokenizer_generation_matches_reference_offsets(server_a, tok_a, tok_b, scorers_b):
    """Hosted tok_a, small tok_b: every step's offsets equal the brute-force aligner reference."""
    t = make(server_a, scorers_b, top_k=6, hosted_tokenizer=tok_a)
    prompt = "A café costs 12€ and"
    result = t.generate(prompt, max_tokens=5)
    assert "hosted vocabulary" in result.settings["alignment"]
    expert = scorers_b[0]
    prompt_ids = expert.prompt_ids(prompt=prompt)
    continuation = b""
    hosted = t.hosted_vocab
    from blackbox_proxy import Candidate

    for step in result.trace[:3]:
        for c in step.candidates[:4]:
            data = b"" if c.is_end else hosted.token_bytes[c.token_id]
            cand = Candidate(c.text, data, c.hosted_logprob, c.token_id, c.is_end)
            want = reference_logprob(expert.model, tok_b, expert.vocab, prompt_ids, continuation, cand,
                                     hosted.token_bytes, 1)
            assert c.expert_logprob == pytest.approx(want, abs=2e-3)
        chosen = step.candidates[step.chosen]
        continuation += b"" if chosen.is_end else hosted.token_bytes[chosen.token_id]


def test_text_prompts_without_hosted_vocabulary(server_a, scorers_b):
    """No hosted vocabulary: text prompts, prefix-cover alignment, never half a character."""
    t = make(server_a, scorers_b, top_k=10)
    for strategy in ("per-step", "auto"):
        result = t.generate("A café in Zürich", max_tokens=8, strategy=strategy)
        assert result.settings["token_prompts"] is False
        assert "unknown" in result.settings["alignment"]
        assert "\ufffd" not in result.text
        if strategy == "per-step":
            assert result.usage.api_calls == len(result.trace)
