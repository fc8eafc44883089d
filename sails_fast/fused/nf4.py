"""NF4 weights (bitsandbytes' format, bit for bit) and the QLoRA linear: public functions and nn.Modules
(the registered operator with its autograd is `sails_fast.fused.custom_ops`).

Kernels and launchers live in `sails_fast.kernels.nf4` (the LoRA pieces in `sails_fast.kernels.lora`); the
plain reference in `sails_fast.kernels.nf4_ref`, which is also the CPU backend. Format: docs/nf4.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from sails_fast.fused import strategy as strategies
from sails_fast.fused.backend import resolve_backend
from sails_fast.fused.custom_ops import nf4_op_args, seed_tensor
from sails_fast.fused.lora import Backend, autocast_cast, autocast_dtype, lora_scaling, validate_lora_args
from sails_fast.fused.nf4_weight import NF4Weight, _check_float_dtype, _check_nf4, quantize_nf4
from sails_fast.kernels.nf4_ref import (
    qlora_linear_ref,
)

QLoraStrategy = Literal["auto", "fused", "dequant", "cublas"]


def _resolve_strategy(strategy: str, path: str | None) -> str:
    """`path` is the old name of `strategy` (before the cuBLAS strategy); it still works, with a warning."""
    if path is not None:
        warnings.warn("qlora: `path` is now `strategy`", DeprecationWarning, stacklevel=3)
        if strategy != "auto":
            raise ValueError("path: give `strategy` only (`path` is its old name)")
        strategy = path
    strategies.check_strategy("qlora_linear", strategy)
    return strategy


def qlora_linear(
    x: torch.Tensor,
    nf4: NF4Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    backend: Backend = "auto",
    seed: int | None = None,
    strategy: QLoraStrategy = "auto",
    path: str | None = None,
) -> torch.Tensor:
    """QLoRA linear: PEFT's lora.bnb.Linear4bit math with the frozen base in NF4.

        y = x @ W^T + bias + scaling * (dropout(x) @ lora_A^T) @ lora_B^T,
        W = dequantize_nf4(nf4, nf4.dtype).to(x.dtype)

    Args:
        x: [..., in], fp32 / fp16 / bf16 (the compute dtype).
        nf4: NF4Weight of shape [out, in]. Never gets a gradient.
        lora_A: [r, in]; lora_B: [out, r]; any float dtype (read in x's dtype, gradients in their own).
        scaling: alpha / r (or alpha / sqrt(r) with rsLoRA).
        bias: [out] or None (a gradient only if it requires one).
        dropout_p: dropout on the adapter input, in [0, 1); the Triton path regenerates the mask from a
            seed in the backward.
        backend: "triton", "torch" (the reference) or "auto" (Triton for CUDA tensors or under
            TRITON_INTERPRET=1, else the reference).
        seed: dropout seed of the Triton path; drawn from torch's generator when None.
        strategy: "fused" (W dequantised tile by tile inside the Triton GEMMs), "dequant" (W dequantised
            once into a reused buffer, then the fused dense LoRA kernels), "cublas" (dequantised once,
            then torch's GEMM accumulating into the buffer a Triton kernel filled with the rank-r term)
            or "auto" (measured table, else the roofline model: `sails_fast.fused.strategy`). All give the
            same W. `path` is the old name of this argument.
    Returns:
        [..., out] in x's dtype.

    Example:
        >>> nf4 = quantize_nf4(torch.randn(64, 32))
        >>> a = torch.randn(8, 32, requires_grad=True); b = torch.zeros(64, 8, requires_grad=True)
        >>> y = qlora_linear(torch.randn(4, 32), nf4, a, b, scaling=2.0)   # [4, 64]
    """
    _check_nf4(nf4)
    if len(nf4.shape) != 2:
        raise ValueError(f"nf4: expected a weight of shape [out, in], got {list(nf4.shape)}")
    out_features, in_features = nf4.shape
    # under autocast every matrix product of PEFT's layer runs in autocast's dtype: so does ours
    x, lora_A, lora_B, bias = autocast_cast(autocast_dtype(x.device.type), x, lora_A, lora_B, bias)
    tensors = {"x": x, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        tensors["bias"] = bias
    validate_lora_args(x, in_features, out_features, lora_A, lora_B, bias, dropout_p, tensors)
    _check_float_dtype("x", x.dtype)
    if nf4.device != x.device:
        raise ValueError(f"nf4: on {nf4.device}, but x is on {x.device}; move it with nf4.to(device)")
    strategy = _resolve_strategy(strategy, path)

    if resolve_backend(backend, x, nf4.packed) == "torch" or x.numel() == 0:
        return qlora_linear_ref(x, nf4, lora_A, lora_B, scaling, bias, dropout_p)

    x2d = x.reshape(-1, in_features)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    y, _ = torch.ops.sails_fast.qlora_linear(
        x2d, *nf4_op_args(nf4), lora_A, lora_B, bias, float(scaling), float(dropout_p),
        seed_tensor(seed, dropout_p), strategy,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], out_features)


_NF4_BUFFERS = ("packed", "absmax", "nested_absmax", "nested_offset", "nested_code")


class NF4LoraLinear(nn.Module):
    """A linear layer with a frozen NF4 base weight and (for r > 0) a trainable LoRA adapter.

    The NF4 tensors are buffers (`weight_packed`, `weight_absmax`, and with double quantisation
    `weight_nested_absmax`, `weight_nested_offset`, `weight_nested_code`), so `.to(device)` and the state
    dict carry them; `nf4` gives them back as an NF4Weight. With r = 0 the layer is a frozen 4-bit linear.

    Args:
        nf4: the quantised weight, shape [out, in].
        bias: [out] or None; frozen.
        r: adapter rank (0: no adapter). alpha: PEFT's lora_alpha (default r). dropout: adapter dropout
            (training mode only). use_rslora: scaling alpha / sqrt(r).
        backend, strategy: see `qlora_linear` (`path`: the old name of `strategy`).
        adapter_dtype: dtype of lora_A / lora_B (default: the weight's original dtype).

    Example:
        >>> layer = NF4LoraLinear.from_linear(nn.Linear(576, 1536), r=16, alpha=32)
        >>> y = layer(torch.randn(2, 7, 576))
    """

    def __init__(
        self,
        nf4: NF4Weight,
        bias: torch.Tensor | None = None,
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        backend: Backend = "auto",
        strategy: QLoraStrategy = "auto",
        adapter_dtype: torch.dtype | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__()
        _check_nf4(nf4)
        if len(nf4.shape) != 2:
            raise ValueError(f"nf4: expected a weight of shape [out, in], got {list(nf4.shape)}")
        if not isinstance(r, int) or r < 0:
            raise ValueError(f"r: expected a non-negative int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a float in [0, 1), got {dropout!r}")
        strategy = _resolve_strategy(strategy, path)
        self.out_features, self.in_features = nf4.shape
        self.weight_shape, self.weight_dtype = nf4.shape, nf4.dtype
        self.blocksize, self.nested_blocksize = nf4.blocksize, nf4.nested_blocksize
        for name in _NF4_BUFFERS:
            self.register_buffer(f"weight_{name}", getattr(nf4, name))
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias: expected shape [{self.out_features}], got {list(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.bias = None
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.scaling = lora_scaling(r, self.alpha, use_rslora) if r > 0 else 0.0
        self.dropout = float(dropout)
        self.backend, self.strategy = backend, strategy
        factory = {"device": nf4.device, "dtype": adapter_dtype or nf4.dtype}
        if r > 0:
            self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
            self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
            self.reset_lora_parameters()
        else:
            self.lora_A = self.lora_B = None

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must move the NF4 tensors, never convert them: a bf16 absmax would no
        # longer be the bitsandbytes format
        kept = {n: b for n, b in self._buffers.items() if n.startswith("weight_") and b is not None}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            self._buffers[name] = original.to(self._buffers[name].device)
        return self

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, r: int = 8, *, blocksize: int = 64, double_quant: bool = True, **kwargs
    ) -> NF4LoraLinear:
        """Quantise an nn.Linear's weight to NF4 and wrap it (other arguments as the constructor's)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        nf4 = quantize_nf4(linear.weight.detach(), blocksize, double_quant)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(nf4, bias, r, **kwargs)

    @property
    def nf4(self) -> NF4Weight:
        return NF4Weight(
            self.weight_packed, self.weight_absmax, self.weight_shape, self.weight_dtype, self.blocksize,
            self.weight_nested_absmax, self.weight_nested_offset, self.weight_nested_code,
            self.nested_blocksize,
        )  # fmt: skip

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A Kaiming-uniform (a = sqrt(5)), B = 0, so the layer starts as the base."""
        if self.r > 0:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = self.lora_A, self.lora_B
        if self.r == 0:
            # no adapter: an empty rank keeps one code path (the low-rank epilogue adds zero)
            lora_A = x.new_zeros(0, self.in_features)
            lora_B = x.new_zeros(self.out_features, 0)
        p = self.dropout if (self.training and self.r > 0) else 0.0
        return qlora_linear(
            x, self.nf4, lora_A, lora_B, self.scaling, self.bias, p,
            backend=self.backend, strategy=self.strategy,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, dropout={self.dropout}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, double_quant={self.weight_nested_absmax is not None}, "
            f"backend={self.backend!r}, strategy={self.strategy!r}"
        )


def _matches(name: str, targets: Iterable[str] | None, skip: Iterable[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if targets is None:
        return leaf not in set(skip)
    return any(name == t or name.endswith("." + t) for t in targets)


def quantize_model_nf4(
    model: nn.Module,
    target_modules: Iterable[str] | None = None,
    *,
    r: int = 0,
    alpha: float | None = None,
    dropout: float = 0.0,
    blocksize: int = 64,
    double_quant: bool = True,
    backend: Backend = "auto",
    strategy: QLoraStrategy = "auto",
    skip_modules: Iterable[str] = ("lm_head",),
) -> list[str]:
    """Swap nn.Linear layers of `model` for NF4LoraLinear in place (the 4-bit path without bitsandbytes).

    Args:
        model: any module.
        target_modules: module names or name suffixes ("q_proj", "layers.0.mlp.up_proj"); None: every
            nn.Linear except those whose last name is in `skip_modules` (the output head, by default).
        r, alpha, dropout: adapter of each new layer (r = 0: frozen 4-bit linears, no adapter).
        blocksize, double_quant: NF4 format, as in `quantize_nf4`.
        backend, strategy: see `qlora_linear`.
    Returns:
        The names of the swapped modules. With r > 0 every parameter but the new adapters is frozen
        afterwards, as `peft.get_peft_model` does (embeddings, norms and the head included).

    Raises:
        ValueError naming the targets that match no nn.Linear of the model.

    Example:
        >>> names = quantize_model_nf4(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=16, alpha=32)
    """
    if target_modules is not None:
        target_modules = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        unknown = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in linears)]
        if unknown:
            raise ValueError(
                f"target_modules: {unknown} match no nn.Linear of the model (its linear layers end in "
                f"{sorted({n.rsplit('.', 1)[-1] for n in linears})[:12]})"
            )
    strategies.check_strategy("qlora_linear", strategy)
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is not nn.Linear or not _matches(name, target_modules, skip_modules):
                continue
            layer = NF4LoraLinear.from_linear(
                child, r, blocksize=blocksize, double_quant=double_quant,
                alpha=alpha, dropout=dropout, backend=backend, strategy=strategy,
            )  # fmt: skip
            setattr(parent, child_name, layer)
            swapped.append(name)
    if r > 0:
        # only the adapters train, as get_peft_model leaves it
        for param_name, param in model.named_parameters():
            param.requires_grad_(param_name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"))
    return swapped
