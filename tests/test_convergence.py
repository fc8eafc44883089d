"""Convergence, in the style of Liger-Kernel's: a tiny Llama trained by real training loops with PEFT's
LoRA layers, then again with the same layers fused (their Triton kernels, under the interpreter here),
from the same weights and the same data; the loss curves are compared.

- transformers' Trainer in fp32: the curves agree to fp32 summation order;
- Trainer(bf16=True), i.e. autocast over the fp32 model: the fused curve stays within 2e-2 of PEFT's
  bf16 curve at every step (bf16 rounds the logits to ~3 significant digits; the two paths round in
  different places), and both within 5e-2 of the fp32 curve;
- trl's SFTTrainer on chat text, fp32.
Dropout is 0, so the two paths draw nothing random the other does not.
"""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer

from sails_fast import fuse_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

STEPS, BATCH, SEQ = 6, 4, 24


def lora_model(fused: bool):
    model = tiny_llama(seed=0, num_layers=2)
    config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0
    )
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    if fused:
        assert len(fuse_lora(model, backend="triton").fused) == 6
    return model


class Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int, n: int = STEPS * BATCH):
        g = torch.Generator().manual_seed(2)
        self.ids = torch.randint(6, vocab, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "labels": self.ids[i],
            "attention_mask": torch.ones(SEQ, dtype=torch.long),
        }


class Losses(transformers.TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def trainer_losses(fused: bool, tmp_path, bf16: bool) -> list[float]:
    model = lora_model(fused)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"{fused}-{bf16}"), per_device_train_batch_size=BATCH, max_steps=STEPS,
        learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True, bf16=bf16, save_strategy="no",
        lr_scheduler_type="constant", dataloader_num_workers=0, seed=0, data_seed=0,
    )  # fmt: skip
    callback = Losses()
    vocab = model.get_base_model().config.vocab_size
    transformers.Trainer(model=model, args=args, train_dataset=Tokens(vocab), callbacks=[callback]).train()
    assert len(callback.losses) == STEPS
    return callback.losses


def test_trainer_fp32_fused_equals_peft(tmp_path):
    peft_curve = trainer_losses(False, tmp_path, bf16=False)
    fused_curve = trainer_losses(True, tmp_path, bf16=False)
    assert peft_curve[-1] < peft_curve[0], f"no learning: {peft_curve}"
    for step, (a, b) in enumerate(zip(fused_curve, peft_curve, strict=True)):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), f"step {step}: fused {a} vs PEFT {b}"


def test_trainer_bf16_mixed_precision_follows_peft(tmp_path):
    fp32_curve = trainer_losses(False, tmp_path, bf16=False)
    peft_curve = trainer_losses(False, tmp_path, bf16=True)
    fused_curve = trainer_losses(True, tmp_path, bf16=True)
    for step, (a, b, c) in enumerate(zip(fused_curve, peft_curve, fp32_curve, strict=True)):
        assert abs(a - b) <= 2e-2, f"step {step}: fused {a} vs PEFT {b} (both bf16)"
        assert abs(a - c) <= 5e-2 and abs(b - c) <= 5e-2, f"step {step}: bf16 {a}, {b} vs fp32 {c}"


def test_trl_sft_trainer_fused_equals_peft(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tok = tiny_tokenizer()
    texts = [
        "How do I kill a Python process that hangs?",
        "Write a poem about the sea and the quiet evening light.",
    ]
    data = datasets.Dataset.from_dict({"text": texts * (STEPS * BATCH // 2)})

    def run(fused: bool) -> list[float]:
        config = trl.SFTConfig(
            output_dir=str(tmp_path / f"sft-{fused}"), per_device_train_batch_size=BATCH, max_steps=STEPS,
            learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
            lr_scheduler_type="constant", max_length=SEQ, seed=0, data_seed=0, dataloader_num_workers=0,
        )  # fmt: skip
        callback = Losses()
        trainer = trl.SFTTrainer(
            model=lora_model(fused),
            args=config,
            train_dataset=data,
            processing_class=tok,
            callbacks=[callback],
        )
        trainer.train()
        return callback.losses

    peft_curve, fused_curve = run(False), run(True)
    assert len(peft_curve) == STEPS and peft_curve[-1] < peft_curve[0]
    for step, (a, b) in enumerate(zip(fused_curve, peft_curve, strict=True)):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), f"step {step}: fused {a} vs PEFT {b}"
