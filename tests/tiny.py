"""Tiny real tokenizers and models built in-test (no download): fixtures' building blocks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "A café in Zürich sells crème brûlée for 12€ and naïve tea for 3.50 CHF.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024 3.14159 42",
    "Question: what is 12 + 30? Answer: 42. Question: what is 7 * 6? Answer: 42.",
    "日本語のテキストと emoji 🙂👍 mixed with English words and more words.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "She said: «bonjour», he answered — hello! Then they left; the end.",
    "There are many words here: theme, them, there, these, thesis, thermal, other.",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if not loop.last or m['role'] != 'assistant' %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe(vocab_size: int, *, digits: bool = False, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer trained on the corpus, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if digits else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or CORPUS) * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(tokenizer, seed: int, *, hidden: int = 48, layers: int = 2, sharpness: float = 6.0):
    """A random tiny Llama over ``tokenizer``'s vocabulary, peaky enough to avoid near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model.eval()


def concentrated(model, live, seed):
    """Give ``model`` a biased head: all mass on the ``live`` tokens (others at -30), so
    speculative walks accept and reject at realistic rates (the statistical tests' models)."""
    torch.manual_seed(seed)
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight * 0.3)
        head.bias.fill_(-30.0)
        head.bias[live] = 0.0
    model.lm_head = head
    return model


def save(model, tokenizer, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def dump(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False)
