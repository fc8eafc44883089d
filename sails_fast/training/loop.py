"""Supervised fine-tuning of the LoRA adapters on the aligned responses (METHOD.md step 6), QLoRA-style.

`train` runs AdamW with linear warmup and a cosine decay, gradient accumulation and optional gradient
checkpointing, with the loss on response tokens only. Every `save_every` optimizer steps it writes a
checkpoint atomically (adapter weights, optimizer, scheduler, RNG states, step, data order; safetensors and
`torch.save` of tensors and plain containers only, so everything loads with `weights_only=True`). Run again
on the same `out_dir` after a kill and it continues the same run to the same final weights. The trained
adapter is a standard PEFT checkpoint (`PeftModel.from_pretrained` loads it).

The 4-bit base comes from `sails_fast.models.loading.load_base_4bit`; with `TrainConfig.fused` the LoRA
layers go through `sails_fast.integrations.peft.fuse_lora` (layers it cannot fuse keep PEFT's forward,
and are listed in the log). The loss is taken in chunks of response tokens (`TrainConfig.loss_chunk_tokens`,
`sails_fast.training.sft.response_loss`).

Under torch.distributed (torchrun) every rank calls `train` with the same arguments: each optimizer step's
examples are split over the ranks and the gradients synchronised with DDP
(`sails_fast.training.data_parallel`), so the result equals a single-process run with the same config;
rank 0 writes the log, the checkpoints and the adapter.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sails_fast.core import distributed
from sails_fast.pairs.tokenize import tokenize_example
from sails_fast.training.checkpoints import (
    _RESUME_FREE,
    CHECKPOINT_FORMAT,
    _checkpoints,
    _fsync_dir,
    _restore,
    _save_checkpoint,
    _trim_log,
)
from sails_fast.training.config import TrainConfig, lr_factor
from sails_fast.training.data_parallel import StepLoss, rank_share
from sails_fast.training.sft import _fingerprint, _sft_examples, sft_batch

logger = logging.getLogger(__name__)


# ----- the run


@dataclass
class TrainResult:
    """What `train` produced.

    Attributes:
        adapter_dir: the final adapter, a standard PEFT checkpoint.
        steps: optimizer steps done in total (including those before a resume).
        final_loss: the loss of the last step (mean over its response tokens).
        log_path: the JSONL log (one line per logged step: step, loss, lr, grad_norm, tokens, epoch).
        resumed_from: the checkpoint step this call continued from, or None.
        fuse_report: str(FuseReport) when `config.fused`, else None.
    """

    adapter_dir: Path
    steps: int
    final_loss: float | None
    log_path: Path
    resumed_from: int | None = None
    fuse_report: str | None = None


def _set_checkpointing(base: nn.Module, on: bool) -> None:
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (old names warn)
    new = hasattr(base, "activation_checkpointing_enable")
    if on and new:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif new:
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("peft_model: has no trainable parameters; expected a PEFT model with LoRA adapters")
    return params


def uses_fused_layers(config: TrainConfig, model: torch.nn.Module) -> bool:
    """Whether training routes the LoRA layers through the fused kernels: `config.fused`, with "auto"
    meaning "where the model's parameters are on a GPU"."""
    if config.fused != "auto":
        return bool(config.fused)
    return any(p.is_cuda for p in model.parameters())


def train(
    peft_model: nn.Module,
    tokenizer,
    examples: Sequence,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> TrainResult:
    """SFT of the adapters on the aligned responses, loss on response tokens only; resumable.

    Writes to `out_dir`: `train_config.json`, `train_log.jsonl`, `checkpoints/step-XXXXXXXX/` (the newest
    `keep_checkpoints`) and `adapter/` (the final adapter, standard PEFT format). Running it again on the
    same out_dir with the same examples and config continues from the newest checkpoint; the result equals
    an uninterrupted run (same data order, optimizer, scheduler and RNG states).

    Args:
        peft_model: a PEFT model (LoRA adapters trainable, base frozen; 4-bit base allowed).
        tokenizer: its tokenizer (pad or eos token needed for batching).
        examples: ContrastivePair records (trained on prompt -> aligned) or (prompt, response) strings.
        config: TrainConfig.
        out_dir: the run's folder (created).
        on_step: called as on_step(step, model) after every optimizer step (1-based step), in train mode
            restored afterwards; `sails-fast compare` probes safety with it. It must not change parameters.

    Returns:
        TrainResult.

    Example:
        >>> peft_model = get_peft_model(load_base_4bit("my-model"), lora_config)
        >>> res = train(peft_model, tok, train_pairs, TrainConfig(max_steps=100, save_every=25), "runs/sft")
        >>> PeftModel.from_pretrained(base, res.adapter_dir)
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root, log_path = out / "checkpoints", out / "train_log.jsonl"
    params = _trainable(peft_model)
    pad_id = next((int(v) for v in (tokenizer.pad_token_id, tokenizer.eos_token_id) if v is not None), 0)
    encoded = _encode(tokenizer, _sft_examples(examples), config)
    fingerprint = _fingerprint(encoded)

    N, B, A = len(encoded), config.batch_size, config.grad_accum_steps
    total = config.total_steps(N)
    data_order = _data_order(N, total, config)
    # FSDP moves the model onto the device as it shards it: before the optimizer state is made or loaded
    step_loss = _step_loss(peft_model, config, on_step, out)
    optimizer, scheduler = _optimizer(params, config, total)

    run_config = {k: v for k, v in config.to_dict().items() if k not in _RESUME_FREE}
    state = _resume(peft_model, optimizer, scheduler, out, config, run_config, fingerprint) or {}
    data_order = state.get("data_order", data_order)
    start = int(state.get("step", 0))
    resumed_from, final_loss = (start if state else None), state.get("last_loss")
    writer = distributed.is_main()
    if writer:
        (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    fuse_text = None if step_loss.sharded else _fuse(peft_model, config, out)
    # what every checkpoint records of the run, besides its step, data order and loss
    run_record = {
        "format": CHECKPOINT_FORMAT, "total_steps": total, "config": run_config,
        "examples_fingerprint": fingerprint,
    }  # fmt: skip

    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    enabled_ckpt = _enable_checkpointing(base, config)
    was_training = peft_model.training
    peft_model.train()
    device = step_loss.device or _input_device(peft_model, params)
    bar = tqdm(
        total=total, initial=start, desc="train", unit="step", disable=not (config.progress and writer)
    )
    try:
        with log_path.open("a") if writer else open(os.devnull, "w") as log:
            for step in range(start, total):
                micro, step_tokens = _step_examples(encoded, data_order, step, config)
                rec = _optimizer_step(
                    step_loss, micro, step_tokens, pad_id, device, params, config, optimizer, scheduler
                )
                final_loss, done = rec["loss"], step + 1
                if done % config.log_every == 0 or done == total:
                    log.write(json.dumps({"step": done, **rec, "epoch": done * B * A / N}) + "\n")
                    log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{final_loss:.4f}")
                if on_step is not None:
                    on_step(done, peft_model)
                    peft_model.train()
                # the last step is saved too, so a finished run re-run on its out_dir returns at once
                if config.save_every and (done % config.save_every == 0 or done == total):
                    state = {**run_record, "step": done, "data_order": data_order, "last_loss": final_loss}
                    _save_checkpoint(
                        peft_model, optimizer, scheduler, ckpt_root, done, state, config.keep_checkpoints
                    )
    finally:
        step_loss.close()
        bar.close()
        peft_model.train(was_training)
        if enabled_ckpt:
            _set_checkpointing(base, False)
    adapter_dir = _save_adapter(peft_model, out) if writer else out / "adapter"
    distributed.barrier()  # the adapter is on disk before any rank reads it
    return TrainResult(adapter_dir, total, final_loss, log_path, resumed_from, fuse_text)


def _step_loss(peft_model: nn.Module, config: TrainConfig, on_step, out: Path) -> StepLoss:
    """The micro-batches' forward and backward: one process, DDP, or FSDP (`config.parallel`; then
    `out/sharding.json` says what each rank holds, and the fused LoRA layers, which take whole base
    weights, are not used)."""
    if config.parallel == "fsdp" and distributed.world_size() > 1:
        if on_step is not None:
            raise ValueError(
                "on_step: not supported with train.parallel='fsdp' (the sharded model runs only inside "
                "the training step); use train.parallel='ddp'"
            )
        if config.fused is True:
            raise ValueError(
                "train.fused=True: the fused LoRA layers do not take FSDP-sharded base weights; use "
                "train.fused='auto' or False with train.parallel='fsdp'"
            )
        from sails_fast.models.loading import default_device

        step_loss = StepLoss(peft_model, config.loss_chunk_tokens, "fsdp", default_device())
        _write_sharding(peft_model, out)
        return step_loss
    return StepLoss(peft_model, config.loss_chunk_tokens)


def _write_sharding(peft_model: nn.Module, out: Path) -> None:
    """sharding.json: each rank's share of the frozen base (FSDP), written by rank 0."""
    from sails_fast.training.fully_sharded import shard_sizes

    ranks = distributed.gather(shard_sizes(peft_model))
    if distributed.is_main():
        record = {"parallel": "fsdp", "world_size": len(ranks), "ranks": ranks}
        (out / "sharding.json").write_text(json.dumps(record, indent=2) + "\n")


def _input_device(peft_model: nn.Module, params: list) -> torch.device:
    """Where inputs go: where the embedding lives (the first device of a model split over several)."""
    embed = peft_model.get_input_embeddings() if hasattr(peft_model, "get_input_embeddings") else None
    return embed.weight.device if embed is not None else params[0].device


def _data_order(n: int, total: int, config: TrainConfig) -> torch.Tensor:
    """The example stream: one seeded permutation per pass, as many passes as `total` steps need."""
    passes = math.ceil(total * config.batch_size * config.grad_accum_steps / n)
    g = torch.Generator().manual_seed(config.seed)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(passes)])


