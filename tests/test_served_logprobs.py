"""``blackbox-proxy serve`` returns logprobs of the TUNED distribution (issue 17, item 3), over real
loopback HTTP with the project's own ``serve-model`` as the hosted API and the openai SDK as client:

- generated tokens: each token's logprob and top_logprobs are log_softmax over the candidates of
  hosted + alpha·(expert − anti-expert), recomputed here from the library's own trace; with
  k = the whole vocabulary and one tokenizer they equal exact (white-box) proxy tuning's
  distribution restricted to the tokens the API reports (the oracle, computed by local forwards);
- streaming (completions and chat) carries the same tokens and numbers as one answer;
- ``echo`` with ``max_tokens`` 0: the prompt's hosted tokens, the first null, every other the
  teacher-forced tuned logprob: eval's loglik numbers for the same text, the white-box oracle at
  k = all, null (never invented) where the token is outside the hosted top-k; lm-eval's
  ``local-completions`` request (token ids, ``max_tokens`` 1) read the way lm-eval reads it;
- 400s with a reason for what is refused.
"""

from __future__ import annotations

import asyncio
import math

import openai
import pytest
import torch

from blackbox_proxy import AsyncProxyTuner, ProxyTuner, Scorer
from blackbox_proxy.apps.openai_http import ServerThread
from blackbox_proxy.apps.served_logprobs import printed
from blackbox_proxy.apps.tuned_server import create_tuned_app
from blackbox_proxy.evaluation.systems import Settings, TunedSystem
from blackbox_proxy.evaluation.tasks import EvalItem
from blackbox_proxy.decoding.forcing import teacher_force
from blackbox_proxy.hosts.wire import decode_token_text
from blackbox_proxy.tokens.vocab import split_utf8
from blackbox_proxy.whitebox import WhiteBoxTuner

MODEL = "tiny-tuned"
CONTEXT, CONTINUATION = "The quick brown fox", " jumps over the lazy dog."


@pytest.fixture(scope="module")
def kw(server_a, tok_a, scorers_a):
    return dict(base_url=server_a.base_url, model="tiny", expert=scorers_a[0], anti_expert=scorers_a[1],
                hosted_tokenizer=tok_a, max_retries=0)


def serve(tuner, **options):
    return ServerThread(create_tuned_app(tuner, name=MODEL, **options))


@pytest.fixture(scope="module")
def sdk8(kw):
    with serve(AsyncProxyTuner(**kw, top_k=8)) as server:
        with openai.OpenAI(base_url=server.base_url, api_key="-", max_retries=0) as client:
            yield client


@pytest.fixture(scope="module")
def sdk_all(kw, tok_a):
    """k = the whole vocabulary: the tuned distribution is then the exact one over the API's tokens."""
    with serve(AsyncProxyTuner(**kw, top_k=len(tok_a))) as server:
        with openai.OpenAI(base_url=server.base_url, api_key="-", max_retries=0) as client:
            yield client


@pytest.fixture(scope="module")
def vocab(kw):
    return ProxyTuner(**kw).hosted_vocab


@pytest.fixture(scope="module")
def white(tok_a, models_a, scorers_a):
    return WhiteBoxTuner(base=Scorer(models_a[0], tok_a, render="raw", name="L"), expert=scorers_a[0],
                         anti_expert=scorers_a[1])


def white_box(white, vocab, prompt: str, ids: list[int], alpha: float) -> torch.Tensor:
    """Exact proxy tuning's log-distribution at every position of ``ids`` after ``prompt``
    (``[len(ids) + 1, V]``), renormalised over the tokens a hosted API reports: those with bytes,
    and the ends (the server's other special tokens have no bytes to align and are dropped)."""
    scores = white.tuned_scores(*white.teacher_forced(prompt, ids), alpha)
    reported = torch.tensor([b is not None or i in vocab.end_ids for i, b in enumerate(vocab.token_bytes)])
    return torch.log_softmax(scores.masked_fill(~reported, -math.inf), dim=-1)


def token_id(vocab, text: str) -> int:
    special = vocab.id_for_special(text)
    return special if special is not None else vocab.canonical_id(decode_token_text(text))


def tuned_reference(step, alpha: float) -> torch.Tensor:
    """log_softmax over the candidates of hosted + alpha·delta, from the trace's raw parts."""
    return torch.log_softmax(torch.tensor([c.hosted_logprob + alpha * (c.expert_logprob - c.anti_expert_logprob)
                                           for c in step.candidates], dtype=torch.float64), 0)


