"""What real servers send, normalised: known answers on hand-written response JSON.

These build SDK response objects from JSON as servers print it (OpenAI legacy completions,
OpenAI chat, vLLM, DeepSeek, llama.cpp quirks) and check the typed result. No transport is
mocked: HTTP is covered by the loopback tests.
"""

import dataclasses
import math

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from blackbox_proxy import ConfigurationError, HostedRequest, HostedResponseError
from blackbox_proxy.types import EmptyEntry
from blackbox_proxy.hosts.client import HostedClient
from blackbox_proxy.hosts.retry import retry_delay
from blackbox_proxy.hosts.wire import ResponseParser, decode_token_text, normalise_base_url
from blackbox_proxy.tokens.loaders import vocabulary_from_hf


def completion(tokens, token_logprobs, top_logprobs, text=None, finish="length"):
    return Completion.model_validate({
        "id": "c", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "text": text if text is not None else "".join(tokens), "finish_reason": finish,
                     "logprobs": {"tokens": tokens, "token_logprobs": token_logprobs,
                                  "top_logprobs": top_logprobs, "text_offset": [0] * len(tokens)}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": len(tokens), "total_tokens": 7 + len(tokens)},
    })


def chat(content, text="x", finish="length"):
    return ChatCompletion.model_validate({
        "id": "c", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                     "logprobs": {"content": content}}],
    })


def test_decode_token_text():
    assert decode_token_text("bytes:\\xe2\\x82") == b"\xe2\x82"
    assert decode_token_text("bytes: \\xe2") == b" \xe2"
    assert decode_token_text("\\xf0\\x9f\\x8c") == b"\xf0\x9f\x8c"  # DeepSeek style
    assert decode_token_text(" café") == " café".encode()
    assert decode_token_text("\\n") == b"\\n"  # a literal backslash-n token is text


def test_completions_position_normalisation():
    parser = ResponseParser()
    resp = completion(
        tokens=[" the"],
        token_logprobs=[-0.5],
        top_logprobs=[{" the": -0.5, " a": -1.5, "bytes:\\xe2\\x82": -3.0, " b": -9999.0, "<|endoftext|>": -4.0}],
    )
    result = parser.completion(resp)
    (pos,) = result.positions
    assert [c.data for c in pos.candidates] == [b" the", b" a", b"\xe2\x82", b""]
    assert pos.candidates[-1].is_end and pos.candidates[-1].text == "<|endoftext|>"
    assert pos.dropped == 1  # the -9999 sentinel
    assert pos.sampled.data == b" the"
    assert result.usage.prompt_tokens == 7 and result.usage.completion_tokens == 1


def test_sampled_token_outside_top_k_and_fewer_entries_than_asked():
    parser = ResponseParser()
    result = parser.completion(completion([" zebra"], [-7.25], [{" the": -0.5}]))
    pos = result.positions[0]
    assert [c.data for c in pos.candidates] == [b" the", b" zebra"]
    assert pos.sampled.logprob == -7.25


