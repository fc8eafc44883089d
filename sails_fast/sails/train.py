"""Supervised fine-tuning of the LoRA adapters on the aligned responses (METHOD.md step 6), QLoRA-style.

`train` runs AdamW with linear warmup and a cosine decay, gradient accumulation and optional gradient
checkpointing, with the loss on response tokens only. Every `save_every` optimizer steps it writes a
checkpoint atomically (adapter weights, optimizer, scheduler, RNG states, step, data order; safetensors and
`torch.save` of tensors and plain containers only, so everything loads with `weights_only=True`). Run again
on the same `out_dir` after a kill and it continues the same run to the same final weights. The trained
adapter is a standard PEFT checkpoint (`PeftModel.from_pretrained` loads it).

`load_base_4bit` loads a base model in 4-bit NF4 through transformers' BitsAndBytesConfig and prepares it
for k-bit training; with `TrainConfig.fused` the LoRA layers go through `sails_fast.integrations.peft.
fuse_lora` (layers it cannot fuse keep PEFT's forward, and are listed in the log).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .._config import ConfigBase
from .collect import tokenize_example

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "sails_fast.train_checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
# fields that do not change the numbers a run produces: may differ between a run and its resumption
_RESUME_FREE = ("progress", "keep_checkpoints", "log_every", "save_every", "resume")


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
        save_every: write a checkpoint every N optimizer steps (0: only the final adapter).
        keep_checkpoints: how many of the newest checkpoints to keep.
        log_every: log every N steps (the last step is always logged).
        seed: data order and dropout.
        fused: route the LoRA layers through sails_fast's fused kernels (`fuse_lora`): True, False, or
            "auto" (default): on a GPU, where they pay; on CPU the fused op's backend would be the plain
            reference, which gains nothing over PEFT's own path, so PEFT's path is kept there.
        backend: passed to `fuse_lora` ("auto", "triton", "torch").
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
    save_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    fused: bool | Literal["auto"] = "auto"
    backend: Literal["auto", "triton", "torch"] = "auto"
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


# ----- data


def _sft_examples(examples: Sequence) -> list[tuple[Any, str]]:
    """(prompt, aligned response) from ContrastivePair records or (prompt, response) tuples."""
    if examples is None or len(examples) == 0:
        raise ValueError("examples: expected at least one training example, got none")
    out = []
    for i, ex in enumerate(examples):
        if hasattr(ex, "aligned") and hasattr(ex, "prompt"):
            out.append((ex, ex.aligned))
        elif isinstance(ex, (tuple, list)) and len(ex) == 2 and all(isinstance(t, str) for t in ex):
            out.append((ex[0], ex[1]))
        else:
            raise ValueError(
                f"examples[{i}]: expected a ContrastivePair or a (prompt, response) pair of strings, "
                f"got {type(ex).__name__}"
            )
        if not isinstance(out[-1][1], str) or not out[-1][1].strip():
            raise ValueError(f"examples[{i}]: the aligned response is empty")
    return out


def _fingerprint(encoded: list[tuple[list[int], int]]) -> str:
    h = hashlib.sha256()
    for ids, n_prompt in encoded:
        h.update(json.dumps([n_prompt, ids]).encode())
    return h.hexdigest()


def sft_batch(encoded: Sequence[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded input_ids, attention_mask and labels (-100 on prompt and padding tokens).

    Args:
        encoded: (ids, n_prompt) per example, as `tokenize_example` returns them.
        pad_id: the id written into padding positions.

    Returns:
        input_ids [B, S] int64, attention_mask [B, S] int64, labels [B, S] int64 (= input_ids on response
        tokens, -100 elsewhere; the shift for next-token prediction happens in `response_loss`).

    Example:
        >>> ids, mask, labels = sft_batch([tokenize_example(tok, "hi", "hello", ...)[:2]], tok.pad_token_id)
    """
    S = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), S), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for b, (ids, n_prompt) in enumerate(encoded):
        t = torch.tensor(ids)
        input_ids[b, : len(ids)] = t
        mask[b, : len(ids)] = 1
        labels[b, n_prompt : len(ids)] = t[n_prompt:]
    return input_ids, mask, labels