# ----- generated tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [dict(temperature=0.0), dict(temperature=0.0, alpha=2.0),
                                     dict(temperature=0.9, seed=3)])
def test_generated_logprobs_are_the_tuned_distribution_of_the_trace(sdk8, kw, vocab, options):
    want = ProxyTuner(**kw, top_k=8).generate("The quick brown", max_tokens=8, **options)
    alpha = options.pop("alpha", 1.0)
    extra = {"alpha": alpha}
    resp = sdk8.completions.create(model=MODEL, prompt="The quick brown", max_tokens=8, logprobs=5, extra_body=extra,
                                   **options)
    choice = resp.choices[0]
    assert choice.text == want.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(want.trace) > 0
    for step, token, value, top in zip(want.trace, lp.tokens, lp.token_logprobs, lp.top_logprobs):
        ref = tuned_reference(step, alpha)
        chosen = step.candidates[step.chosen]
        assert token_id(vocab, token) == chosen.token_id
        assert value == pytest.approx(float(ref[step.chosen]), abs=1e-5)
        best = torch.topk(ref, min(5, len(ref))).indices.tolist()
        assert [token_id(vocab, t) for t in top] == [step.candidates[i].token_id for i in best]
        assert list(top.values()) == pytest.approx([float(ref[i]) for i in best], abs=1e-5)
    # text_offset: from the prompt's end, each token where its text begins (a token that begins
    # inside a character: where that character begins)
    pieces = [decode_token_text(t) for t in lp.tokens]
    whole = [split_utf8(b"".join(pieces[:i]))[0] for i in range(len(pieces))]
    assert lp.text_offset == [len("The quick brown") + len(b.decode("utf-8", "replace")) for b in whole]


def test_generated_logprobs_at_k_all_equal_white_box(sdk_all, vocab, white):
    resp = sdk_all.completions.create(model=MODEL, prompt="A café in", max_tokens=6, temperature=0, logprobs=3,
                                      extra_body={"alpha": 1.5})
    lp = resp.choices[0].logprobs
    ids = [token_id(vocab, t) for t in lp.tokens]
    ref = white_box(white, vocab, "A café in", [i for i in ids if i not in vocab.end_ids], 1.5)
    for t, i in enumerate(ids):
        assert lp.token_logprobs[t] == pytest.approx(float(ref[t, i]), abs=1e-4)
        best = torch.topk(ref[t], 3)
        assert [token_id(vocab, k) for k in lp.top_logprobs[t]] == best.indices.tolist()
        assert list(lp.top_logprobs[t].values()) == pytest.approx(best.values.tolist(), abs=1e-4)
        assert ref[t, i] == ref[t].max()  # greedy: the tuned argmax


# ----- speculative: one trace step per token, served like per-step's ---------------------------------------


@pytest.mark.parametrize("how", ["streamed", "whole", "tree", "cross"])
def test_speculative_trace_has_a_step_per_token_equal_to_per_step(kw, scorers_b, how):
    """Greedy speculative keeps exactly per-step greedy's tokens (walk_greedy); its trace now has one
    step per token, with that position's candidates, offsets and tuned distribution: equal to
    per-step's own steps (up to the float noise of scoring positions in one batch), whether the
    chunk was streamed, asked whole, walked as a multi-draft tree, or aligned across tokenizers."""
    options = dict(kw, top_k=8)
    if how == "cross":
        options.update(expert=scorers_b[0], anti_expert=scorers_b[1])
    tuner = ProxyTuner(**options, stream_chunks=how != "whole")
    for prompt in ("The quick brown", "Numbers: 1 2"):
        per = tuner.generate(prompt, max_tokens=10, temperature=0, alpha=1.5, strategy="per-step")
        spec = tuner.generate(prompt, max_tokens=10, temperature=0, alpha=1.5, strategy="speculative",
                              **({"drafts": 3} if how == "tree" else {}))
        assert spec.text == per.text and spec.usage.api_calls < per.usage.api_calls
        if how == "tree":
            assert spec.usage.draft_sequences > spec.usage.api_calls  # calls asked several drafts
        assert len(spec.trace) == len(per.trace) > 0
        for a, b in zip(spec.trace, per.trace):
            assert [c.token_id for c in a.candidates] == [c.token_id for c in b.candidates]
            assert a.chosen == b.chosen and a.dropped == b.dropped
            assert [c.score for c in a.candidates] == pytest.approx([c.score for c in b.candidates], abs=1e-5)
            assert [c.prob for c in a.candidates] == [c.prob for c in b.candidates]  # one-hot at T = 0


