"""The core equivalence: black-box per-step with k = the whole vocabulary equals white-box
proxy tuning token for token, over real HTTP to the project's own server (DESIGN.md §2.2.4).

And with k = 5: how often the top-5 renormalised choice agrees with the white-box argmax on
teacher-forced text, with a bound that a broken offset does not reach.
"""

import itertools

import pytest
import torch

from blackbox_proxy import HostedClient, HostedRequest, ProxyTuner
from blackbox_proxy.tokens.aligner import Aligner

PROMPTS = ["The quick brown", "A café in Zürich sells", "Question: what is 12 + 30? Answer:", "def add(a, b):"]


IM_START = 1  # a special token that is not an end: it has no text, so no API can offer it


def white_box_greedy(models, prompt_ids, alpha, n):
    """Slow reference: full forwards, logits_L + alpha * (logits_E - logits_A), argmax over
    every token that has text or ends it (i.e. all but <|im_start|>)."""
    large, expert, anti = models
    ids = list(prompt_ids)
    out = []
    for _ in range(n):
        x = torch.tensor([ids])
        with torch.no_grad():
            lp_l, lp_e, lp_a = (torch.log_softmax(m(x).logits[0, -1].double(), -1) for m in (large, expert, anti))
            scores = lp_l + alpha * (lp_e - lp_a)
            scores[IM_START] = -torch.inf
            token = int(torch.argmax(scores))
        out.append(token)
        if token == 0:  # <|endoftext|>
            break
        ids.append(token)
    return out


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_black_box_with_full_vocabulary_equals_white_box(server_a, tok_a, models_a, scorers_a, alpha):
    tuner = ProxyTuner(
        base_url=server_a.base_url, model="tiny", mode="completions",
        expert=scorers_a[0], anti_expert=scorers_a[1],
        top_k=len(tok_a), hosted_tokenizer=tok_a, max_retries=0,
    )
    assert tuner.same_vocab
    for prompt, strategy in itertools.product(PROMPTS, ("per-step", "auto")):
        result = tuner.generate(prompt, max_tokens=12, alpha=alpha, strategy=strategy)
        assert result.settings["token_prompts"] is True
        expected = white_box_greedy(models_a, tok_a.encode(prompt), alpha, 12)
        got_bytes = result.text.encode("utf-8", "surrogatepass")
        want_text = tok_a.decode([t for t in expected if t != 0])
        assert result.text == want_text, (prompt, strategy, result.text, want_text)
        assert len(result.trace) == len(expected)
        if strategy == "per-step":
            assert result.usage.api_calls == len(expected)
        else:  # the default: greedy speculative, the same tokens in at most as many calls (each call
            # gives at least one token: the accepted drafts, then the tuned choice at the first rejection)
            assert result.settings["strategy"] == "speculative" and result.usage.api_calls <= len(expected)
        usable = len(tok_a) - 1  # k = V: every token but <|im_start|> (special, not an end)
        for step, token in zip(result.trace, expected):
            assert len(step.candidates) == usable
            assert step.candidates[step.chosen].token_id == token
        assert got_bytes == tok_a.decode([t for t in expected if t != 0]).encode()


def test_top5_agreement_on_teacher_forced_text(server_a, tok_a, models_a, scorers_a):
    """Per-step over the API's top-5 vs the white-box argmax, position by position."""
    client = HostedClient(base_url=server_a.base_url, model="tiny", hosted_vocab=scorers_a[0].vocab, max_retries=0)
    aligner = Aligner(scorers_a[0].vocab)
    agree = flipped = shifted = total = 0
    for prompt in PROMPTS:
        prompt_ids = tok_a.encode(prompt)
        forced = white_box_greedy(models_a, prompt_ids, 1.0, 12)
        sess_e = scorers_a[0].session(prompt_ids)
        sess_a = scorers_a[1].session(prompt_ids)
        for t, target in enumerate(forced):
            prefix = forced[:t]
            result = client.complete(HostedRequest(mode="completions", prompt=tuple(prompt_ids + prefix), max_tokens=1, top_k=5))[0]
            cands = result.positions[0].candidates
            ids = [c.token_id if c.token_id is not None else 0 for c in cands]
            de = sess_e.distributions(prefix)[()]
            da = sess_a.distributions(prefix)[()]
            hosted = torch.tensor([c.logprob for c in cands], dtype=torch.float64)
            delta = (de[ids] - da[ids]).double()
            agree += ids[int(torch.argmax(hosted + delta))] == target
            flipped += ids[int(torch.argmax(hosted - delta))] == target  # wrong sign
            shifted += ids[int(torch.argmax(hosted + delta.roll(1)))] == target  # offsets misaligned
            total += 1
    rate = agree / total
    print(f"top-5 agreement with white-box argmax: {agree}/{total} = {rate:.2f}; "
          f"sign-flipped offset {flipped / total:.2f}; misaligned offset {shifted / total:.2f}")
    assert total >= 40
    assert rate >= 0.7
    assert flipped / total < 0.5 and shifted / total < 0.7
    del aligner