def response_loss(model: nn.Module, input_ids, attention_mask, labels) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the response tokens, and how many there are.

    Args:
        model: a causal LM returning `.logits` [B, S, V].
        input_ids, attention_mask, labels: [B, S] from `sft_batch`.

    Returns:
        (loss_sum, n_tokens): fp32 scalar with gradient, int. Position t predicts token t + 1, so a label at
        t + 1 is scored from the logits at t; prompt and padding positions (-100) are ignored.

    Example:
        >>> loss_sum, n = response_loss(model, *sft_batch(encoded, pad_id)); (loss_sum / n).backward()
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    target = labels[:, 1:]
    keep = target != -100
    # only the response positions are upcast and scored: [n_tokens, V], not [B, S, V], in fp32
    loss = F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="sum")
    return loss, int(keep.sum())


# ----- checkpoints


def _fsync_dir(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict:
    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place, so complete by construction), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "state.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _save_checkpoint(model, optimizer, scheduler, ckpt_root: Path, step: int, state: dict, keep: int) -> Path:
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    torch.save(state, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(
        json.dumps({k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}, indent=2) + "\n"
    )
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    # a directory rename is atomic: a reader sees the whole checkpoint or none
    os.replace(tmp, final)
    for _, old in _checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load(path: Path, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several error types for a damaged file
        raise ValueError(f"out_dir: checkpoint file {path} is unreadable ({what}: {err})") from err


def _restore(model, optimizer, scheduler, ckpt: Path) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = ckpt / "adapter_model.safetensors"
    try:
        adapter = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"out_dir: checkpoint file {weights} is unreadable ({err})") from err
    result = set_peft_model_state_dict(model, adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(
            f"out_dir: checkpoint {ckpt} holds adapter weights this model lacks: {unexpected[:3]}"
        )
    optimizer.load_state_dict(_load(ckpt / "optimizer.pt", "optimizer"))
    scheduler.load_state_dict(_load(ckpt / "scheduler.pt", "scheduler"))
    _set_rng_state(_load(ckpt / "rng.pt", "rng"))
    return _load(ckpt / "state.pt", "state")


def _trim_log(log_path: Path, step: int) -> None:
    """Drop log lines past the resumed step (a killed run may have logged steps it never saved)."""
    if not log_path.exists():
        return
    keep = []
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    tmp = log_path.with_name(log_path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(log_path)


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
    pairs = _sft_examples(examples)
    params = _trainable(peft_model)
    pad_id = next(
        (int(v) for v in (tokenizer.pad_token_id, tokenizer.eos_token_id) if v is not None), 0
    )  # fmt: skip

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
    fingerprint = _fingerprint(encoded)

    N, B, A = len(encoded), config.batch_size, config.grad_accum_steps
    total = config.total_steps(N)
    warmup = config.warmup_steps(total)
    # the example stream: one seeded permutation per pass, as many passes as the steps need
    passes = math.ceil(total * B * A / N)
    g = torch.Generator().manual_seed(config.seed)
    data_order = torch.cat([torch.randperm(N, generator=g) for _ in range(passes)])

    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, config.min_lr_ratio)
    )

    run_config = {k: v for k, v in config.to_dict().items() if k not in _RESUME_FREE}
    existing = _checkpoints(ckpt_root)
    start, resumed_from, final_loss = 0, None, None
    if existing and not config.resume:
        raise ValueError(
            f"out_dir: {out} already holds checkpoints of a run; set resume=True or use another out_dir"
        )
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
        data_order = state["data_order"]
        start, resumed_from = int(state["step"]), int(state["step"])
        final_loss = state.get("last_loss")
        _trim_log(log_path, start)
    elif log_path.exists():
        log_path.unlink()
    for stale in ckpt_root.glob(".tmp-step-*") if ckpt_root.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
    (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    fuse_text = None
    if uses_fused_layers(config, peft_model):
        from ..integrations.peft import fuse_lora

        report = fuse_lora(peft_model, backend=config.backend)
        fuse_text = str(report)
        (out / "fuse_report.json").write_text(
            json.dumps({"fused": report.fused, "skipped": report.skipped}, indent=2) + "\n"
        )
        if report.skipped:
            logger.warning("fuse_lora left %d LoRA layer(s) on PEFT's path:\n%s", len(report.skipped), report)

    enabled_ckpt = False
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    flag = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else None
    already = bool(getattr(base, flag or "is_gradient_checkpointing", False))
    if config.gradient_checkpointing and not already:
        _set_checkpointing(base, True)
        enabled_ckpt = True
    was_training = peft_model.training
    peft_model.train()
    # inputs go where the embedding lives (the first device of a model split over several)
    embed = peft_model.get_input_embeddings() if hasattr(peft_model, "get_input_embeddings") else None
    device = embed.weight.device if embed is not None else params[0].device
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not config.progress)
    try:
        with log_path.open("a") as log:
            for step in range(start, total):
                idx = data_order[step * B * A : (step + 1) * B * A].tolist()
                micro = [[encoded[i] for i in idx[k : k + B]] for k in range(0, len(idx), B)]
                n_tok = sum(len(ids) - n_prompt for mb in micro for ids, n_prompt in mb)
                lr = optimizer.param_groups[0]["lr"]
                step_loss = 0.0
                for mb in micro:
                    batch = [t.to(device) for t in sft_batch(mb, pad_id)]
                    loss_sum, _ = response_loss(peft_model, *batch)
                    (loss_sum / n_tok).backward()
                    step_loss += loss_sum.item()
                if config.max_grad_norm is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
                else:
                    grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                final_loss = step_loss / n_tok
                done = step + 1
                if done % config.log_every == 0 or done == total:
                    rec = {
                        "step": done,
                        "loss": final_loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens": n_tok,
                        "epoch": done * B * A / N,
                    }
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{final_loss:.4f}")
                if on_step is not None:
                    on_step(done, peft_model)
                    peft_model.train()
                # the last step is saved too, so a finished run re-run on its out_dir returns at once
                if config.save_every and (done % config.save_every == 0 or done == total):
                    state = {
                        "format": CHECKPOINT_FORMAT,
                        "step": done,
                        "total_steps": total,
                        "config": run_config,
                        "examples_fingerprint": fingerprint,
                        "data_order": data_order,
                        "last_loss": final_loss,
                    }
                    _save_checkpoint(
                        peft_model, optimizer, scheduler, ckpt_root, done, state, config.keep_checkpoints
                    )
    finally:
        bar.close()
        peft_model.train(was_training)
        if enabled_ckpt:
            _set_checkpointing(base, False)

    adapter_dir = out / "adapter"
    tmp = out / f".tmp-adapter-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    peft_model.save_pretrained(str(tmp))
    _fsync_dir(tmp)
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    os.replace(tmp, adapter_dir)
    return TrainResult(adapter_dir, total, final_loss, log_path, resumed_from, fuse_text)


def load_base_4bit(
    model_name_or_path: str | Path,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    gradient_checkpointing: bool = False,
    device_map: str | dict | None = None,
) -> nn.Module:
    """Load a causal LM with its linear layers in 4-bit NF4 (bitsandbytes) and prepare it for QLoRA.

    Args:
        model_name_or_path: a hub id or a local folder (transformers' AutoModelForCausalLM).
        compute_dtype: dtype of the dequantised matmuls (bf16 on GPU; fp32 on CPU is the safe choice).
        double_quant: quantise the per-block absmax too (~0.37 bit/param saved).
        gradient_checkpointing: passed to peft.prepare_model_for_kbit_training.
        device_map: where the weights go (None: "cuda" when available, else "cpu").

    Returns:
        nn.Module: the model with bitsandbytes Linear4bit layers, frozen, ready for get_peft_model.

    Example:
        >>> base = load_base_4bit("HuggingFaceTB/SmolLM2-135M-Instruct", compute_dtype=torch.float32)
        >>> peft_model = get_peft_model(base, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError("load_base_4bit needs bitsandbytes: pip install 'sails_fast[bnb]'") from err
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if device_map is None:
        device_map = "cuda" if torch.cuda.is_available() else "cpu"
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        str(model_name_or_path), quantization_config=quant, device_map=device_map, dtype=compute_dtype
    )
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
    )