def test_chat_bytes_null_duplicates_and_placeholders():
    parser = ResponseParser()
    top = [
        {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
        {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},  # the same entry twice (k+1 style)
        {"token": " x", "logprob": -2.0, "bytes": None},  # llama.cpp: bytes always null
        {"token": "\ufffd", "logprob": -3.0, "bytes": [239, 191, 189]},  # vLLM partial char
        {"token": "\\xf0\\x9f", "logprob": -4.0, "bytes": [240, 159]},
    ]
    result = parser.chat(chat([{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": top}]))
    pos = result.positions[0]
    assert [(c.data, c.logprob) for c in pos.candidates] == [(b"Hi", -0.1), (b" x", -2.0), (b"\xf0\x9f", -4.0)]
    assert pos.dropped == 1


def test_same_bytes_from_different_tokens_are_merged():
    parser = ResponseParser()
    top = [{"token": "a", "logprob": math.log(0.3), "bytes": [97]}, {"token": "a", "logprob": math.log(0.2), "bytes": [97]}]
    pos = parser.chat(chat([{"token": "a", "logprob": math.log(0.3), "bytes": [97], "top_logprobs": top}])).positions[0]
    assert len(pos.candidates) == 1
    assert math.exp(pos.candidates[0].logprob) == pytest.approx(0.5)


def test_end_of_text_without_logprobs_and_missing_logprobs():
    parser = ResponseParser()
    empty = Completion.model_validate({
        "id": "c", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}],
    })
    assert parser.completion(empty).positions == ()
    missing = Completion.model_validate({
        "id": "c", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "text": "abc", "finish_reason": "length", "logprobs": None}],
    })
    with pytest.raises(HostedResponseError, match="returned no logprobs"):
        parser.completion(missing)


def test_token_ids_and_special_tokens_with_a_known_vocabulary(tok_a):
    vocab = vocabulary_from_hf(tok_a)
    parser = ResponseParser(vocab)
    the = vocab.ids_for_bytes(b" the")[0]
    resp = completion(
        [f"token_id:{the}"], [-0.2],
        [{f"token_id:{the}": -0.2, "token_id:0": -1.0, "<|im_start|>": -2.0, " the": -0.2, "<|im_end|>": -3.0}],
    )
    pos = parser.completion(resp).positions[0]
    assert pos.candidates[0].token_id == the and pos.candidates[0].data == b" the"
    ends = [c for c in pos.candidates if c.is_end]
    assert {c.token_id for c in ends} == {0, 2}  # <|endoftext|>, <|im_end|>
    assert pos.dropped == 1  # <|im_start|>: special, not an end


def test_request_building_per_mode_and_dialect():
    base = dict(base_url="http://127.0.0.1:1/v1", model="m", max_retries=0)
    comp = HostedClient(**base, mode="completions")
    endpoint, kwargs = comp.build(HostedRequest(mode="completions", prompt="Hi", max_tokens=1, top_k=5))
    assert endpoint == "completions" and kwargs["logprobs"] == 5 and kwargs["prompt"] == "Hi"
    vllm = HostedClient(**base, mode="chat-prefix", dialect="vllm")
    _, kwargs = vllm.build(HostedRequest(mode="chat-prefix", messages=(("user", "Q"),), assistant_prefix="A:", max_tokens=1, top_k=3))
    assert kwargs["messages"][-1] == {"role": "assistant", "content": "A:"}
    assert kwargs["extra_body"] == {"continue_final_message": True, "add_generation_prompt": False,
                                    "skip_special_tokens": False}
    assert kwargs["logprobs"] is True and kwargs["top_logprobs"] == 3
    deepseek = HostedClient(**base, mode="chat-prefix", dialect="deepseek")
    _, kwargs = deepseek.build(HostedRequest(mode="chat-prefix", messages=(("user", "Q"),), assistant_prefix="A:", max_tokens=1, top_k=3))
    assert kwargs["messages"][-1] == {"role": "assistant", "content": "A:", "prefix": True}
    assert "extra_body" not in kwargs
    plain = HostedClient(**base, mode="chat")
    with pytest.raises(ConfigurationError, match="only chat-prefix mode can continue"):
        plain.build(HostedRequest(mode="chat", messages=(("user", "Q"),), assistant_prefix="A:", max_tokens=1, top_k=3))


def test_base_url_and_key_handling(monkeypatch):
    assert normalise_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalise_base_url("https://api.example.com/v1/") == "https://api.example.com/v1"
    with pytest.raises(ConfigurationError, match="base URL must look like"):
        normalise_base_url("localhost:8000")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://10.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-secret-123")
    client = HostedClient(model="m")
    assert client.base_url == "http://10.0.0.1:9/v1"
    assert "sk-env-secret-123" not in repr(client)


def test_retry_policy():
    import random

    import httpx

    rng = random.Random(0)
    request = httpx.Request("POST", "http://x/v1/completions")

    def status(code, headers=None):
        response = httpx.Response(code, headers=headers or {}, request=request)
        return openai.APIStatusError("x", response=response, body=None)

    assert retry_delay(status(429, {"retry-after": "2"}), 1, rng) == 2.0
    assert 0.3 < retry_delay(status(503), 1, rng) < 0.7
    assert 1.4 < retry_delay(status(500), 3, rng) < 2.6
    assert retry_delay(status(400), 1, rng) is None
    assert retry_delay(status(401), 1, rng) is None
    assert retry_delay(openai.APIConnectionError(request=request), 1, rng) is not None


def test_vllm_lossy_partial_character_is_dropped():
    """vLLM fills `bytes` from the U+FFFD text of a partial token: the true bytes are unknown."""
    parser = ResponseParser()
    top = [{"token": " the", "logprob": -0.5, "bytes": [32, 116, 104, 101]},
           {"token": " \ufffd", "logprob": -1.0, "bytes": [32, 239, 191, 189]}]
    pos = parser.chat(chat([{"token": " the", "logprob": -0.5, "bytes": [32, 116, 104, 101], "top_logprobs": top}])).positions[0]
    assert [c.data for c in pos.candidates] == [b" the"] and pos.dropped == 1


@pytest.mark.parametrize("key", [" sk-abc 123", "sk-\x00abc123", "sk-abc\u00e9123"])
def test_bad_api_keys_are_refused_without_echo(key):
    with pytest.raises(ConfigurationError) as info:
        HostedClient(base_url="http://127.0.0.1:1/v1", model="m", api_key=key)
    if key.strip():
        assert "abc" not in str(info.value)


def test_trailing_newline_in_key_is_stripped():
    client = HostedClient(base_url="http://127.0.0.1:1/v1", model="m", api_key="sk-abc123\n".strip() + "\n")
    assert client._api_key == "sk-abc123"


def test_chat_prefix_needs_a_known_dialect():
    client = HostedClient(base_url="http://127.0.0.1:1/v1", model="m", mode="chat-prefix", max_retries=0)
    with pytest.raises(ConfigurationError, match="pass --dialect vllm, deepseek or mistral"):
        client.build(HostedRequest(mode="chat-prefix", messages=(("user", "Q"),), assistant_prefix="A", max_tokens=1, top_k=2))
    # the first step has no prefix yet: an ordinary chat request is fine
    client.build(HostedRequest(mode="chat-prefix", messages=(("user", "Q"),), max_tokens=1, top_k=2))


def test_logit_bias_and_vllm_extras_are_sent():
    client = HostedClient(base_url="http://127.0.0.1:1/v1", model="m", dialect="vllm", max_retries=0)
    _, kwargs = client.build(HostedRequest(mode="completions", prompt="x", max_tokens=1, top_k=2, logit_bias=((7, -100.0),)))
    assert kwargs["logit_bias"] == {"7": -100.0}
    assert kwargs["extra_body"]["skip_special_tokens"] is False
    assert "return_tokens_as_token_ids" not in kwargs["extra_body"]  # no hosted vocabulary to read ids with


def test_token_ids_are_requested_when_the_vocabulary_is_known(tok_a):
    client = HostedClient(base_url="http://127.0.0.1:1/v1", model="m", dialect="vllm", max_retries=0,
                          hosted_vocab=vocabulary_from_hf(tok_a))
    _, kwargs = client.build(HostedRequest(mode="completions", prompt=(5, 6), max_tokens=1, top_k=2))
    assert kwargs["extra_body"]["return_tokens_as_token_ids"] is True and kwargs["prompt"] == [5, 6]
    assert client.token_prompts


# ----- llama.cpp dialect: answers shaped like llama-cpp-python 0.3.36's (string-keyed, k+1, "") --------


def _llama_vocab():
    from blackbox_proxy.tokens.vocab import Vocabulary

    # 0-4 text, 5 "<eos>" (end), 6 "<ctl>" (control), 7-9 pieces of "€", 10 b" \xe2" (prints " "),
    # 11 b"\xe2\x82", 12 b"a", 13 b"a\xe2" (prints "a")
    pieces = [b" the", b" a", b" cat", b"}", b" ", None, None, b"\xe2", b"\x82", b"\xac", b" \xe2", b"\xe2\x82",
              b"a", b"a\xe2", b" x"]
    return Vocabulary(pieces, encode=lambda s: [], end_ids=[5], special_text={5: "<eos>", 6: "<ctl>"})


def _llama_client(vocab=None, **kw):
    return HostedClient(base_url="http://127.0.0.1:1/v1", model="m", dialect="llama.cpp", max_retries=0,
                        hosted_vocab=vocab, **kw)


def _drive(client, request, results, answers):
    """Run the client's end resolution, answering each request it makes from ``answers``."""
    asked = []
    steps = client._resolve_end(request, results)
    try:
        ask = next(steps)
        while True:
            asked.append(ask)
            ask = steps.send(answers[len(asked) - 1])
    except StopIteration as done:
        return done.value, asked


GREEDY = HostedRequest(mode="completions", prompt="x", max_tokens=1, top_k=3)
EMPTY_PRINTERS = {6, 7, 8, 9, 11}  # every id that prints as "" and is not the end


def test_llama_cpp_empty_entry_is_taken_out_and_resolved_by_the_client():
    client = _llama_client(_llama_vocab())
    # top-3 asked, 4 back (the drawn " cat" is added); "" is the entry every empty-printing token shares
    resp = completion([" the"], [-0.5], [{" the": -0.5, "": -1.2, " a": -2.0, " cat": -4.0}])
    result = client.parser.completion(resp)
    pos = result.positions[0]
    assert not any(c.is_end for c in pos.candidates) and pos.dropped == 0
    assert pos.empty_entry == EmptyEntry(1, -1.2, True, (" the",))
    # rank 1: a probe bans " the" and every other empty-printing token (not the end) ...
    ended = completion([], [], [], text="", finish="stop")
    [fixed], asked = _drive(client, GREEDY, [result], [[client.parser.completion(ended)]])
    probe = dict(asked[0].logit_bias)
    assert asked[0].top_k == 2 and probe.keys() == {0} | EMPTY_PRINTERS and 5 not in probe
    # ... and llama.cpp drew nothing: the end. Its value was in order, so it is taken as given.
    end = [c for c in fixed.positions[0].candidates if c.is_end]
    assert len(end) == 1 and end[0].logprob == -1.2 and end[0].token_id is None and fixed.extra_calls == 1
    # the probe drew a token: the entry was a control token or a piece, not the end
    drew = completion([" a"], [-2.0], [{"": -1.2, " a": -2.0}])
    [kept], _ = _drive(client, GREEDY, [result], [[client.parser.completion(drew)]])
    assert not any(c.is_end for c in kept.positions[0].candidates) and kept.extra_calls == 1
    # chunks and sampled answers: never the end, no further calls
    for request in (dataclasses.replace(GREEDY, max_tokens=4), dataclasses.replace(GREEDY, temperature=1.0)):
        [same], asked = _drive(client, request, [result], [])
        assert asked == [] and same == result
    # the same answer from another dialect: "" has no bytes and is dropped, no end is invented
    other = HostedClient(base_url="http://127.0.0.1:1/v1", model="m", dialect="vllm", max_retries=0)
    pos = other.parser.completion(resp).positions[0]
    assert not any(c.is_end for c in pos.candidates) and pos.dropped == 1 and pos.empty_entry is None


def test_llama_cpp_empty_entry_where_a_piece_of_a_character_was_drawn_is_dropped():
    client = _llama_client()
    # the drawn token is the first byte of "€": it prints as "", so "" holds its logprob, not the end's
    resp = completion(["", " x"], [-0.1, -0.3], [{"": -0.1, " a": -2.5}, {" x": -0.3, "": -3.0}], text=" x")
    first, second = client.parser.completion(resp).positions
    assert first.sampled is None and first.empty_entry is None and first.dropped == 1
    assert second.empty_entry == EmptyEntry(1, -3.0, True, (" x",))


def test_llama_cpp_end_value_overwritten_by_a_lower_token_is_read_alone():
    client = _llama_client(_llama_vocab())
    # as llama-cpp-python answered with the end banned from the draw: the end (rank 0, -0.02) and
    # a piece (rank 9, -8.53) both print as "": the key keeps rank 0 and takes -8.53
    tops = {"": -8.53, "}": -4.80, " a": -6.38, " the": -6.64}
    request = dataclasses.replace(GREEDY, logit_bias=((5, -100.0),))
    result = client.parser.completion(completion(["}"], [-4.80], [tops]))
    assert result.positions[0].empty_entry == EmptyEntry(0, -8.53, False, ())
    alone = completion(["}"], [-4.80], [{"": -0.019, "}": -4.80}])
    [fixed], asked = _drive(client, request, [result], [[client.parser.completion(alone)]])
    # no probe at rank 0 (nothing else beats a greedy draw); the value is read with top-1 alone
    assert len(asked) == 1 and asked[0].top_k == 1 and dict(asked[0].logit_bias).keys() == {5} | EMPTY_PRINTERS
    assert fixed.positions[0].candidates[0].is_end and fixed.positions[0].candidates[0].logprob == -0.019
    assert fixed.extra_calls == 1
    # without the hosted tokenizer the re-ask cannot ban the pieces; if it does not read the end
    # back, the best key below it is a safe lower bound
    bare = _llama_client()
    result = bare.parser.completion(completion(["}"], [-4.80], [tops]))
    piece = bare.parser.completion(completion([""], [-3.0], [{"": -3.0}], text=""))
    [fixed], _ = _drive(bare, request, [result], [[piece]])
    assert [c.logprob for c in fixed.positions[0].candidates if c.is_end] == [-4.80]
    # and without it an entry below rank 0 is not probed (no ids to ban): no end, no calls
    result = bare.parser.completion(completion([" the"], [-0.5], [{" the": -0.5, "": -1.2}]))
    [same], asked = _drive(bare, GREEDY, [result], [])
    assert asked == [] and not any(c.is_end for c in same.positions[0].candidates)


def test_llama_cpp_keys_whose_value_another_token_overwrote_are_dropped():
    client = _llama_client(_llama_vocab())
    # " " is printed by b" " and by b" \xe2": the key holds the later one's value, below " cat"'s
    pos = client.parser.completion(completion([" a"], [-1.0], [{" a": -1.0, " ": -6.0, " cat": -2.0}])).positions[0]
    assert [c.text for c in pos.candidates] == [" a", " cat"] and pos.dropped == 1
    # in order: kept
    pos = client.parser.completion(completion([" a"], [-1.0], [{" a": -1.0, " ": -2.0, " cat": -3.0}])).positions[0]
    assert [c.text for c in pos.candidates] == [" a", " ", " cat"] and pos.dropped == 0


def test_llama_cpp_chat_entries_and_request_body():
    client = HostedClient(base_url="http://127.0.0.1:1/v1", model="m", dialect="llama.cpp", mode="chat-prefix",
                          max_retries=0)
    resp = chat([{"token": "Hi", "logprob": -0.1, "bytes": None,
                  "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": None},
                                   {"token": "", "logprob": -2.0, "bytes": None}]}])
    pos = client.parser.chat(resp).positions[0]
    assert [c.data for c in pos.candidates] == [b"Hi"] and pos.empty_entry == EmptyEntry(1, -2.0, True, ("Hi",))
    _, kwargs = client.build(HostedRequest(mode="chat-prefix", messages=(("user", "Q"),), max_tokens=1, top_k=2))
    assert kwargs["extra_body"] == {"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0}
    with pytest.raises(ConfigurationError, match="llama.cpp server, which cannot continue an assistant message"):
        client.build(HostedRequest(mode="chat-prefix", messages=(("user", "Q"),), assistant_prefix="A", max_tokens=1,
                                   top_k=2))
    with pytest.raises(ConfigurationError, match="one choice per call"):
        client.build(HostedRequest(mode="chat-prefix", messages=(("user", "Q"),), max_tokens=1, top_k=2, n=2))
    assert client.max_choices == 1
    # a user's own extra body wins over the dialect's
    mine = HostedClient(base_url="http://127.0.0.1:1/v1", model="m", dialect="llama.cpp", max_retries=0,
                        extra_body={"repeat_penalty": 1.3})
    _, kwargs = mine.build(HostedRequest(mode="completions", prompt="x", max_tokens=1, top_k=2))
    assert kwargs["extra_body"]["repeat_penalty"] == 1.3 and kwargs["prompt"] == "x"


@pytest.mark.parametrize("owner, dialect", [("me", "llama.cpp"), ("llamacpp", None), ("vllm", "vllm"),
                                            ("organization-owner", None)])
def test_dialect_detection_from_owned_by(owner, dialect, tok_a):
    client = HostedClient(base_url="http://127.0.0.1:1/v1", model="m", max_retries=0,
                          hosted_vocab=vocabulary_from_hf(tok_a))

    class Model:
        id, owned_by = "m", owner

    class Models:
        data = [Model()]

    client._after_models(Models())
    assert client.dialect == dialect
    assert client.parser.printed_keys is (dialect == "llama.cpp")  # llama.cpp keys top logprobs by printed text
    assert client.token_prompts is (dialect == "vllm")  # llama.cpp answers token-id prompts with 500


def test_llama_cpp_drawn_pieces_of_a_character_are_read_back_from_the_text():
    from blackbox_proxy.tokens.vocab import Vocabulary

    pieces = [b"a", b"\xe2", b"\x82", b"\xac", b" x", b"\xe2\x82", None]
    vocab = Vocabulary(pieces, encode=lambda s: [], end_ids=[6], special_text={6: "<eos>"})
    client = HostedClient(base_url="http://127.0.0.1:1/v1", model="m", dialect="llama.cpp", max_retries=0,
                          hosted_vocab=vocab)
    # "€" drawn as three byte tokens: each prints as "", the answer's text has the character
    resp = completion(["a", "", "", "", " x"], [-0.1, -0.2, -0.3, -0.4, -0.5],
                      [{"a": -0.1}, {"": -0.2}, {"": -0.3}, {"": -0.4}, {" x": -0.5}], text="a€ x")
    positions = client.parser.completion(resp).positions
    assert [p.sampled.data for p in positions] == [b"a", b"\xe2", b"\x82", b"\xac", b" x"]
    assert [p.sampled.token_id for p in positions] == [0, 1, 2, 3, 4]
    assert all(p.sampled in p.candidates for p in positions) and not any(c.is_end for p in positions for c in p.candidates)
    # two tokens: only \xe2\x82 + \xac are tokens
    resp = completion(["", "", " x"], [-0.2, -0.3, -0.5], [{"": -0.2}, {"": -0.3}, {" x": -0.5}], text="€ x")
    assert [p.sampled.data for p in client.parser.completion(resp).positions] == [b"\xe2\x82", b"\xac", b" x"]
    # ambiguous once \x82\xac is a token too; an answer cut inside the character cannot be read
    ambiguous = Vocabulary(pieces[:6] + [b"\x82\xac", None], encode=lambda s: [], end_ids=[7])
    other = HostedClient(base_url="http://127.0.0.1:1/v1", model="m", dialect="llama.cpp", max_retries=0,
                         hosted_vocab=ambiguous)
    assert [p.sampled for p in other.parser.completion(resp).positions][:2] == [None, None]
    cut = completion(["a", "", ""], [-0.1, -0.2, -0.3], [{"a": -0.1}, {"": -0.2}, {"": -0.3}], text="a")
    assert [p.sampled is None for p in client.parser.completion(cut).positions] == [False, True, True]


# ----- registry and the one retry policy (sync and async share it) ------------------------------


def test_dialects_are_registered_and_detected_in_order():
    from blackbox_proxy.hosts import dialects

    assert dialects.DIALECTS == ("openai", "vllm", "llama.cpp", "deepseek", "mistral")
    assert dialects.detect("api.deepseek.com", {"vllm"}).name == "deepseek"  # a name in the host comes first
    assert dialects.detect("api.openai.com", {"me"}).name == "llama.cpp"  # owned_by before openai.com
    assert dialects.detect("api.openai.com", set()).name == "openai"
    with pytest.raises(ConfigurationError, match="dialect must be one of openai, vllm"):
        HostedClient(base_url="http://127.0.0.1:1/v1", model="m", dialect="nope")


@pytest.mark.parametrize("sync", [True, False])
def test_retries_stop_after_max_retries_and_incomplete_answers_are_asked_again_once(sync):
    import asyncio

    import httpx

    from blackbox_proxy import HostedAPIError
    from blackbox_proxy.hosts.client import AsyncHostedClient

    request = httpx.Request("POST", "http://x/v1/completions")
    kinds = []

    def call(script):
        kind = script.pop(0)
        kinds.append(kind)
        if kind == 503:
            raise openai.APIStatusError("x", response=httpx.Response(503, headers={"retry-after-ms": "1"},
                                                                     request=request), body=None)
        return kind

    def accept(answer):
        if answer == "bare":
            raise HostedResponseError("the hosted API returned no logprobs")
        return answer

    def run(script, max_retries):
        kinds.clear()
        kw = dict(base_url="http://127.0.0.1:1/v1", model="m", max_retries=max_retries)
        if sync:
            return HostedClient(**kw)._with_retries(lambda: call(script), accept)

        async def acall():
            return call(script)

        return asyncio.run(AsyncHostedClient(**kw)._with_retries(acall, accept))

    assert run([503, 503, "ok"], 2) == "ok" and kinds == [503, 503, "ok"]
    with pytest.raises(HostedAPIError, match=r"failed \(503: .*\); retry later"):
        run([503] * 5, 2)
    assert kinds == [503, 503, 503]  # the first attempt and max_retries more
    assert run(["bare", "ok"], 0) == "ok"  # asked again even with no transport retries
    with pytest.raises(HostedResponseError, match="asked 2 times"):
        run(["bare", "bare", "ok"], 4)