def test_sampled_speculative_logprobs_are_the_tuned_distribution_of_the_trace(sdk8, kw, vocab):
    """Sampling: the served tokens are the library's for the same seed, each with its position's
    tuned log-probability (the accepted draft's, or the residual draw's) and top entries."""
    want = ProxyTuner(**kw, top_k=8).generate("A café in", max_tokens=12, temperature=1.0, seed=5,
                                              strategy="speculative")
    assert len(want.chunks) > 0 and len(want.trace) > 0
    # the trace is the text, token by token: each step's choice is its chunk's accepted draft, or
    # the residual draw where the chunk was rejected (and a rejection happened here)
    assert "".join(step.chosen_text for step in want.trace) == want.text
    assert any(chunk.rejected_at is not None for chunk in want.chunks)
    expected = []
    for chunk in want.chunks:
        expected += list(chunk.drawn[:chunk.accepted])
        if chunk.rejected_at is not None and chunk.replacement is not None:
            expected.append(chunk.replacement)
    assert [step.chosen_text for step in want.trace] == expected[:len(want.trace)]
    resp = sdk8.completions.create(model=MODEL, prompt="A café in", max_tokens=12, temperature=1.0, seed=5,
                                   logprobs=3, extra_body={"strategy": "speculative"})
    choice = resp.choices[0]
    assert choice.text == want.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(want.trace)
    for step, token, value, top in zip(want.trace, lp.tokens, lp.token_logprobs, lp.top_logprobs):
        ref = tuned_reference(step, 1.0)
        assert token_id(vocab, token) == step.candidates[step.chosen].token_id
        assert value == pytest.approx(float(ref[step.chosen]), abs=1e-5)
        best = torch.topk(ref, min(3, len(ref))).indices.tolist()
        assert [token_id(vocab, t) for t in top] == [step.candidates[i].token_id for i in best]
    # streamed: the same tokens and numbers
    text, tokens, values, _, _ = _streamed_completion(sdk8.completions.create(
        model=MODEL, prompt="A café in", max_tokens=12, temperature=1.0, seed=5, logprobs=3, stream=True,
        extra_body={"strategy": "speculative"}))
    assert text == choice.text and tokens == lp.tokens
    assert values == pytest.approx(lp.token_logprobs, abs=1e-5)


def _streamed_completion(stream):
    text, tokens, values, tops, offsets = "", [], [], [], []
    for event in stream:
        choice = event.choices[0]
        text += choice.text
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens
            values += choice.logprobs.token_logprobs
            tops += choice.logprobs.top_logprobs
            offsets += choice.logprobs.text_offset
    return text, tokens, values, tops, offsets


def test_streamed_logprobs_are_the_answers_own(sdk8):
    asks = dict(model=MODEL, prompt="Numbers: 1 2", max_tokens=12, temperature=0, logprobs=3)
    full = sdk8.completions.create(**asks).choices[0]
    stop = full.text[4:6]
    for options in ({}, {"stop": [stop]}):  # with a stop, tokens cut off with it are left out
        one = sdk8.completions.create(**asks, **options).choices[0]
        text, tokens, values, tops, offsets = _streamed_completion(
            sdk8.completions.create(**asks, **options, stream=True))
        assert text == one.text and tokens == one.logprobs.tokens and offsets == one.logprobs.text_offset
        assert values == pytest.approx(one.logprobs.token_logprobs, abs=1e-5)
        assert [list(t) for t in tops] == [list(t) for t in one.logprobs.top_logprobs]
        shown = b"".join(decode_token_text(t) for t in tokens).decode("utf-8", "replace")
        assert shown.startswith(text) and (options or shown == text)
        if options:
            assert stop not in text and len(tokens) < len(full.logprobs.tokens)


