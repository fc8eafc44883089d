"""bitsandbytes interop: NF4Weight <-> Params4bit / QuantState; fused QLoRA for PEFT's lora.bnb.Linear4bit.

`nf4_from_bnb` wraps bitsandbytes' tensors as they are (no copy, no re-quantisation); `nf4_to_bnb` gives
back (packed, QuantState) for bitsandbytes' own functions. `register()` teaches
`sails_fast.integrations.peft.fuse_lora` to route PEFT's `lora.bnb.Linear4bit` layers through
`sails_fast.qlora_linear`; `fuse_lora` calls it when bitsandbytes is installed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.nf4_ref import nf4_code
from ..nf4 import NF4Weight, qlora_linear
from .peft import adapter_tensors, common_reason_not_fusable, register_fuser

_CPU_PACKED_REASON = (
    "bitsandbytes repacked this weight for its CPU inference kernel (absmax rounded to bf16), which is "
    "not the NF4 layout; load the model again, and run the unfused CPU model in training mode or with "
    "gradients enabled so bitsandbytes leaves the weight alone"
)


def _quant_type_reason(quant_state) -> str | None:
    quant_type = getattr(quant_state, "quant_type", None)
    if quant_type != "nf4":
        return (
            f"quant_type is {quant_type!r}: FP4 is not NF4 (a different 4-bit code table); quantise with "
            f"bnb_4bit_quant_type='nf4'"
        )
    if getattr(quant_state, "packing_format_for_cpu", False):
        return _CPU_PACKED_REASON
    return None


def nf4_from_bnb(param: torch.Tensor, quant_state=None, *, check_code: bool = True) -> NF4Weight:
    """NF4Weight sharing the tensors of a bitsandbytes NF4 weight (see `NF4Weight.from_bnb`).

    Args:
        param: a quantised Params4bit, or the packed tensor (any quant_storage dtype, viewed as bytes).
        quant_state: its QuantState; default `param.quant_state`.
        check_code: compare the state's code table with NF4's (one small device-to-host copy).
    Returns:
        NF4Weight.
    """
    if not isinstance(param, torch.Tensor):
        raise ValueError(
            f"param: expected a bitsandbytes Params4bit or a packed tensor, got {type(param).__name__}"
        )
    if quant_state is None:
        quant_state = getattr(param, "quant_state", None)
    if quant_state is None:
        raise ValueError(
            "quant_state: the weight is not quantised (bitsandbytes quantises a Params4bit on .to(device)); "
            "pass a quantised Params4bit, or the packed tensor and its QuantState"
        )
    reason = _quant_type_reason(quant_state)
    if reason is not None:
        raise ValueError(f"quant_state: {reason}")
    if check_code and quant_state.code is not None:
        code = quant_state.code.detach().float().cpu()
        if code.numel() != 16 or not torch.equal(code, nf4_code("cpu")):
            raise ValueError("quant_state: its code table is not the NF4 table (quant_type says nf4)")
    packed = param.detach()
    if packed.dtype != torch.uint8:
        # quant_storage other than uint8 (e.g. bf16 for FSDP) holds the same bytes
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.reshape(-1, 1)
    nested = {}
    if quant_state.nested:
        state2 = quant_state.state2
        offset = quant_state.offset
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), device=packed.device)
        nested = dict(
            nested_absmax=state2.absmax, nested_offset=offset, nested_code=state2.code.float(),
            nested_blocksize=int(state2.blocksize),
        )  # fmt: skip
    return NF4Weight(
        packed, quant_state.absmax, quant_state.shape, quant_state.dtype, int(quant_state.blocksize), **nested
    )


def nf4_to_bnb(nf4: NF4Weight):
    """(packed uint8 [(n+1)//2, 1], QuantState) for bitsandbytes' dequantize_4bit / matmul_4bit."""
    from bitsandbytes.functional import QuantState

    state2 = offset = None
    if nf4.double_quant:
        state2 = QuantState(
            absmax=nf4.nested_absmax,
            code=nf4.nested_code,
            blocksize=nf4.nested_blocksize,
            dtype=torch.float32,
        )
        offset = nf4.nested_offset
    state = QuantState(
        absmax=nf4.absmax, shape=nf4.shape, code=nf4_code(nf4.device), blocksize=nf4.blocksize,
        quant_type="nf4", dtype=nf4.dtype, offset=offset, state2=state2,
    )  # fmt: skip
    return nf4.packed, state


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


def register() -> None:
    """Register the fused path for PEFT's lora.bnb.Linear4bit with `fuse_lora` (idempotent)."""
    from peft.tuners.lora import bnb as peft_bnb

    from . import peft as sf_peft

    layer_type = getattr(peft_bnb, "Linear4bit", None)
    if layer_type is None or any(f.layer_type is layer_type for f in sf_peft._FUSERS):
        return
    register_fuser(layer_type, _linear4bit_reason, _linear4bit_call)
