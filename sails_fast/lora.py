"""The fused LoRA linear: autograd Function, public function and nn.Module.

Kernels and launchers live in `sails_fast.kernels.lora`; the plain reference in
`sails_fast.kernels.lora_ref`, which is also the CPU backend.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch
from torch import nn

from . import strategy as strategies
from ._backend import resolve_backend
from .kernels.lora_ref import lora_linear_ref

Backend = Literal["auto", "triton", "torch"]
Strategy = Literal["auto", "fused", "cublas"]


def _draw_seed() -> int:
    # drawn from torch's default generator, so torch.manual_seed makes dropout reproducible
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


class LoraLinearFunction(torch.autograd.Function):
    """Saves x, the adapters, xa [M, r] (x's dtype) and the dropout seed; nothing of size [M, out].

    `strategy` is "fused" (Triton GEMMs with the rank-r term in their epilogue) or "cublas" (torch's GEMM
    accumulating into a buffer a Triton kernel filled with the rank-r term); the rank-r passes are the
    same Triton kernels either way.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, strategy):
        from .kernels import lora as K
        from .kernels.lora_rank import rank_projection

        xa = rank_projection(x, lora_A, dropout_p, seed)
        forward = K.lora_forward if strategy == "fused" else K.lora_forward_cublas
        y = forward(x, weight, xa, lora_B, scaling, bias)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.strategy = scaling, dropout_p, seed, strategy
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        from .kernels import lora as K

        x, weight, lora_A, lora_B, xa = ctx.saved_tensors
        dy = dy.contiguous()
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        backward_dx = K.lora_backward_dx if ctx.strategy == "fused" else K.lora_backward_dx_cublas
        dx, da, db = lora_input_and_adapter_grads(
            dy, x, xa, lora_A, lora_B, ctx.scaling, ctx.dropout_p, ctx.seed, (need_x, need_a, need_b),
            partial(backward_dx, weight=weight),
        )  # fmt: skip
        dw = dbias = None
        if need_w:
            # only for a trainable base: a plain GEMM, computed in fp32 accumulation by cuBLAS
            dw = (dy.t() @ x).to(weight.dtype)
        if need_bias and ctx.has_bias:
            dbias = dy.sum(0, dtype=torch.float32)
        return dx, dw, da, db, dbias, None, None, None, None


def lora_input_and_adapter_grads(dy, x, xa, lora_A, lora_B, scaling, dropout_p, seed, needs, backward_dx):
    """(dx, dA, dB), each None where not needed: the backward shared by the dense and the 4-bit layer.

    g = dy @ B and dB come from one read of dy; dx = `backward_dx(dy, g=..., lora_A=..., ...)` (the
    strategy's base GEMM with the rank-r term); dA = scaling * g^T @ dropout(x).
    """
    from .kernels.lora_rank import dy_projections, lora_weight_grad

    need_x, need_a, need_b = needs
    dx = da = db = None
    if need_x or need_a or need_b:
        g, db = dy_projections(dy, lora_B, xa, scaling)  # [M, r] in dy's dtype, [out, r] fp32
        db = db.to(lora_B.dtype) if need_b else None
        if need_x:
            dx = backward_dx(dy, g=g, lora_A=lora_A, scaling=scaling, dropout_p=dropout_p, seed=seed)
        if need_a:
            da = lora_weight_grad(g, x, scaling, dropout_p, seed).to(lora_A.dtype)  # [r, in]
    return dx, da, db


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
            this GPU and shape in `sails_fast/strategy_table.json`, else the roofline model's; see
            `sails_fast.strategy`). The rank-r passes, saved tensors and dropout are the same either way.
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
    tensors = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        tensors["bias"] = bias
    validate_lora_args(x, in_features, out_features, lora_A, lora_B, bias, dropout_p, tensors)
    if weight.dtype != x.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} does not match x's dtype {x.dtype}")
    strategies.check_strategy("lora_linear", strategy)

    if resolve_backend(backend, x) == "torch" or x.numel() == 0:
        return lora_linear_ref(x, weight, lora_A, lora_B, scaling, bias, dropout_p)

    if dropout_p > 0.0 and seed is None:
        seed = _draw_seed()
    x2d = x.reshape(-1, in_features)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    if strategy == "auto":
        shape = {"M": x2d.shape[0], "K": in_features, "N": out_features, "R": lora_A.shape[0]}
        strategy = strategies.choose("lora_linear", x.device, **shape)
    y = LoraLinearFunction.apply(
        x2d, weight, lora_A, lora_B, bias, float(scaling), float(dropout_p), seed or 0, strategy
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
