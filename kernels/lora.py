"""Triton kernels and launchers for the fused LoRA linear.

    y = x @ W^T + bias + scaling * (dropout(x) @ A^T) @ B^T       x [M, K], W [N, K], A [R, K], B [N, R]

Forward (two launches, no second [M, N] tensor):
  1. `_rank_projection_kernel`: xa = dropout(x) @ A^T, [M, R] in fp32.
  2. `_lora_fwd_kernel`: tiles of x @ W^T, with scaling * xa_tile @ B^T (+ bias) added in the epilogue.
Backward (docs/lora_backward.md has the derivation):
  g  = dy @ B                                   `_rank_projection_kernel` again, [M, R]
  dx = dy @ W + scaling * keep * (g @ A) / (1-p) `_lora_bwd_dx_kernel`, low-rank term in the epilogue
  dA = scaling * g^T @ dropout(x)               `_lora_weight_grad_kernel`
  dB = scaling * dy^T @ xa                      `_lora_weight_grad_kernel`
The dropout keep-mask is regenerated from (seed, flat index) with Philox (tl.rand); it is never stored.

Launchers check shapes, allocate through `_triton.empty` and launch; no autograd here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import (
    INTERPRET,
    autotune,
    check_gpu_dot_width,
    dot,
    empty,
    low_rank_tile,
    next_power_of_2,
    prune_by_size,
    round_to,
)

# the Philox offset of element (m, k) is m * K + k in int32: tensors past this need a wider scheme
MAX_DROPOUT_ELEMENTS = 2**31 - 1

_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 128, 32, 4, 4),
    ]
]
_INTERPRET_MATMUL_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 256, "GROUP_M": 8})

_PROJ_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [(64, 128, 4, 3), (128, 64, 4, 3), (64, 256, 4, 3), (32, 256, 4, 3), (128, 128, 8, 3)]
]
_INTERPRET_PROJ_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_K": 256})

_WGRAD_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
    for bm, w, s in [(32, 4, 3), (64, 4, 3), (128, 4, 3), (64, 8, 3)]
]
_INTERPRET_WGRAD_CONFIG = triton.Config({"BLOCK_M": 128})


@triton.jit
def _keep_mask(seed, o_m, o_k, K, dropout_p):
    """Dropout keep-mask for the [len(o_m), len(o_k)] tile of an [M, K] tensor, from Philox."""
    o_flat = (o_m[:, None] * K + o_k[None, :]).to(tl.int32)
    return tl.rand(seed, o_flat) >= dropout_p


@triton.jit
def _dropout_mask_kernel(mask_ptr, M, K, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    i_m = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mk = (o_m[:, None] < M) & (o_k[None, :] < K)
    b_keep = _keep_mask(seed, o_m, o_k, K, dropout_p)
    tl.store(mask_ptr + o_m[:, None] * K + o_k[None, :], b_keep.to(tl.int8), mask=m_mk)


@autotune(
    configs=_PROJ_CONFIGS,
    key=["M", "K", "R"],
    interpret_config=_INTERPRET_PROJ_CONFIG,
    prune_configs_by=prune_by_size({"BLOCK_M": "M", "BLOCK_K": "K"}),
)
@triton.jit
def _rank_projection_kernel(
    x_ptr, a_ptr, out_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or,
    seed, dropout_p, dropout_scale,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """out[M, R] = dropout(x)[M, K] @ A[R, K]^T, fp32 accumulation and output."""
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_r = tl.arange(0, BLOCK_R)
    m_m = o_m < M
    m_r = o_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        p_x = x_ptr + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        if HAS_DROPOUT:
            b_keep = _keep_mask(seed, o_m, o_k, K, dropout_p)
            b_x = tl.where(b_keep, b_x.to(tl.float32) * dropout_scale, 0.0).to(x_ptr.dtype.element_ty)
        p_a = a_ptr + o_k[:, None] * stride_ak + o_r[None, :] * stride_ar
        b_at = tl.load(p_a, mask=m_k[:, None] & m_r[None, :], other=0.0)  # [BLOCK_K, BLOCK_R]
        acc = dot(b_x, b_at.to(x_ptr.dtype.element_ty), acc, UPCAST)
    p_o = out_ptr + o_m[:, None] * stride_om + o_r[None, :] * stride_or
    tl.store(p_o, acc.to(out_ptr.dtype.element_ty), mask=m_m[:, None] & m_r[None, :])


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map the 1-D program id to an (m, n) tile, walking GROUP_M row-tiles at a time for L2 reuse."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    i_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    i_n = (pid % num_pid_in_group) // group_size_m
    return i_m.to(tl.int64), i_n.to(tl.int64)


@autotune(
    configs=_FWD_CONFIGS,
    key=["M", "N", "K"],
    interpret_config=_INTERPRET_MATMUL_CONFIG,
    prune_configs_by=prune_by_size({"BLOCK_M": "M", "BLOCK_N": "N"}),
)
@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_xam, stride_xar,
    stride_bn, stride_br, stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """y[M, N] = x @ W^T + scaling * xa @ B^T + bias, the low-rank term added in the epilogue."""
    i_m, i_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_r = tl.arange(0, BLOCK_R)
    m_m = o_m < M
    m_n = o_n < N
    m_r = o_r < R
    compute_dtype = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_x = tl.load(
            x_ptr + o_m[:, None] * stride_xm + o_k[None, :] * stride_xk,
            mask=m_m[:, None] & m_k[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        b_wt = tl.load(
            w_ptr + o_k[:, None] * stride_wk + o_n[None, :] * stride_wn,
            mask=m_k[:, None] & m_n[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK_N]
        acc = dot(b_x, b_wt, acc, UPCAST)

    # epilogue: the adapter output is rounded to the activation dtype, as PEFT's lora_A output is
    b_lora = low_rank_tile(xa_ptr, b_ptr, o_m, o_n, o_r, m_m, m_n, m_r,
                           stride_xam, stride_xar, stride_br, stride_bn,
                           compute_dtype, UPCAST, BLOCK_M, BLOCK_N)  # fmt: skip
    acc += scaling * b_lora
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)  # [BLOCK_N]
        acc += b_bias[None, :]
    tl.store(y_ptr + o_m[:, None] * stride_ym + o_n[None, :] * stride_yn,
             round_to(acc, y_ptr.dtype.element_ty, UPCAST), mask=m_m[:, None] & m_n[None, :])  # fmt: skip


@autotune(
    configs=_FWD_CONFIGS,
    key=["M", "N", "K"],
    interpret_config=_INTERPRET_MATMUL_CONFIG,
    prune_configs_by=prune_by_size({"BLOCK_M": "M", "BLOCK_K": "K"}),
)
@triton.jit
def _lora_bwd_dx_kernel(
    dy_ptr, w_ptr, g_ptr, a_ptr, dx_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_gm, stride_gr,
    stride_ar, stride_ak, stride_dxm, stride_dxk,
    scaling, seed, dropout_p, dropout_scale,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """dx[M, K] = dy @ W + scaling * dropout'(g @ A), the low-rank term added in the epilogue.

    The tile walk is over (M, K) with the reduction over N, so BLOCK_N is the inner block here.
    """
    i_m, i_k = _grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    o_r = tl.arange(0, BLOCK_R)
    m_m = o_m < M
    m_k = o_k < K
    m_r = o_r < R
    compute_dtype = dy_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        b_dy = tl.load(
            dy_ptr + o_m[:, None] * stride_dym + o_n[None, :] * stride_dyn,
            mask=m_m[:, None] & m_n[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_N]
        b_w = tl.load(
            w_ptr + o_n[:, None] * stride_wn + o_k[None, :] * stride_wk,
            mask=m_n[:, None] & m_k[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_K]
        acc = dot(b_dy, b_w, acc, UPCAST)

    b_lora = low_rank_tile(g_ptr, a_ptr, o_m, o_k, o_r, m_m, m_k, m_r,
                           stride_gm, stride_gr, stride_ar, stride_ak,
                           compute_dtype, UPCAST, BLOCK_M, BLOCK_K)  # fmt: skip
    if HAS_DROPOUT:
        # the same keep-mask the forward drew, regenerated from the seed
        b_keep = _keep_mask(seed, o_m, o_k, K, dropout_p)
        b_lora = tl.where(b_keep, b_lora * dropout_scale, 0.0)
    acc += scaling * b_lora
    tl.store(dx_ptr + o_m[:, None] * stride_dxm + o_k[None, :] * stride_dxk,
             round_to(acc, dx_ptr.dtype.element_ty, UPCAST), mask=m_m[:, None] & m_k[None, :])  # fmt: skip


@autotune(configs=_WGRAD_CONFIGS, key=["M", "P", "Q"], interpret_config=_INTERPRET_WGRAD_CONFIG)
@triton.jit
def _lora_weight_grad_kernel(
    l_ptr, r_ptr, out_ptr,
    M, P, Q, rows_per_split,
    stride_lm, stride_lp, stride_rm, stride_rq, stride_os, stride_op, stride_oq,
    scale, seed, dropout_p, dropout_scale,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """out[s, P, Q] = scale * L[rows of split s]^T @ dropout(Rt)[rows of split s].

    dA = scaling * g^T @ dropout(x) and dB = scaling * dy^T @ xa are both this shape of product: a
    reduction over the M tokens. Splitting M over programs keeps a GPU busy when P * Q is small; the
    partials are summed by the launcher in a fixed order, so the result is deterministic.
    """
    i_p = tl.program_id(0).to(tl.int64)
    i_q = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2).to(tl.int64)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_q = i_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_p = o_p < P
    m_q = o_q < Q
    compute_dtype = r_ptr.dtype.element_ty
    m_begin = i_s * rows_per_split
    m_end = tl.minimum(M, m_begin + rows_per_split)

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < m_end
        b_lt = tl.load(
            l_ptr + o_p[:, None] * stride_lp + o_m[None, :] * stride_lm,
            mask=m_p[:, None] & m_m[None, :],
            other=0.0,
        )  # [BLOCK_P, BLOCK_M]
        b_r = tl.load(
            r_ptr + o_m[:, None] * stride_rm + o_q[None, :] * stride_rq,
            mask=m_m[:, None] & m_q[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_Q]
        if HAS_DROPOUT:
            b_keep = _keep_mask(seed, o_m, o_q, Q, dropout_p)
            b_r = tl.where(b_keep, b_r.to(tl.float32) * dropout_scale, 0.0).to(compute_dtype)
        acc = dot(b_lt.to(compute_dtype), b_r, acc, UPCAST)
    tl.store(out_ptr + i_s * stride_os + o_p[:, None] * stride_op + o_q[None, :] * stride_oq,
             acc * scale, mask=m_p[:, None] & m_q[None, :])  # fmt: skip


def _rank_block(r: int) -> int:
    """Block for the LoRA rank: a power of two, at least 16 (tl.dot's GPU minimum)."""
    block = max(16, next_power_of_2(r))
    check_gpu_dot_width("lora rank block", block)
    return block


def _check_dropout_size(numel: int, dropout_p: float) -> None:
    if dropout_p > 0.0 and numel > MAX_DROPOUT_ELEMENTS:
        raise ValueError(
            f"x: dropout in the fused kernel indexes Philox with int32 offsets, so x may hold at most "
            f"{MAX_DROPOUT_ELEMENTS} elements, got {numel}; split the batch or use dropout_p=0"
        )


def lora_dropout_mask(
    shape: tuple[int, int], dropout_p: float, seed: int, device: torch.device
) -> torch.Tensor:
    """Boolean keep-mask the fused kernels use for an [M, K] input with this seed (tests, audits)."""
    M, K = shape
    _check_dropout_size(M * K, dropout_p)
    mask = empty((M, K), torch.int8, device)
    block_m, block_k = (64, 256) if INTERPRET else (32, 128)
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    _dropout_mask_kernel[grid](mask, M, K, seed, dropout_p, BLOCK_M=block_m, BLOCK_K=block_k)
    return mask.bool()


def _dropout_args(dropout_p: float) -> tuple[float, float]:
    return float(dropout_p), (1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0)


def rank_projection(x: torch.Tensor, a: torch.Tensor, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """out[M, R] = dropout(x) @ a^T in fp32. x [M, K]; a [R, K], any float dtype (cast to x's on load)."""
    M, K = x.shape
    R = a.shape[0]
    if a.shape[1] != K:
        raise ValueError(f"a: expected shape [R, {K}], got {list(a.shape)}")
    _check_dropout_size(M * K, dropout_p)
    out = empty((M, R), torch.float32, x.device)
    p, p_scale = _dropout_args(dropout_p)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    _rank_projection_kernel[grid](
        x, a, out, M, K, R,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        seed, p, p_scale,
        HAS_DROPOUT=dropout_p > 0.0, UPCAST=INTERPRET, BLOCK_R=_rank_block(R),
    )  # fmt: skip
    return out


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
        M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), xa.stride(0), xa.stride(1),
        lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1),
        float(scaling),
        HAS_BIAS=bias is not None, UPCAST=INTERPRET, BLOCK_R=_rank_block(R),
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
    _check_dropout_size(M * K, dropout_p)
    dx = empty((M, K), dy.dtype, dy.device)
    p, p_scale = _dropout_args(dropout_p)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    _lora_bwd_dx_kernel[grid](
        dy, weight, g, lora_A, dx,
        M, N, K, R,
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), g.stride(0), g.stride(1),
        lora_A.stride(0), lora_A.stride(1), dx.stride(0), dx.stride(1),
        float(scaling), seed, p, p_scale,
        HAS_DROPOUT=dropout_p > 0.0, UPCAST=INTERPRET, BLOCK_R=_rank_block(R),
    )  # fmt: skip
    return dx