def _step_examples(
    encoded: list, data_order: torch.Tensor, step: int, config: TrainConfig
) -> tuple[list, int]:
    """This rank's micro-batches of optimizer step `step` (0-based), and the response tokens of the whole
    step over all ranks (the loss is a mean over them)."""
    B, A = config.batch_size, config.grad_accum_steps
    idx = data_order[step * B * A : (step + 1) * B * A].tolist()
    step_tokens = sum(len(encoded[i][0]) - encoded[i][1] for i in idx)
    mine = rank_share(idx, B, A)
    return [[encoded[i] for i in mine[k : k + B]] for k in range(0, len(mine), B)], step_tokens


def _optimizer(params: list, config: TrainConfig, total: int):
    """AdamW and its schedule: linear warmup, then cosine decay to min_lr_ratio over `total` steps."""
    warmup = config.warmup_steps(total)
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, config.min_lr_ratio)
    )
    return optimizer, scheduler


def _encode(tokenizer, pairs: list[tuple], config: TrainConfig) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) of every example; warns how many were truncated to max_length."""
    encoded, n_cut = [], 0
    for prompt, response in pairs:
        ids, n_prompt, cut = tokenize_example(
            tokenizer, prompt, response, chat_template=config.chat_template, max_length=config.max_length,
            append_eos=config.append_eos,
        )  # fmt: skip
        encoded.append((ids, n_prompt))
        n_cut += cut
    if n_cut:
        logger.warning(
            "max_length: %d of %d examples truncated to %d tokens", n_cut, len(encoded), config.max_length
        )
    return encoded


def _resume(
    peft_model, optimizer, scheduler, out: Path, config: TrainConfig, run_config: dict, fingerprint: str
) -> dict | None:
    """The newest checkpoint's state, restored into model, optimizer and scheduler (the log trimmed to
    its step); None without one (a stale log removed). Refuses checkpoints of another run (config,
    examples) and any checkpoint when resume is off. Half-written checkpoints are cleared either way."""
    ckpt_root, log_path = out / "checkpoints", out / "train_log.jsonl"
    existing = _checkpoints(ckpt_root)
    if existing and not config.resume:
        raise ValueError(
            f"out_dir: {out} already holds checkpoints of a run; set resume=True or use another out_dir"
        )
    state = None
    if existing:
        step, ckpt = existing[-1]
        state = _restore(peft_model, optimizer, scheduler, ckpt)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"out_dir: {ckpt} is not a sails_fast training checkpoint")
        if state["config"] != run_config:
            diff = {
                k: (state["config"].get(k), v) for k, v in run_config.items() if state["config"].get(k) != v
            }
            raise ValueError(f"out_dir: {out} holds a run with another config (checkpoint vs now: {diff})")
        if state["examples_fingerprint"] != fingerprint:
            raise ValueError(f"out_dir: {out} holds a run over other examples (or another tokenizer)")
        if distributed.is_main():
            _trim_log(log_path, int(state["step"]))
    elif log_path.exists() and distributed.is_main():
        log_path.unlink()
    stale_dirs = ckpt_root.glob(".tmp-step-*") if ckpt_root.is_dir() and distributed.is_main() else []
    for stale in stale_dirs:
        shutil.rmtree(stale, ignore_errors=True)
    return state


def _fuse(peft_model: nn.Module, config: TrainConfig, out: Path) -> str | None:
    """Route the LoRA layers through the fused ops when the config asks (fuse_report.json says which)."""
    if not uses_fused_layers(config, peft_model):
        return None
    from sails_fast.integrations.peft import fuse_lora

    report = fuse_lora(peft_model, backend=config.backend)
    if distributed.is_main():
        (out / "fuse_report.json").write_text(
            json.dumps({"fused": report.fused, "skipped": report.skipped}, indent=2) + "\n"
        )
    if report.skipped:
        logger.warning("fuse_lora left %d LoRA layer(s) on PEFT's path:\n%s", len(report.skipped), report)
    return str(report)


def _enable_checkpointing(base: nn.Module, config: TrainConfig) -> bool:
    """Turn gradient checkpointing on when asked and not on already; whether this call turned it on."""
    flag = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else None
    already = bool(getattr(base, flag or "is_gradient_checkpointing", False))
    if config.gradient_checkpointing and not already:
        _set_checkpointing(base, True)
        return True
    return False


def _optimizer_step(
    step_loss: StepLoss, micro, n_tok: int, pad_id, device, params, config, optimizer, scheduler
) -> dict:
    """One optimizer step over this rank's micro-batches (gradients accumulated, and synchronised over the
    ranks; the loss a mean over the `n_tok` response tokens of the whole step); the log record
    {loss, lr, grad_norm, tokens}."""
    lr = optimizer.param_groups[0]["lr"]
    loss_sum = 0.0
    for k, mb in enumerate(micro):
        batch = [t.to(device) for t in sft_batch(mb, pad_id)]
        loss_sum += step_loss.backward(batch, n_tok, last=k == len(micro) - 1)
    loss_sum = distributed.all_sum(loss_sum)
    if config.max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum / n_tok, "lr": lr, "grad_norm": grad_norm, "tokens": n_tok}


def _save_adapter(peft_model: nn.Module, out: Path) -> Path:
    """The final adapter, written to a temporary folder and renamed into place (never half-written)."""
    adapter_dir = out / "adapter"
    tmp = out / f".tmp-adapter-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    peft_model.save_pretrained(str(tmp))
    _fsync_dir(tmp)
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    os.replace(tmp, adapter_dir)
    return adapter_dir
