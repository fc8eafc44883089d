"""The training step's config (METHOD.md step 6) and its learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from sails_fast.core.config import ConfigBase


@dataclass
class TrainConfig(ConfigBase):
    """The SFT run (all steps are optimizer steps; one step = batch_size x grad_accum_steps examples).

    Args:
        learning_rate: peak AdamW learning rate.
        num_epochs: passes over the examples (ignored when max_steps is set).
        max_steps: total optimizer steps; None = ceil(num_epochs * N / (batch_size * grad_accum_steps)).
        batch_size: examples per forward/backward (micro-batch).
        grad_accum_steps: micro-batches per optimizer step. The loss is the mean over all response tokens
            of the step, whatever the split, so (4, 1) and (2, 2) give the same update up to rounding.
        warmup_ratio: share of the steps with linear warmup: lr * (s + 1) / W for s < W = ceil(ratio * T).
        min_lr_ratio: the cosine decays from lr to lr * min_lr_ratio at the last step.
        weight_decay, adam_betas, adam_eps: AdamW's.
        max_grad_norm: clip the gradient norm (None: no clipping).
        max_length: most tokens per example; longer ones keep their response (see tokenize_example).
        chat_template: wrap prompts in the tokenizer's chat template.
        append_eos: end each response with EOS, so the model learns to stop.
        gradient_checkpointing: recompute activations in the backward (less memory, ~30 % slower).
        loss_chunk_tokens: response tokens per logits chunk in the loss (`response_loss`), so the
            [tokens x vocab] logits never exist whole (Gemma-2: 256000 words x 2048 tokens = 2.1 GB in
            fp32); "auto" (default): 256 MiB of fp32 logits per chunk (256 tokens for Gemma-2); None: the
            model's full logits. Changes only the summation order of the loss.
        save_every: write a checkpoint every N optimizer steps (0: only the final adapter).
        keep_checkpoints: how many of the newest checkpoints to keep.
        log_every: log every N steps (the last step is always logged).
        seed: data order and dropout.
        fused: route the LoRA layers through sails_fast's fused kernels (`fuse_lora`): True, False, or
            "auto" (default): on a GPU, where they pay; on CPU the fused op's backend would be the plain
            reference, which gains nothing over PEFT's own path, so PEFT's path is kept there.
        backend: passed to `fuse_lora` ("auto", "triton", "torch").
        parallel: how several ranks (torchrun) train: "ddp" (default), a whole model on every rank with
            the LoRA gradients averaged; "fsdp", the frozen base sharded over the ranks (each holds 1/N
            of its weights; for bases that do not fit one device). Both give the single-process result up
            to summation order; one process ignores it. See `sails_fast.training.fully_sharded`.
        resume: continue from the newest checkpoint in out_dir; False refuses an out_dir that has one.
        progress: show a tqdm progress bar.

    Example:
        >>> TrainConfig(learning_rate=2e-4, max_steps=200, batch_size=4, grad_accum_steps=4, save_every=50)
    """

    learning_rate: float = 2e-4
    num_epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum_steps: int = 1
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    max_length: int = 512
    chat_template: bool = True
    append_eos: bool = True
    gradient_checkpointing: bool = False
    loss_chunk_tokens: int | Literal["auto"] | None = "auto"
    save_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    fused: bool | Literal["auto"] = "auto"
    backend: Literal["auto", "triton", "torch"] = "auto"
    parallel: Literal["ddp", "fsdp"] = "ddp"
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        def positive_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"{name}: expected an int >= {minimum}, got {v!r}")

        def number(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > lo if lo_open else v >= lo) and v <= hi
            if not ok:
                bound = "(" if lo_open else "["
                raise ValueError(f"{name}: expected a number in {bound}{lo}, {hi}], got {v!r}")

        for name in (
            "num_epochs",
            "batch_size",
            "grad_accum_steps",
            "max_length",
            "keep_checkpoints",
            "log_every",
        ):
            positive_int(name)
        positive_int("save_every", 0)
        positive_int("seed", 0)
        if self.max_steps is not None:
            positive_int("max_steps")
        if self.loss_chunk_tokens not in (None, "auto"):
            positive_int("loss_chunk_tokens")
        number("learning_rate", 0.0, 1.0, lo_open=True)
        number("warmup_ratio", 0.0, 1.0)
        number("min_lr_ratio", 0.0, 1.0)
        number("weight_decay", 0.0, 1e3)
        number("adam_eps", 0.0, 1.0, lo_open=True)
        if self.max_grad_norm is not None:
            number("max_grad_norm", 0.0, math.inf, lo_open=True)
        betas = tuple(self.adam_betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"adam_betas: expected two numbers in [0, 1), got {self.adam_betas!r}")
        self.adam_betas = (float(betas[0]), float(betas[1]))
        for name in ("chat_template", "append_eos", "gradient_checkpointing", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if not (isinstance(self.fused, bool) or self.fused == "auto"):
            raise ValueError(f"fused: expected True, False or 'auto', got {self.fused!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel: expected 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {self.backend!r}")

    def total_steps(self, num_examples: int) -> int:
        """Optimizer steps of the run over `num_examples` examples."""
        if self.max_steps is not None:
            return self.max_steps
        return math.ceil(self.num_epochs * num_examples / (self.batch_size * self.grad_accum_steps))

    def warmup_steps(self, total: int) -> int:
        return math.ceil(self.warmup_ratio * total)


def lr_factor(step: int, total: int, warmup: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Linear warmup (step + 1) / warmup for step < warmup, then a cosine from 1 down to min_lr_ratio, which
    it reaches at the last step (total - 1).

    Example:
        >>> [round(lr_factor(s, 5, 1), 3) for s in range(5)]
        [1.0, 1.0, 0.75, 0.25, 0.0]
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