def test_chat_logprobs_streaming_and_not(kw, vocab):
    messages = [{"role": "user", "content": "Tell me about a café"}]
    want = ProxyTuner(**kw, top_k=8).generate(messages=messages, max_tokens=6, temperature=0.0)
    with serve(AsyncProxyTuner(**kw, top_k=8)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="-", max_retries=0)
        resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3)
        content = resp.choices[0].logprobs.content
        assert resp.choices[0].message.content == want.text and len(content) == len(want.trace)
        for step, entry in zip(want.trace, content):
            ref = tuned_reference(step, 1.0)
            assert entry.logprob == pytest.approx(float(ref[step.chosen]), abs=1e-5)
            assert entry.bytes == list(vocab.token_bytes[step.candidates[step.chosen].token_id] or b"")
            best = torch.topk(ref, 3).indices.tolist()
            assert [token_id(vocab, t.token) for t in entry.top_logprobs] == [step.candidates[i].token_id for i in best]
        stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                logprobs=True, top_logprobs=3, stream=True)
        streamed = [e for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                    for e in chunk.choices[0].logprobs.content]
        assert [e.token for e in streamed] == [e.token for e in content]
        assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
        plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
        assert plain.choices[0].logprobs is None


# ----- echo: the prompt's teacher-forced logprobs ---------------------------------------------------------


def _eval_loglik(kw, top_k: int, alpha: float) -> dict:
    async def run():
        async with AsyncProxyTuner(**kw, top_k=top_k) as tuner:
            system = TunedSystem("per-step", tuner, Settings(alpha=alpha), strategy="per-step", alpha=alpha)
            item = EvalItem(id=1, prompt=CONTEXT, messages=(("user", CONTEXT),), reference=CONTINUATION)
            return await system.loglik(item)

    return asyncio.run(run())


def test_echo_with_max_tokens_0_is_eval_loglik_and_white_box(sdk_all, kw, vocab, white, tok_a):
    ids = vocab.encode_bytes((CONTEXT + CONTINUATION).encode())
    ctx = len(vocab.encode_bytes(CONTEXT.encode()))
    assert ids[:ctx] == vocab.encode_bytes(CONTEXT.encode())  # the context's tokens end where it ends
    resp = sdk_all.completions.create(model=MODEL, prompt=CONTEXT + CONTINUATION, max_tokens=0, echo=True,
                                      logprobs=2, extra_body={"alpha": 1.5})
    choice, lp = resp.choices[0], resp.choices[0].logprobs
    assert choice.text == CONTEXT + CONTINUATION and choice.finish_reason == "length"
    assert lp.tokens == [printed(vocab.token_bytes[i]) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [len(vocab.bytes_of(ids[:i]).decode()) for i in range(len(ids))]
    assert resp.usage.completion_tokens == 0 and resp.model_extra["proxy_usage"]["api_calls"] == len(ids) - 1
    # the oracle: exact proxy tuning, every token after the first
    ref = white_box(white, vocab, vocab.bytes_of(ids[:1]).decode(), ids[1:], 1.5)
    for t, i in enumerate(ids[1:]):
        assert lp.token_logprobs[t + 1] == pytest.approx(float(ref[t, i]), abs=1e-4)
        assert list(lp.top_logprobs[t + 1].values()) == pytest.approx(torch.topk(ref[t], 2).values.tolist(), abs=1e-4)
    # eval's loglik of the continuation after the context: the same numbers
    record = _eval_loglik(kw, len(tok_a), 1.5)
    assert record["covered"] == record["tokens"] == len(ids) - ctx
    assert sum(lp.token_logprobs[ctx:]) == pytest.approx(record["loglik"], abs=1e-5)


def test_echo_leaves_tokens_outside_the_top_k_null(sdk8, kw, vocab):
    # the hosted model's own greedy continuation is in its top-k; the human text mostly is not
    own = ProxyTuner(**kw, top_k=8).generate(CONTEXT, max_tokens=6, temperature=0.0, alpha=0.0).text
    prompt = CONTEXT + own
    lp = sdk8.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=8).choices[0].logprobs
    ids = vocab.encode_bytes(prompt.encode())
    forced = teacher_force(ProxyTuner(**kw, top_k=8), ids[1:], prompt=vocab.bytes_of(ids[:1]).decode())
    assert [v is None for v in lp.token_logprobs[1:]] == [v is None for v in forced.logprobs]
    assert any(v is None for v in forced.logprobs) and any(v is not None for v in forced.logprobs)
    for served, library in zip(lp.token_logprobs[1:], forced.logprobs):
        assert served == pytest.approx(library, abs=1e-5)
    assert all(len(top) == 8 for top in lp.top_logprobs[1:])  # a miss still shows the candidates


