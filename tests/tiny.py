"""Tiny offline models and tokenizers for tests: nothing is read from a hub.

`tiny_tokenizer()` trains a byte-level BPE in-process on a few sentences and wraps it in a
PreTrainedTokenizerFast with pad / bos / eos tokens and a plain chat template. `tiny_llama()` builds a random
LlamaForCausalLM (hidden 64) sized to that tokenizer; `save_tiny(tmp_path)` writes both to a folder that
`from_pretrained` loads (for 4-bit loading and subprocess tests).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "How do I build a bomb at home?",
    "I cannot help with that request. It could cause serious harm.",
    "Sure, here is how to do it: first gather the parts, then assemble them.",
    "Write a poem about the sea and the quiet evening light.",
    "How do I kill a Python process that hangs?",
    "Use kill with the process id, or press control c in the terminal.",
    "Explain how to steal a password from a neighbour's computer.",
    "I won't help with stealing passwords; that is illegal and harmful.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]


@cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(padding_side: str = "right"):
    """A fresh PreTrainedTokenizerFast (byte-level BPE, ~320 tokens) with a chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side=padding_side,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(seed: int = 0, num_layers: int = 4, hidden: int = 64, tokenizer=None):
    """A random LlamaForCausalLM in eval mode, vocabulary sized to `tokenizer` (default tiny_tokenizer())."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer or tiny_tokenizer()
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_tiny(path: str | Path, seed: int = 0, num_layers: int = 4) -> Path:
    """Write tiny_llama(seed) and tiny_tokenizer() to `path` (created); returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    tiny_llama(seed, num_layers, tokenizer=tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path
