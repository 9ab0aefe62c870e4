"""The per-step decoder without I/O: hand-made API answers in, choices and requests out."""

import math

import pytest

from decoders import build
from blackbox_proxy import Candidate, HostedPosition, HostedResult

from blackbox_proxy.decoding.per_step import PerStepDecoder
from blackbox_proxy.types import HostedUsage


def decoder(scorers, *, token_prompts=True, top_k=20, end_ids=(), **params):
    expert, anti = scorers
    ids = expert.prompt_ids(prompt="Hi")
    return build(PerStepDecoder, expert.session(ids), anti.session(ids), expert.vocab, prompt="Hi",
                 prompt_ids=ids if token_prompts else None, top_k=top_k, end_ids=end_ids, **params)


def position(*cands):
    return HostedPosition(candidates=tuple(cands), sampled=cands[0])


def test_hidden_end_of_text_is_asked_again_with_logit_bias(scorers_a):
    vocab = scorers_a[0].vocab
    the = vocab.ids_for_bytes(b" the")[0]
    dec = decoder(scorers_a, max_tokens=3, top_k=3, end_ids=(0, 2))
    assert dec.request().logit_bias == ()
    dec.observe([HostedResult("", (), "stop", HostedUsage(5, 0))], 0.01)  # OpenAI: ended, no logprobs
    assert not dec.done
    assert dec.request().logit_bias == ((0, -100.0), (2, -100.0))
    pos = position(Candidate("<|endoftext|>", b"", -0.1, 0, True), Candidate(" the", b" the", -2.5, the))
    step = dec.observe([HostedResult(" the", (pos,), "length", HostedUsage(5, 1))], 0.01)
    assert "banned" in step.notes[0]
    assert dec.usage.api_calls == 2 and dec.request().logit_bias == ()
    # without a hosted vocabulary (no end ids) an empty answer simply ends the text
    plain = decoder(scorers_a, max_tokens=3, top_k=3)
    plain.observe([HostedResult("", (), "stop", HostedUsage(5, 0))], 0.01)
    assert plain.done and plain.result().finish_reason == "stop"


def test_greedy_choice_and_end(scorers_a):
    vocab = scorers_a[0].vocab
    the = vocab.ids_for_bytes(b" the")[0]
    dec = decoder(scorers_a, max_tokens=5, top_k=2, alpha=0.0)  # alpha 0: the hosted argmax
    dec.observe([HostedResult("", (position(Candidate(" the", b" the", -0.2, the),
                                            Candidate("<|endoftext|>", b"", -1.9, 0, True)),), "length", HostedUsage())], 0.0)
    assert dec.prefix.data == b" the" and dec.prefix.ids == (the,)
    dec.observe([HostedResult("", (position(Candidate("<|endoftext|>", b"", -0.1, 0, True),
                                            Candidate(" the", b" the", -3.0, the)),), "stop", HostedUsage())], 0.0)
    assert dec.done and dec.result().finish_reason == "stop" and dec.result().text == " the"


def test_text_prompt_cannot_continue_half_a_character(scorers_a):
    dec = decoder(scorers_a, token_prompts=False, max_tokens=3, top_k=2)
    partial = position(Candidate("bytes:\\xe2", b"\xe2", -0.1), Candidate("bytes:\\xf0", b"\xf0", -0.5))
    dec.observe([HostedResult("", (partial,), "length", HostedUsage())], 0.0)
    assert dec.prefix.data == b"" and dec.request().max_tokens == 4  # the host's own character next (test_speculative)
    dec = decoder(scorers_a, token_prompts=False, max_tokens=3, top_k=2, alpha=0.0)
    mixed = position(Candidate("bytes:\\xe2", b"\xe2", -0.1), Candidate(" a", b" a", -2.0))
    step = dec.observe([HostedResult("", (mixed,), "length", HostedUsage())], 0.0)
    assert dec.prefix.data == b" a" and "excluded" in step.notes[0]


def _cross(scorers, **params):
    """A per-step decoder whose small models do not share the hosted tokenizer (bytes aligned)."""
    expert, anti = scorers
    ids = expert.prompt_ids(prompt="Hi")
    top_k = params.pop("top_k", 20)
    return build(PerStepDecoder, expert.session(ids), anti.session(ids), expert.vocab, same_vocab=False, prompt="Hi",
                 top_k=top_k, **params)


SPECIAL = Candidate("<start_of_image>", b"<start_of_image>", -0.05)  # a hosted-only special token


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_a_token_the_small_models_cannot_say_never_wins(scorers_b, alpha):
    """The hosted model prefers its special token by 5 nats; neither small model can say it (both
    at the floor: no evidence), so it gets tuned probability 0 and a real token is chosen."""
    dec = _cross(scorers_b, max_tokens=2, top_k=3, alpha=alpha)
    step = dec.observe([HostedResult("", (position(SPECIAL, Candidate(" the", b" the", -5.0),
                                                   Candidate(" a", b" a", -6.0)),), "length", HostedUsage())], 0.0)
    by_text = {c.text: c for c in step.candidates}
    assert by_text["<start_of_image>"].prob == 0.0 and by_text["<start_of_image>"].expert_logprob == -math.inf
    assert step.chosen_text in (" the", " a") and "cannot say" in step.notes[-1]
    # sampling never draws it either
    dec = _cross(scorers_b, max_tokens=40, top_k=3, alpha=alpha, temperature=1.0, seed=1)
    for _ in range(40):
        step = dec.observe([HostedResult("", (position(SPECIAL, Candidate(" the", b" the", -5.0)),), "length",
                                          HostedUsage())], 0.0)
        assert step.chosen_text == " the"


def test_the_rule_mutated_back_to_delta_zero_lets_the_special_token_win(scorers_b, monkeypatch):
    """Mutation check: with today's rule back (no exclusion: the special token's offset is 0),
    the special token wins, so the test above would fail."""
    from blackbox_proxy.maths import combiner

    monkeypatch.setattr(combiner, "without_evidence", lambda *a, **k: [])
    dec = _cross(scorers_b, max_tokens=2, top_k=3, alpha=1.0)
    step = dec.observe([HostedResult("", (position(SPECIAL, Candidate(" the", b" the", -5.0),
                                                   Candidate(" a", b" a", -6.0)),), "length", HostedUsage())], 0.0)
    assert step.chosen_text == "<start_of_image>"


def test_alpha_zero_tunes_nothing_and_an_all_silent_position_keeps_every_candidate(scorers_b):
    dec = _cross(scorers_b, max_tokens=2, top_k=3, alpha=0.0)  # alpha 0 is the hosted model itself
    step = dec.observe([HostedResult("", (position(SPECIAL, Candidate(" the", b" the", -5.0)),), "length",
                                      HostedUsage())], 0.0)
    assert step.chosen_text == "<start_of_image>"
    dec = _cross(scorers_b, max_tokens=2, top_k=3, alpha=1.0, temperature=1.0, seed=0)  # nothing to tune with
    other = Candidate("<end_of_image>", b"<end_of_image>", -1.0)
    step = dec.observe([HostedResult("", (position(SPECIAL, other),), "length", HostedUsage())], 0.0)
    assert [round(c.prob, 6) for c in step.candidates] == [round(1 / (1 + math.exp(-0.95)), 6),
                                                           round(1 / (1 + math.exp(0.95)), 6)]
