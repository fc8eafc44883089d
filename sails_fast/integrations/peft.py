"""Route PEFT LoRA layers through sails_fast's fused kernels, in place and reversibly.

`fuse_lora(model)` replaces the `forward` of each eligible PEFT LoRA layer *instance* with one that calls
the fused op; parameters, module names and state-dict keys are untouched, so `save_pretrained` still
writes a standard PEFT checkpoint and `unfuse_lora` restores PEFT's own forward. A fused layer checks its
state on every call and falls back to PEFT's forward when something changed since fusing (adapters
disabled, merged, another adapter activated, mixed-batch `adapter_names`).

The fused forward is a module-level function bound to the layer, and the fallback is the layer class's
own `forward`: nothing refers to the layer that was fused, so `copy.deepcopy` of a fused model (trl's
reference models, EMA copies) gives a copy that runs, and falls back, on its own weights.

Other layer types register a handler with `register_fuser`; `sails_fast.integrations.bnb` adds PEFT's
`lora.bnb.Linear4bit` this way.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sails_fast.integrations.peft_layers import adapter_tensors, common_reason_not_fusable

# in a fused layer's __dict__: the options it was fused with ({"backend": ..., "strategy": ...})
_FUSED = "_sails_fast_fused"


@dataclass
class FuseReport:
    """What `fuse_lora` did: fused module names, and the LoRA layers left alone with the reason."""

    fused: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} LoRA layer(s), left {len(self.skipped)} alone"]
        lines += [f"  {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


@dataclass
class _Fuser:
    """How to fuse one PEFT layer class: why a layer cannot be fused (or None), and the fused computation
    `call(layer, x, backend=..., strategy=...)`."""

    layer_type: type
    reason_not_fusable: Callable[[nn.Module], str | None]
    call: Callable[..., torch.Tensor]


_FUSERS: list[_Fuser] = []


def register_fuser(
    layer_type: type,
    reason_not_fusable: Callable[[nn.Module], str | None],
    call: Callable[..., torch.Tensor],
) -> None:
    """Teach `fuse_lora` a new PEFT layer type (later registrations win over earlier ones)."""
    _FUSERS.insert(0, _Fuser(layer_type, reason_not_fusable, call))


def _linear_reason(module: nn.Module) -> str | None:
    reason = common_reason_not_fusable(module)
    if reason:
        return reason
    base = module.get_base_layer()
    if type(base) is not nn.Linear:
        return f"base layer is {type(base).__name__}, not nn.Linear"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D-style weights) is not fused"
    return None


def _linear_call(module: nn.Module, x: torch.Tensor, backend: str, strategy: str) -> torch.Tensor:
    from sails_fast.fused.lora import lora_linear

    base = module.get_base_layer()
    lora_A, lora_B, scaling, p = adapter_tensors(module, x)
    return lora_linear(
        x, base.weight, lora_A, lora_B, scaling, base.bias, p, backend=backend, strategy=strategy
    )


def _fused_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A fused layer's forward: the fused op, or the layer class's own forward when the layer's state
    (or the call) is one the fused path does not handle. Bound to the layer; refers to nothing else."""
    fuser = _find_fuser(self)
    if args or kwargs or fuser is None or fuser.reason_not_fusable(self) is not None:
        return type(self).forward(self, x, *args, **kwargs)
    return fuser.call(self, x, **self.__dict__[_FUSED])


def _register_builtin() -> None:
    from peft.tuners.lora import layer as lora_layer

    register_fuser(lora_layer.Linear, _linear_reason, _linear_call)
    import importlib.util

    # PEFT's lora.bnb.Linear4bit (QLoRA): only where bitsandbytes is installed
    if importlib.util.find_spec("bitsandbytes") is not None:
        from sails_fast.integrations.bnb import linear4bit_fuser

        fuser = linear4bit_fuser()
        if fuser is not None and not any(f.layer_type is fuser[0] for f in _FUSERS):
            register_fuser(*fuser)


def _find_fuser(module: nn.Module) -> _Fuser | None:
    if not _FUSERS:
        _register_builtin()
    for fuser in _FUSERS:
        if isinstance(module, fuser.layer_type):
            return fuser
    return None


def fuse_lora(model: nn.Module, *, backend: str = "auto", strategy: str = "auto") -> FuseReport:
    """Route every eligible PEFT LoRA layer of `model` through the fused kernels, in place.

    Args:
        model: a PEFT model (or any module containing PEFT LoRA layers).
        backend: the fused op's backend: "auto", "triton" or "torch" (see `sails_fast.lora_linear`).
        strategy: the fused op's strategy: "auto", "fused" or "cublas" ("dequant" too for 4-bit layers).
    Returns:
        FuseReport with the fused module names and, for every LoRA layer left alone, why. Warns when
        nothing was fused.

    Example:
        >>> peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
        >>> report = fuse_lora(peft_model); print(report)
    """
    from peft.tuners.lora.layer import LoraLayer

    from sails_fast.fused.backend import BACKENDS
    from sails_fast.fused.strategy import STRATEGIES

    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module (a PEFT model), got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    allowed = ("auto", *dict.fromkeys(STRATEGIES["lora_linear"] + STRATEGIES["qlora_linear"]))
    if strategy not in allowed:
        raise ValueError(f"strategy: expected one of {allowed}, got {strategy!r}")
    report = FuseReport()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        fuser = _find_fuser(module)
        if fuser is None:
            report.skipped[name] = f"{type(module).__name__} has no fused path"
            continue
        reason = fuser.reason_not_fusable(module)
        if reason is None and strategy == "dequant" and fuser.call is _linear_call:
            reason = 'strategy "dequant" is for 4-bit layers only'
        if reason is not None:
            report.skipped[name] = reason
            continue
        module.__dict__[_FUSED] = {"backend": backend, "strategy": strategy}
        module.forward = types.MethodType(_fused_forward, module)
        report.fused.append(name)
    if not report.fused:
        why = (
            f": {len(report.skipped)} LoRA layer(s) left alone"
            if report.skipped
            else ": it has no PEFT LoRA layer"
        )
        warnings.warn(
            f"fuse_lora fused nothing in {type(model).__name__}{why} (see the returned report)", stacklevel=2
        )
    return report


def unfuse_lora(model: nn.Module) -> int:
    """Undo `fuse_lora`: restore PEFT's forward on every fused layer. Returns how many were restored."""
    restored = 0
    for module in model.modules():
        if _FUSED in module.__dict__:
            del module.__dict__["forward"]
            del module.__dict__[_FUSED]
            restored += 1
    return restored


def is_fused(model: nn.Module) -> bool:
    """Whether any layer of `model` runs through the fused kernels (fused by `fuse_lora`)."""
    return any(_FUSED in module.__dict__ for module in model.modules())
