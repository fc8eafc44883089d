"""Reading PEFT LoRA layers: the adapter tensors a fused call needs, and the reasons a layer cannot be fused
that every fuser shares."""

from __future__ import annotations

import torch
from torch import nn


def common_reason_not_fusable(module: nn.Module) -> str | None:
    """State that no fused path handles, whatever the base layer."""
    active = list(module.active_adapters)
    if len(active) != 1:
        return f"{len(active)} active adapters (the fused path handles exactly one)"
    name = active[0]
    if name not in module.lora_A:
        return f"active adapter {name!r} has no LoRA weights in this layer"
    if module.disable_adapters:
        return "adapters are disabled"
    if module.merged:
        return "the adapter is merged into the base weight"
    if module.use_dora.get(name, False):
        return "DoRA (weight-decomposed LoRA) is not fused"
    if name in getattr(module, "lora_variant", {}):
        return f"LoRA variant {type(module.lora_variant[name]).__name__} is not fused"
    if module.lora_bias.get(name, False):
        return "lora_bias=True is not fused"
    dropout = module.lora_dropout[name]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return f"dropout module {type(dropout).__name__} is not nn.Dropout"
    return None


def adapter_tensors(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(lora_A [r, in], lora_B [out, r], scaling, dropout_p for this call) of the single active adapter."""
    name = module.active_adapters[0]
    dropout = module.lora_dropout[name]
    p = dropout.p if (isinstance(dropout, nn.Dropout) and dropout.training) else 0.0
    return module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name]), float(p)
