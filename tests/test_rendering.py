"""The small models' prompt rendering by default follows the hosted prompt: raw text in
completions mode, the chat template in the chat modes (issue 20)."""

import pytest

from blackbox_proxy import ProxyTuner, Scorer


@pytest.mark.parametrize("mode, expected", [("completions", "raw"), ("chat-prefix", "chat"), ("chat", "chat")])
def test_auto_rendering_follows_the_hosted_prompt(server_a, saved_a, mode, expected):
    with ProxyTuner(base_url=server_a.base_url, model="tiny", expert=str(saved_a["E"]),
                    anti_expert=str(saved_a["A"]), mode=mode, max_retries=0) as tuner:
        assert (tuner.expert.render, tuner.anti_expert.render) == (expected, expected)


def test_explicit_rendering_and_scorers_are_kept(server_a, saved_a, tok_a, models_a):
    with ProxyTuner(base_url=server_a.base_url, model="tiny", expert=str(saved_a["E"]), anti_expert=str(saved_a["A"]),
                    expert_render="chat", anti_expert_render="chat", max_retries=0) as tuner:
        assert (tuner.expert.render, tuner.anti_expert.render) == ("chat", "chat")
    chat = Scorer(models_a[1], tok_a, render="chat"), Scorer(models_a[2], tok_a, render="chat")
    with ProxyTuner(base_url=server_a.base_url, model="tiny", expert=chat[0], anti_expert=chat[1],
                    max_retries=0) as tuner:
        assert tuner.expert.render == tuner.anti_expert.render == "chat"


def test_auto_raw_rendering_scores_the_prompt_as_the_hosted_model_sees_it(server_a, saved_a, tok_a):
    """In completions mode the anti-expert's context is the prompt's own tokens, not a chat turn:
    the first step's anti-expert logprobs equal a raw-rendered scorer's."""
    raw = Scorer.from_pretrained(str(saved_a["A"]), render="raw")
    with ProxyTuner(base_url=server_a.base_url, model="tiny", expert=str(saved_a["E"]),
                    anti_expert=str(saved_a["A"]), top_k=5, max_retries=0) as auto, \
            ProxyTuner(base_url=server_a.base_url, model="tiny", expert=str(saved_a["E"]), anti_expert=raw,
                       top_k=5, max_retries=0) as reference, \
            ProxyTuner(base_url=server_a.base_url, model="tiny", expert=str(saved_a["E"]), anti_expert=str(saved_a["A"]),
                       anti_expert_render="chat", top_k=5, max_retries=0) as chat:
        got, want, other = (t.generate("Once upon", max_tokens=1).trace[0].candidates for t in (auto, reference, chat))

    def view(cands):
        return [(c.text, round(c.anti_expert_logprob, 5)) for c in cands]

    assert view(got) == view(want)
    assert view(got) != view(other)  # the chat rendering would score a different context


def test_an_adapter_pair_shares_one_rendering(server_a, tmp_path, saved_a, models_a):
    """With an adapter the two small models are one model: an explicit rendering on either flag
    applies to both, two different explicit ones are refused."""
    import copy

    import peft

    model = peft.get_peft_model(copy.deepcopy(models_a[2]), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    common = dict(base_url=server_a.base_url, model="tiny", anti_expert=str(saved_a["A"]),
                  expert_adapter=str(tmp_path / "adapter"), max_retries=0)
    for kw, expected in [({}, "raw"), ({"expert_render": "chat"}, "chat"), ({"anti_expert_render": "chat"}, "chat")]:
        with ProxyTuner(**common, **kw) as tuner:
            assert (tuner.expert.render, tuner.anti_expert.render) == (expected, expected), kw
    from blackbox_proxy import ConfigurationError

    with pytest.raises(ConfigurationError, match="share one prompt rendering"):
        ProxyTuner(**common, expert_render="chat", anti_expert_render="raw")


def test_hosted_chat_text_sources(tok_a, tmp_path):
    """Messages for a completions host: the given template, else the hosted tokenizer's, else the
    expert's; none at all is a one-line error naming the option."""
    import copy

    from blackbox_proxy import ConfigurationError
    from blackbox_proxy.rendering import hosted_chat_text, read_template
    from blackbox_proxy.tokens.loaders import vocabulary_from_hf

    messages = [{"role": "user", "content": "Hi"}]
    hosted = vocabulary_from_hf(tok_a)
    plain = copy.deepcopy(tok_a)
    plain.chat_template = None
    own = tok_a.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert hosted_chat_text(messages, template=None, hosted_vocab=hosted, expert_tokenizer=plain) == own
    assert hosted_chat_text(messages, template=None, hosted_vocab=None, expert_tokenizer=tok_a) == own
    file = tmp_path / "t.jinja"
    file.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] ")
    given = read_template(str(file))
    assert hosted_chat_text(messages, template=given, hosted_vocab=hosted, expert_tokenizer=tok_a) == "[user] Hi\n[assistant] "
    with pytest.raises(ConfigurationError, match="--chat-template"):
        hosted_chat_text(messages, template=None, hosted_vocab=vocabulary_from_hf(plain), expert_tokenizer=plain)
    with pytest.raises(ConfigurationError, match="cannot read the chat template file"):
        read_template(str(tmp_path / "missing.jinja"))
