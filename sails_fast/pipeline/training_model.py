"""The model the adapters train on, for the pipeline's init, train and eval steps: the base (4-bit NF4 or
full precision; in host memory when FSDP will shard it), its LoRA layers initialised from the subspace, and
a whole copy with the trained adapter for evaluation after sharded training."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from sails_fast.core import distributed
from sails_fast.models.loading import default_device
from sails_fast.pipeline.config import RunConfig
from sails_fast.pipeline.state import write_json_atomic


def shards_training(config: RunConfig) -> bool:
    """Whether the training step shards its base over the ranks (train.parallel "fsdp" under torchrun)."""
    return config.sails.train.parallel == "fsdp" and distributed.world_size() > 1


def load_training_base(config: RunConfig, model_path: str, *, for_sharding: bool = False):
    """The base the adapters train on: 4-bit NF4 (bitsandbytes) or full precision, per `model.quantize`.

    `for_sharding` leaves it in host memory: FSDP moves each rank's shard to its device, so the whole base
    never lands on one."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, config.model.compute_dtype)
    if config.model.quantize == "nf4":
        from sails_fast.models.loading import load_base_4bit

        return load_base_4bit(
            model_path, compute_dtype=dtype, gradient_checkpointing=config.sails.train.gradient_checkpointing,
            device_map="cpu" if for_sharding else None,
        )  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return base if for_sharding else base.to(default_device())


def build_peft_model(config: RunConfig, model_path: str, subspace, out_dir: Path, step) -> Any:
    """The training model: base (4-bit NF4 or full precision) + LoRA initialised from the subspace.

    The init is deterministic and cheap: applied on every run, and recorded (init.json) as a step."""
    from sails_fast.lora_init.init import init_lora_from_subspace

    peft_model = _with_lora(config, model_path, for_sharding=shards_training(config))

    def make_init():
        report = init_lora_from_subspace(peft_model, subspace, config.sails.init)
        if distributed.is_main():
            write_json_atomic(out_dir / "init.json", dataclasses.asdict(report))
        return report

    load = lambda: init_lora_from_subspace(peft_model, subspace, config.sails.init)  # noqa: E731
    step("init", make_init, load, shared=True)
    return peft_model


def whole_peft_model(config: RunConfig, model_path: str, adapter_dir: Path) -> Any:
    """The training base on this rank's device with the LoRA layers holding the trained adapter."""
    import gc

    # a sharded training model is only freed by the cycle collector (FSDP's hooks refer back to it)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    peft_model = _with_lora(config, model_path)
    load_trained_adapter(peft_model, adapter_dir)
    return peft_model


def _with_lora(config: RunConfig, model_path: str, *, for_sharding: bool = False) -> Any:
    """The training base with the run's LoRA layers (as PEFT initialises them)."""
    from peft import get_peft_model

    from sails_fast.lora_init.init import make_lora_config

    base = load_training_base(config, model_path, for_sharding=for_sharding)
    return get_peft_model(base, make_lora_config(config.sails.init, rank=config.sails.subspace.rank))


def load_trained_adapter(peft_model, adapter_dir: Path):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    return adapter_dir