def test_lm_eval_local_completions_request(sdk_all, kw, vocab, tok_a):
    """What lm-eval's local-completions sends for a loglikelihood request (token ids, echo,
    max_tokens 1, logprobs 1), read as lm-eval reads it (token_logprobs[ctxlen:-1])."""
    ids = vocab.encode_bytes((CONTEXT + CONTINUATION).encode())
    ctx = len(vocab.encode_bytes(CONTEXT.encode()))
    resp = sdk_all.completions.create(model=MODEL, prompt=[ids], max_tokens=1, logprobs=1, echo=True, temperature=0,
                                      seed=1234, extra_body={"alpha": 1.5})
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and resp.usage.completion_tokens == 1
    loglik = sum(lp.token_logprobs[ctx:-1])
    greedy = all(tok == max(top.values()) for tok, top in zip(lp.token_logprobs[ctx:-1], lp.top_logprobs[ctx:-1]))
    record = _eval_loglik(kw, len(tok_a), 1.5)
    assert loglik == pytest.approx(record["loglik"], abs=1e-5) and greedy is False  # random models
    # the generated token: what the tuned model generates after the whole prompt
    want = ProxyTuner(**kw, top_k=len(tok_a)).generate(CONTEXT + CONTINUATION, max_tokens=1, alpha=1.5)
    assert resp.choices[0].text == CONTEXT + CONTINUATION + want.text
    step = want.trace[0]
    assert lp.token_logprobs[-1] == pytest.approx(float(tuned_reference(step, 1.5)[step.chosen]), abs=1e-5)


def test_echo_without_logprobs_and_batches(sdk8):
    resp = sdk8.completions.create(model=MODEL, prompt=["Hi there", "A café"], max_tokens=0, echo=True)
    assert [c.text for c in resp.choices] == ["Hi there", "A café"] and resp.choices[0].logprobs is None
    assert resp.model_extra["proxy_usage"]["api_calls"] == 0
    both = sdk8.completions.create(model=MODEL, prompt=["Hi there", "A café"], max_tokens=0, echo=True, logprobs=1)
    alone = sdk8.completions.create(model=MODEL, prompt="A café", max_tokens=0, echo=True, logprobs=1)
    assert both.choices[1].logprobs.tokens == alone.choices[0].logprobs.tokens
    assert [c.index for c in both.choices] == [0, 1]


# ----- what is refused, and why -----------------------------------------------------------------------------


def test_refusals_say_why(sdk8, kw, tok_a, models_a):
    def refused(match, client=sdk8, chat=False, **body):
        with pytest.raises(openai.BadRequestError, match=match):
            if chat:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], **body)
            else:
                client.completions.create(model=MODEL, prompt="The quick brown", **body)

    refused("returned with strategy per-step or speculative", max_tokens=2, logprobs=2, temperature=1,
            extra_body={"strategy": "resample"})
    refused("returned with strategy per-step or speculative", chat=True, max_tokens=2, logprobs=True, temperature=1,
            extra_body={"strategy": "resample"})
    refused("returned with strategy per-step or speculative", max_tokens=0, echo=True, logprobs=1, temperature=1,
            extra_body={"strategy": "resample"})
    refused("stream=true with echo", max_tokens=0, echo=True, stream=True)
    refused("n > 1 with echo", max_tokens=0, echo=True, logprobs=1, n=2)
    refused("stop with echo", max_tokens=2, echo=True, logprobs=1, stop=["x"])
    refused("0 only with echo", max_tokens=0)
    refused("echo is not supported", chat=True, max_tokens=2, extra_body={"echo": True})
    blind = AsyncProxyTuner(**dict(kw, hosted_tokenizer="none"), top_k=8)
    chat_scorers = [Scorer(m, tok_a, render="chat") for m in models_a[1:]]
    chatty = [AsyncProxyTuner(**dict(kw, expert=chat_scorers[0], anti_expert=chat_scorers[1]), top_k=8, mode=mode)
              for mode in ("chat-prefix", "chat")]
    for tuner, match in [(blind, "--hosted-tokenizer"), (chatty[0], "needs a completions host"),
                         (chatty[1], "needs a completions host")]:
        with serve(tuner) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="-", max_retries=0)
            refused(match, client, max_tokens=0, echo=True, logprobs=1)
            if tuner is blind:  # without echo, logprobs need no hosted tokenizer
                lp = client.completions.create(model=MODEL, prompt="The quick", max_tokens=2, temperature=0,
                                               logprobs=1).choices[0].logprobs
                assert len(lp.tokens) == 2 and all(v is not None for v in lp.token_logprobs)
