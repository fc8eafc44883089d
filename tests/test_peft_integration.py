"""fuse_lora / unfuse_lora on a tiny random Llama with PEFT LoRA on q, k, v, o."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from sails_fast.integrations.peft import fuse_lora, unfuse_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def peft_llama(dropout: float = 0.0, seed: int = 0):
    model = peft.get_peft_model(
        tiny_llama(seed), peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS)
    )
    # non-zero B, so the adapter path contributes and its gradients are non-trivial
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def logits_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    (logits.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def test_fuse_lora_matches_peft_logits_and_adapter_grads():
    model = peft_llama()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(5))
    ref_logits, ref_grads = logits_and_grads(model, ids)

    report = fuse_lora(model, backend="triton")
    assert len(report.fused) == 2 * len(TARGETS) and not report.skipped, str(report)
    logits, grads = logits_and_grads(model, ids)
    assert_close("logits", logits, ref_logits)
    assert set(grads) == set(ref_grads) and len(grads) == 16
    for name in grads:
        assert_close(name, grads[name], ref_grads[name])

    assert unfuse_lora(model) == 2 * len(TARGETS)
    logits_after, _ = logits_and_grads(model, ids)
    assert torch.equal(logits_after, ref_logits), "unfuse_lora must restore PEFT's own forward exactly"


def test_fused_model_saves_a_standard_peft_checkpoint(tmp_path):
    model = peft_llama()
    fuse_lora(model)
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ids = torch.randint(0, 101, (1, 7))
    with torch.no_grad():
        assert_close("reloaded logits", reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_fuse_lora_reports_what_it_left_alone():
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    )
    report = fuse_lora(model)
    assert not report.fused
    assert len(report.skipped) == 4 and all("DoRA" in why for why in report.skipped.values())

    model = peft_llama()
    model.add_adapter("second", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    report = fuse_lora(model)
    skipped_q = [n for n in report.skipped if n.endswith("q_proj")]
    assert skipped_q and all("2 active adapters" in report.skipped[n] for n in skipped_q)


def test_fused_layer_falls_back_when_adapters_are_disabled():
    model = peft_llama()
    ids = torch.randint(0, 101, (1, 6))
    fuse_lora(model)
    with model.disable_adapter(), torch.no_grad():
        disabled = model(input_ids=ids).logits
    with torch.no_grad():
        base = tiny_llama()(input_ids=ids).logits
    assert torch.allclose(disabled, base, atol=1e-5)


def test_dropout_is_applied_in_training_only():
    model = peft_llama(dropout=0.5)
    fuse_lora(model, backend="triton")
    ids = torch.randint(0, 101, (1, 8))
    model.eval()
    with torch.no_grad():
        eval_a = model(input_ids=ids).logits
        eval_b = model(input_ids=ids).logits
        model.train()
        train = model(input_ids=ids).logits
    assert torch.equal(eval_a, eval_b)
    assert not torch.allclose(train, eval_a)
