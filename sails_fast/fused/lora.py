"""The fused LoRA linear: public function and nn.Module.

The registered operator with its autograd is `sails_fast.fused.custom_ops` (torch.library:
`torch.compile` keeps it whole); kernels and launchers live in `sails_fast.kernels.lora` and `lora_rank`;
the plain reference in `sails_fast.kernels.lora_ref`, which is also the CPU backend.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from sails_fast.fused import strategy as strategies
from sails_fast.fused.backend import Backend, resolve_backend
from sails_fast.fused.custom_ops import seed_tensor
from sails_fast.kernels.lora_ref import lora_linear_ref

Strategy = Literal["auto", "fused", "cublas"]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matrix products in on this device type, or None when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_cast(dtype: torch.dtype | None, *tensors: torch.Tensor | None) -> tuple:
    """The tensors in autocast's dtype (differentiable casts, so fp32 parameters get fp32 gradients),
    as autocast does for the F.linear calls of PEFT's layer; unchanged when autocast is off."""
    if dtype is None:
        return tensors
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def validate_lora_args(
    x: torch.Tensor,
    in_features: int,
    out_features: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    bias: torch.Tensor | None,
    dropout_p: float,
    tensors: dict[str, torch.Tensor],
) -> None:
    """Shared argument checks of lora_linear and qlora_linear; each error names the argument."""
    for name, t in tensors.items():
        _check_float(name, t)
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, but x is on {x.device}; move them to one device")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"x: expected last dimension {in_features} (the weight's in_features), got {list(x.shape)}"
        )
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A: expected shape [r, {in_features}], got {list(lora_A.shape)}")
    if lora_B.dim() != 2 or lora_B.shape[0] != out_features:
        raise ValueError(f"lora_B: expected shape [{out_features}, r], got {list(lora_B.shape)}")
    if lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(
            f"lora_B: rank {lora_B.shape[1]} does not match lora_A's rank {lora_A.shape[0]} "
            f"(lora_A [r, in], lora_B [out, r])"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias: expected shape [{out_features}], got {list(bias.shape)}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    backend: Backend = "auto",
    seed: int | None = None,
    strategy: Strategy = "auto",
) -> torch.Tensor:
    """Fused LoRA linear, PEFT's lora.Linear math in one pass over the output:

        y = x @ weight^T + bias + scaling * (dropout(x) @ lora_A^T) @ lora_B^T

    Args:
        x: [..., in], fp32 / fp16 / bf16.
        weight: [out, in], same dtype as x. Gets a gradient only if it requires one.
        lora_A: [r, in]; lora_B: [out, r]; any float dtype (read in x's dtype, gradients in their own).
        scaling: alpha / r (PEFT) or alpha / sqrt(r) (rsLoRA).
        bias: [out] or None.
        dropout_p: dropout on the adapter input, in [0, 1). The Triton path regenerates the mask from a
            seed in the backward instead of storing it.
        backend: "triton", "torch" (the plain reference) or "auto" (Triton for CUDA tensors or under
            TRITON_INTERPRET=1, else the reference).
        seed: dropout seed for the Triton path; drawn from torch's generator when None.
        strategy: how the Triton path runs the two big GEMMs (x W^T forward, dy W backward): "fused"
            (Triton GEMMs with the rank-r term in their epilogue: no extra [M, out] pass), "cublas"
            (torch's GEMM, cuBLAS on a GPU, accumulating into a buffer a Triton kernel filled with the
            rank-r term: one extra write of [M, out] and of [M, in]) or "auto" (the measured choice for
            this GPU and shape in `sails_fast/fused/strategy_table.json`, else the roofline model's; see
            `sails_fast.fused.strategy`). The rank-r passes, saved tensors and dropout are the same either
            way.
    Returns:
        [..., out] in x's dtype.

    Example:
        >>> x = torch.randn(4, 32); w = torch.randn(64, 32)
        >>> a = torch.randn(8, 32); b = torch.zeros(64, 8)
        >>> y = lora_linear(x, w, a, b, scaling=2.0)   # equals x @ w.T while b is zero
    """
    out_features, in_features = weight.shape if weight.dim() == 2 else (-1, -1)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape [out, in], got {list(weight.shape)}")
    # under autocast every matrix product of PEFT's layer runs in autocast's dtype: so does ours
    x, weight, lora_A, lora_B, bias = autocast_cast(
        autocast_dtype(x.device.type), x, weight, lora_A, lora_B, bias
    )
    tensors = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        tensors["bias"] = bias
    validate_lora_args(x, in_features, out_features, lora_A, lora_B, bias, dropout_p, tensors)
    if weight.dtype != x.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} does not match x's dtype {x.dtype}")
    strategies.check_strategy("lora_linear", strategy)

    if resolve_backend(backend, x) == "torch" or x.numel() == 0:
        return lora_linear_ref(x, weight, lora_A, lora_B, scaling, bias, dropout_p)

    x2d = x.reshape(-1, in_features)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    y, _ = torch.ops.sails_fast.lora_linear(
        x2d,
        weight,
        lora_A,
        lora_B,
        bias,
        float(scaling),
        float(dropout_p),
        seed_tensor(seed, dropout_p),
        strategy,
    )
    return y.reshape(*x.shape[:-1], out_features)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if r <= 0:
        raise ValueError(f"r: expected a positive rank, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class FusedLoraLinear(nn.Module):
    """An nn.Linear with a LoRA adapter, computed by the fused kernel.

    Args:
        base: the nn.Linear to adapt; its weight and bias are shared, not copied, and frozen unless
            `train_base=True`.
        r: adapter rank. alpha: PEFT's lora_alpha (default r, i.e. scaling 1).
        dropout: dropout on the adapter input, applied in training mode only.
        use_rslora: scaling alpha / sqrt(r) instead of alpha / r.
        backend, strategy: see `lora_linear`.

    Example:
        >>> layer = FusedLoraLinear(nn.Linear(576, 1536), r=16, alpha=32)
        >>> y = layer(torch.randn(2, 7, 576))
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        backend: Backend = "auto",
        train_base: bool = False,
        strategy: Strategy = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base: expected an nn.Linear, got {type(base).__name__}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a float in [0, 1), got {dropout!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.scaling = lora_scaling(r, self.alpha, use_rslora)
        self.dropout = float(dropout)
        strategies.check_strategy("lora_linear", strategy)
        self.backend, self.strategy = backend, strategy
        self.weight = base.weight
        self.bias = base.bias
        if not train_base:
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A Kaiming-uniform (a = sqrt(5)), B = 0, so the layer starts as the base."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        return lora_linear(
            x, self.weight, self.lora_A, self.lora_B, self.scaling, self.bias, p,
            backend=self.backend, strategy=self.strategy,
        )  # fmt: skip

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear with the adapter folded in: W + scaling * B @ A."""
        merged = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        merged = merged.to(device=self.weight.device, dtype=self.weight.dtype)
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())
        merged.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        if self.bias is not None:
            merged.bias.copy_(self.bias)
        return merged

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, dropout={self.dropout}, bias={self.bias is not None}, "
            f"backend={self.backend!r}, strategy={self.strategy!r}"
        )