def _num_splits(M: int, tiles: int, device: torch.device) -> int:
    """How many slices of the token dimension to reduce in parallel for a weight gradient."""
    if INTERPRET or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(2 * sms, max(tiles, 1))
    # each slice keeps at least 256 rows, so the partial buffer stays small next to the inputs
    return max(1, min(wanted, triton.cdiv(M, 256)))


def lora_weight_grad(
    left: torch.Tensor,
    right: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """out[P, Q] = scale * left^T @ dropout(right), fp32. left [M, P]; right [M, Q] sets the compute dtype.

    With dropout, the keep-mask is indexed as for an [M, Q] tensor, i.e. `right` must be the layer input.
    """
    M, P = left.shape
    Q = right.shape[1]
    _check_dropout_size(M * Q, dropout_p)
    small_p = P <= 64
    # the rank side of the product gets the rank block; the wide side a 128-wide block (64 under dot limits)
    block_p = _rank_block(P) if small_p else (256 if INTERPRET else 64)
    block_q = (256 if INTERPRET else 64) if small_p else _rank_block(Q)
    tiles = triton.cdiv(P, block_p) * triton.cdiv(Q, block_q)
    splits = _num_splits(M, tiles, left.device)
    rows_per_split = triton.cdiv(M, splits)
    partial = empty((splits, P, Q), torch.float32, left.device)
    p, p_scale = _dropout_args(dropout_p)
    grid = (triton.cdiv(P, block_p), triton.cdiv(Q, block_q), splits)
    _lora_weight_grad_kernel[grid](
        left, right, partial,
        M, P, Q, rows_per_split,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2),
        float(scale), seed, p, p_scale,
        HAS_DROPOUT=dropout_p > 0.0, UPCAST=INTERPRET, BLOCK_P=block_p, BLOCK_Q=block_q,
    )  # fmt: skip
    return partial[0] if splits == 1 else partial.sum(0)
