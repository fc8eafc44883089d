"""bitsandbytes interop: NF4Weight <-> Params4bit / QuantState; fused QLoRA for PEFT's lora.bnb.Linear4bit.

`nf4_from_bnb` wraps bitsandbytes' tensors as they are (no copy, no re-quantisation); `nf4_to_bnb` gives
back (packed, QuantState) for bitsandbytes' own functions (both live with NF4Weight in
`sails_fast.fused.nf4_weight`, re-exported here). `linear4bit_fuser()` is how
`sails_fast.integrations.peft.fuse_lora` routes PEFT's `lora.bnb.Linear4bit` layers through
`sails_fast.qlora_linear` when bitsandbytes is installed.
"""

from __future__ import annotations

import torch
from torch import nn

from sails_fast.fused.nf4 import qlora_linear
from sails_fast.fused.nf4_weight import NF4Weight, _quant_type_reason, nf4_from_bnb, nf4_to_bnb
from sails_fast.integrations.peft_layers import adapter_tensors, common_reason_not_fusable


def _linear4bit_reason(module: nn.Module) -> str | None:
    import bitsandbytes as bnb

    reason = common_reason_not_fusable(module)
    if reason:
        return reason
    base = module.get_base_layer()
    if not isinstance(base, bnb.nn.Linear4bit):
        return f"base layer is {type(base).__name__}, not bitsandbytes Linear4bit"
    quant_state = getattr(base.weight, "quant_state", None)
    if quant_state is None:
        return "the 4-bit weight is not quantised yet (bitsandbytes quantises on .to(device))"
    return _quant_type_reason(quant_state)


def _compute_dtype(base: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype bitsandbytes' Linear4bit computes in: its compute_dtype, or an fp32 / bf16 input's own."""
    if not base.compute_type_is_set and x.dtype in (torch.float32, torch.bfloat16):
        return x.dtype
    return base.compute_dtype or x.dtype


# in a fused 4-bit layer's __dict__: (key of the bitsandbytes tensors, their NF4Weight view)
_NF4_CACHE = "_sails_fast_nf4"


def _nf4_of(module: nn.Module, base: nn.Module) -> NF4Weight:
    """The layer's weight as an NF4Weight. Wrapping is cheap, but checking the code table copies to the
    host: done once per weight, cached on the layer itself (a deep copy re-checks its own tensors)."""
    weight = base.weight
    key = (weight.data_ptr(), id(weight.quant_state), weight.quant_state.absmax.data_ptr())
    cached = module.__dict__.get(_NF4_CACHE)
    if cached is None or cached[0] != key:
        cached = (key, nf4_from_bnb(weight))
        module.__dict__[_NF4_CACHE] = cached
    return cached[1]


def _linear4bit_call(module: nn.Module, x: torch.Tensor, backend: str, strategy: str) -> torch.Tensor:
    base = module.get_base_layer()
    lora_A, lora_B, scaling, p = adapter_tensors(module, x)
    compute = _compute_dtype(base, x)
    y = qlora_linear(
        x.to(compute), _nf4_of(module, base), lora_A, lora_B, scaling, base.bias, p,
        backend=backend, strategy=strategy,
    )  # fmt: skip
    return y.to(x.dtype)


def linear4bit_fuser():
    """(PEFT's lora.bnb.Linear4bit class, why a layer cannot be fused, the fused call), or None when this
    PEFT has no Linear4bit; `sails_fast.integrations.peft` registers it with `fuse_lora`."""
    from peft.tuners.lora import bnb as peft_bnb

    layer_type = getattr(peft_bnb, "Linear4bit", None)
    if layer_type is None:
        return None
    return layer_type, _linear4bit_reason, _linear4bit_call


__all__ = ["linear4bit_fuser", "nf4_from_bnb", "nf4_to_bnb"]
