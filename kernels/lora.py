"""Triton kernels and launchers for the fused LoRA linear: the two GEMMs with a rank-r epilogue.

    y = x @ W^T + bias + scaling * (dropout(x) @ A^T) @ B^T       x [M, K], W [N, K], A [R, K], B [N, R]

Strategy "fused" (docs/lora_backward.md has the derivation):
  forward   xa = dropout(x) @ A^T                      `lora_rank.rank_projection`, [M, R] in x's dtype
            y  = x @ W^T + scaling * xa @ B^T + bias   `_lora_fwd_kernel`, low-rank term in the epilogue
  backward  g, dB = dy @ B, scaling * dy^T @ xa        `lora_rank.dy_projections`, one read of dy
            dx = dy @ W + scaling * keep * (g @ A) / (1-p)    `_lora_bwd_dx_kernel`
            dA = scaling * g^T @ dropout(x)            `lora_rank.lora_weight_grad`
Strategy "cublas" keeps the rank-r pieces and replaces the two big GEMMs by torch (cuBLAS) accumulating
into a buffer `lora_rank.low_rank_fill` wrote (sails_fast/fused/lora.py). The dropout keep-mask is regenerated
from (seed, flat index) with Philox (tl.rand); it is never stored.

Launchers check shapes, allocate through `_triton.empty` and launch; no autograd here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._gemm import INTERPRET_MATMUL_CONFIG, grouped_tile, matmul_configs, matmul_pruner
from ._triton import (
    INTERPRET,
    autotune,
    dot,
    empty,
    keep_mask,
    load_tile,
    low_rank_term,
    round_to,
    token_bucket,
)
from .lora_rank import check_dropout_size, dropout_args, low_rank_fill, rank_block


@triton.jit
def _dropout_mask_kernel(mask_ptr, M, K, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    i_m = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mk = (o_m[:, None] < M) & (o_k[None, :] < K)
    b_keep = keep_mask(seed, o_m, o_k, K, dropout_p)
    tl.store(mask_ptr + o_m[:, None] * K + o_k[None, :], b_keep.to(tl.int8), mask=m_mk)


@autotune(
    configs=matmul_configs(),
    key=["M_BUCKET", "N", "K"],
    interpret_config=INTERPRET_MATMUL_CONFIG,
    prune=matmul_pruner("BLOCK_K", "x_ptr"),
)
@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_xam, stride_xar,
    stride_bn, stride_br, stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """y[M, N] = x @ W^T + scaling * xa @ B^T + bias, the low-rank term the accumulator starts from.

    M_BUCKET (the token count's power-of-two bucket) is only the autotune key.
    """
    i_m, i_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_r = tl.arange(0, BLOCK_R)
    m_m = o_m < M
    m_n = o_n < N
    m_r = o_r < R
    # the adapter's dtype: xa is stored in it (PEFT runs the adapter in lora_A's dtype)
    compute_dtype = xa_ptr.dtype.element_ty

    # the accumulator starts as the rank-r term and bias, so they need no second register tile
    acc = low_rank_term(xa_ptr, b_ptr, bias_ptr, o_m, o_n, o_r, m_m, m_n, m_r,
                        stride_xam, stride_xar, stride_br, stride_bn, scaling, 0, 0.0, 1.0, N,
                        HAS_BIAS, False, compute_dtype, UPCAST, BLOCK_M, BLOCK_N)  # fmt: skip
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_x = load_tile(x_ptr, o_m, o_k, m_m, m_k, stride_xm, stride_xk)  # [BLOCK_M, BLOCK_K]
        b_wt = load_tile(w_ptr, o_k, o_n, m_k, m_n, stride_wk, stride_wn)  # [BLOCK_K, BLOCK_N]
        acc = dot(b_x, b_wt, acc, UPCAST)

    tl.store(y_ptr + o_m[:, None] * stride_ym + o_n[None, :] * stride_yn,
             round_to(acc, y_ptr.dtype.element_ty, UPCAST), mask=m_m[:, None] & m_n[None, :])  # fmt: skip


@autotune(
    configs=matmul_configs(out_block="BLOCK_K", reduce_block="BLOCK_N"),
    key=["M_BUCKET", "N", "K"],
    interpret_config=INTERPRET_MATMUL_CONFIG,
    prune=matmul_pruner("BLOCK_N", "dy_ptr", out_block="BLOCK_K"),
)
@triton.jit
def _lora_bwd_dx_kernel(
    dy_ptr, w_ptr, g_ptr, a_ptr, dx_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_gm, stride_gr,
    stride_ar, stride_ak, stride_dxm, stride_dxk,
    scaling, seed, dropout_p, dropout_scale,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """dx[M, K] = dy @ W + scaling * dropout'(g @ A), the low-rank term the accumulator starts from.

    The tile walk is over (M, K) with the reduction over N, so BLOCK_N is the inner block here.
    """
    i_m, i_k = grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    o_r = tl.arange(0, BLOCK_R)
    m_m = o_m < M
    m_k = o_k < K
    m_r = o_r < R
    compute_dtype = g_ptr.dtype.element_ty  # the adapter's dtype

    # the accumulator starts as the rank-r term, with the forward's dropout keep-mask regenerated from
    # the seed, so it needs no second register tile
    acc = low_rank_term(g_ptr, a_ptr, a_ptr, o_m, o_k, o_r, m_m, m_k, m_r,
                        stride_gm, stride_gr, stride_ar, stride_ak,
                        scaling, seed, dropout_p, dropout_scale, K,
                        False, HAS_DROPOUT, compute_dtype, UPCAST, BLOCK_M, BLOCK_K)  # fmt: skip
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        b_dy = load_tile(dy_ptr, o_m, o_n, m_m, m_n, stride_dym, stride_dyn)  # [BLOCK_M, BLOCK_N]
        b_w = load_tile(w_ptr, o_n, o_k, m_n, m_k, stride_wn, stride_wk)  # [BLOCK_N, BLOCK_K]
        acc = dot(b_dy, b_w, acc, UPCAST)

    tl.store(dx_ptr + o_m[:, None] * stride_dxm + o_k[None, :] * stride_dxk,
             round_to(acc, dx_ptr.dtype.element_ty, UPCAST), mask=m_m[:, None] & m_k[None, :])  # fmt: skip


def lora_dropout_mask(
    shape: tuple[int, int], dropout_p: float, seed: int, device: torch.device
) -> torch.Tensor:
    """Boolean keep-mask the fused kernels use for an [M, K] input with this seed (tests, audits)."""
    M, K = shape
    check_dropout_size(M * K, dropout_p)
    mask = empty((M, K), torch.int8, device)
    block_m, block_k = (64, 256) if INTERPRET else (32, 128)
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    _dropout_mask_kernel[grid](mask, M, K, seed, dropout_p, BLOCK_M=block_m, BLOCK_K=block_k)
    return mask.bool()


def lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    xa: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y[M, N] = x @ weight^T + scaling * xa @ lora_B^T + bias, in x's dtype."""
    M, K = x.shape
    N = weight.shape[0]
    R = xa.shape[1]
    y = empty((M, N), x.dtype, x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _lora_fwd_kernel[grid](
        x, weight, xa, lora_B, bias if bias is not None else x, y,
        M, N, K, R, token_bucket(M),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), xa.stride(0), xa.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        float(scaling),
        HAS_BIAS=bias is not None, UPCAST=INTERPRET, BLOCK_R=rank_block(R),
    )  # fmt: skip
    return y


def lora_backward_dx(
    dy: torch.Tensor,
    weight: torch.Tensor,
    g: torch.Tensor,
    lora_A: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """dx[M, K] = dy @ weight + scaling * dropout'(g @ lora_A), in dy's dtype."""
    M, N = dy.shape
    K = weight.shape[1]
    R = g.shape[1]
    check_dropout_size(M * K, dropout_p)
    dx = empty((M, K), dy.dtype, dy.device)
    p, p_scale = dropout_args(dropout_p)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    _lora_bwd_dx_kernel[grid](
        dy, weight, g, lora_A, dx,
        M, N, K, R, token_bucket(M),
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), g.stride(0), g.stride(1),
        lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
        float(scaling), seed, p, p_scale,
        HAS_DROPOUT=dropout_p > 0.0, UPCAST=INTERPRET, BLOCK_R=rank_block(R),
    )  # fmt: skip
    return dx


def lora_forward_cublas(
    x: torch.Tensor,
    weight: torch.Tensor,
    xa: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The "cublas" strategy's forward: y = scaling * xa @ lora_B^T + bias written by a Triton kernel,
    then torch's GEMM (cuBLAS on a GPU) accumulates x @ weight^T into it (beta = 1): one extra write of
    [M, N] over the fused kernel, and the big GEMM runs at the vendor library's speed."""
    y = low_rank_fill(xa, lora_B.t(), scaling, bias, x.dtype)
    return y.addmm_(x, weight.t())


def lora_backward_dx_cublas(
    dy: torch.Tensor,
    weight: torch.Tensor,
    g: torch.Tensor,
    lora_A: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """The "cublas" strategy's dx: scaling * dropout'(g @ lora_A) written by a Triton kernel (the
    forward's keep-mask regenerated), then torch's GEMM accumulates dy @ weight into it."""
    dx = low_rank_fill(g, lora_A, scaling, None, dy.dtype, dropout_p, seed)
    return dx.addmm_(dy, weight)
