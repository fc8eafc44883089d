"""The training loss in chunks over tokens: the full [tokens x vocab] logits never exist, and the loss and
every gradient equal the plain loss's (the house comparison rule), for Llama and for Gemma-2 (logit
soft-capping), with and without PEFT, gradient checkpointing and a 4-bit-style frozen base."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from tiny import tiny_llama, tiny_tokenizer
from torch.utils._python_dispatch import TorchDispatchMode

from sails_fast.training import TrainConfig
from sails_fast.training.sft import chunkable, response_loss, sft_batch


def tiny_gemma2(tok, seed: int = 0):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=len(tok), max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        final_logit_softcapping=2.0, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    return Gemma2ForCausalLM(config).eval()


def batch_for(tok, lengths=((5, 9), (3, 14), (7, 4))):
    """sft_batch of a few (prompt, response) token lists of odd lengths (padding, -100 prompt labels)."""
    g = torch.Generator().manual_seed(0)
    encoded = []
    for n_prompt, n_response in lengths:
        ids = torch.randint(6, len(tok), (n_prompt + n_response,), generator=g).tolist()
        encoded.append((ids, n_prompt))
    return sft_batch(encoded, tok.pad_token_id)


def peft_of(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    return get_peft_model(model, config)


def loss_and_grads(model, batch, chunk_tokens):
    model.zero_grad(set_to_none=True)
    loss, n = response_loss(model, *batch, chunk_tokens=chunk_tokens)
    (loss / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), n, grads


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 4096, "auto"])
@pytest.mark.parametrize("wrap", ["peft", "plain"])
def test_chunked_loss_and_gradients_equal_the_plain_loss(arch, chunk_tokens, wrap):
    tok = tiny_tokenizer()
    model = tiny_llama(tokenizer=tok) if arch == "llama" else tiny_gemma2(tok)
    model = peft_of(model) if wrap == "peft" else model.train()
    batch = batch_for(tok)
    ref_loss, ref_n, ref_grads = loss_and_grads(model, batch, None)
    loss, n, grads = loss_and_grads(model, batch, chunk_tokens)
    assert n == ref_n == 9 + 14 + 4  # every response token, scored from the position before it
    assert_close("loss", loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert_close(name, g, ref_grads[name])


def test_chunked_loss_under_gradient_checkpointing_and_no_grad():
    tok = tiny_tokenizer()
    model = peft_of(tiny_llama(tokenizer=tok))
    model.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model.train()
    batch = batch_for(tok)
    ref_loss, _, ref_grads = loss_and_grads(model, batch, None)
    loss, _, grads = loss_and_grads(model, batch, 3)
    assert_close("loss", loss, ref_loss)
    for name, g in grads.items():
        assert_close(name, g, ref_grads[name])
    with torch.no_grad():  # evaluation (perplexity) takes the same path without autograd
        assert_close("no-grad loss", response_loss(model, *batch, chunk_tokens=3)[0], ref_loss)


class LargestTensor(TorchDispatchMode):
    """Records the largest logits-like tensor (last dimension = the vocabulary) any op produces."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # a view (the head weight's transpose) allocates nothing
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


def test_the_full_logits_never_exist():
    tok = tiny_tokenizer()
    model = peft_of(tiny_llama(tokenizer=tok, hidden=16))
    batch = batch_for(tok, lengths=((20, 40), (10, 50), (30, 30)))
    B, S = batch[0].shape
    V = len(tok)
    chunk = 8
    with LargestTensor(V) as plain:
        loss, n = response_loss(model, *batch)
        loss.backward()
    with LargestTensor(V) as chunked:
        loss, n = response_loss(model, *batch, chunk_tokens=chunk)
        loss.backward()
    assert plain.largest >= B * S * V  # the plain path's logits
    assert chunked.largest == chunk * V  # one chunk of logits (forward, then again in the backward)
    assert chunked.largest < n * V < B * S * V


def test_models_whose_forward_is_not_decoder_then_head_take_the_plain_path():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tok), n_positions=64)
    ).eval()
    assert not chunkable(gpt2) and chunkable(tiny_llama(tokenizer=tok))
    batch = batch_for(tok)
    ref = response_loss(gpt2, *batch)[0]
    assert torch.equal(response_loss(gpt2, *batch, chunk_tokens=4)[0], ref)


def test_train_config_loss_chunk_tokens():
    from sails_fast.training.sft import auto_chunk_tokens

    assert TrainConfig().loss_chunk_tokens == "auto"
    assert (
        auto_chunk_tokens(256000) == 262
        and auto_chunk_tokens(49152) == 1365
        and auto_chunk_tokens(10**9) == 64
    )
    assert TrainConfig(loss_chunk_tokens=8).loss_chunk_tokens == 8
    assert TrainConfig(loss_chunk_tokens=None).loss_chunk_tokens is None
    for bad in (0, -1, 2.5, True, "fast"):
        with pytest.raises(ValueError, match="loss_chunk_tokens"):
            TrainConfig(loss_chunk_tokens=bad)
