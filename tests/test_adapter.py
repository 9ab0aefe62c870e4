"""Expert = base + LoRA adapter, anti-expert = the same object with the adapter off: the pair
costs one model's memory and gives the same offsets as two separate model copies."""

import copy

import pytest
import torch

from blackbox_proxy import ConfigurationError, ProxyTuner, Scorer
from tiny import save


@pytest.fixture(scope="module")
def adapter_setup(tmp_path_factory, tok_a, models_a):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapter")
    base = copy.deepcopy(models_a[2])
    save(base, tok_a, root / "base")
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(root / "adapter")
    merged = peft_model.merge_and_unload()  # an independent expert copy
    return root, base, merged


def test_adapter_pair_equals_two_copies(server_a, tok_a, adapter_setup):
    root, base, merged = adapter_setup
    pair = ProxyTuner(base_url=server_a.base_url, model="tiny", anti_expert=str(root / "base"),
                      expert_adapter=str(root / "adapter"), hosted_tokenizer=tok_a, top_k=30,
                      anti_expert_render="raw", max_retries=0)
    assert pair.expert.model is pair.anti_expert.model  # one model in memory
    copies = ProxyTuner(base_url=server_a.base_url, model="tiny", hosted_tokenizer=tok_a, top_k=30, max_retries=0,
                        expert=Scorer(merged, tok_a, render="raw"), anti_expert=Scorer(base, tok_a, render="raw"))
    a = pair.generate("A café in Zürich", max_tokens=8)
    assert pair.expert._mixed_ok is True  # scored as one batch of two rows (adapter on, off)
    b = copies.generate("A café in Zürich", max_tokens=8)
    assert a.text == b.text
    deltas = []
    for sa, sb in zip(a.trace, b.trace):
        for ca, cb in zip(sa.candidates, sb.candidates):
            assert ca.delta == pytest.approx(cb.delta, abs=2e-4)
            deltas.append(abs(ca.delta))
    assert max(deltas) > 0.05  # the adapter really changes the expert


def test_adapter_errors(server_a, adapter_setup, tmp_path):
    root, _, _ = adapter_setup
    with pytest.raises(ConfigurationError, match="not both"):
        ProxyTuner(base_url=server_a.base_url, model="tiny", anti_expert=str(root / "base"), expert="x",
                   expert_adapter=str(root / "adapter"))
    with pytest.raises(ConfigurationError, match="no expert"):
        ProxyTuner(base_url=server_a.base_url, model="tiny", anti_expert=str(root / "base"))
    from blackbox_proxy import ModelLoadError

    with pytest.raises(ModelLoadError, match="cannot load the LoRA adapter"):
        ProxyTuner(base_url=server_a.base_url, model="tiny", anti_expert=str(root / "base"),
                   expert_adapter=str(tmp_path))
