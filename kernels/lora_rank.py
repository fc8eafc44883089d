"""Triton kernels and launchers for the rank-r pieces of LoRA: memory-bound passes over an [M, K] or
[M, N] activation with a thin (rank r) operand.

  `_rank_projection_kernel`  xa = dropout(x) @ A^T, [M, R] in x's dtype (one read of x)
  `_dy_projection_kernel`    g = dy @ B and dB = dy^T @ xa from one read of dy (deterministic partials)
  `_weight_grad_kernel`      dA = scaling * g^T @ dropout(x), split over M, partials summed in order
  `_low_rank_fill_kernel`    out = scaling * dropout'(left @ right) + bias, the buffer the "cublas"
                             strategy's torch GEMM accumulates into (beta = 1)

Used by both strategies of the dense LoRA linear (kernels/lora.py, sails_fast/fused/lora.py) and by QLoRA.
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
    empty,
    gemm_pruner,
    keep_mask,
    load_tile,
    low_rank_term,
    next_power_of_2,
    pipeline_smem_bytes,
    rank_dot,
    round_to,
    target_of,
    token_bucket,
)

# the Philox offset of element (m, k) is m * K + k in int32: tensors past this need a wider scheme
MAX_DROPOUT_ELEMENTS = 2**31 - 1

# BLOCK_M is the MMA's M dimension: at least 64 so Hopper uses a warpgroup MMA
_PROJ_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [(64, 128, 4, 4), (128, 64, 4, 4), (128, 64, 8, 3), (64, 64, 4, 4)]
]
_INTERPRET_PROJ_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_K": 256})

_WGRAD_CONFIGS = [
    triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
    for bm, w, s in [(64, 4, 4), (32, 4, 4), (64, 8, 3), (32, 8, 3)]
]
_INTERPRET_WGRAD_CONFIG = triton.Config({"BLOCK_M": 128})

# tiles of the fixed-config kernels (GPU, interpreter); the audit compiles both for every target
DY_PROJECTION_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}
# fp32 products hold more per element: smaller tiles keep them clear of spills. fp32 adapters over a
# 16-bit dy keep both MMA dimensions at 64 (Hopper's warpgroup MMA, in TF32); an fp32 layer's IEEE dots
# run on the FMA units anyway
DY_PROJECTION_BLOCKS_FP32_ADAPTER = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
DY_PROJECTION_BLOCKS_FP32 = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}
_INTERPRET_DY_PROJECTION_BLOCKS = {"BLOCK_M": 128, "BLOCK_N": 256, "num_warps": 4, "num_stages": 1}
FILL_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4}
_INTERPRET_FILL_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 256, "num_warps": 4}


def rank_block(r: int) -> int:
    """Block for the LoRA rank: a power of two, at least 16 (tl.dot's GPU minimum)."""
    block = max(16, next_power_of_2(r))
    check_gpu_dot_width("lora rank block", block)
    return block


def check_dropout_size(numel: int, dropout_p: float) -> None:
    if dropout_p > 0.0 and numel > MAX_DROPOUT_ELEMENTS:
        raise ValueError(
            f"x: dropout in the fused kernel indexes Philox with int32 offsets, so x may hold at most "
            f"{MAX_DROPOUT_ELEMENTS} elements, got {numel}; split the batch or use dropout_p=0"
        )


def dropout_args(dropout_p: float) -> tuple[float, float]:
    return float(dropout_p), (1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0)


def _small_tiles_for_fp32(
    prune, operand_args: tuple[str, ...], blocks: tuple[str, str], limit: int = 4096, per_warps: bool = False
):
    """fp32 operands (an fp32 layer, or fp32 adapters: their products are fp32-accurate, FMA or 3xTF32)
    hold more in registers and shared memory: only tiles of at most `limit` elements (per 4 warps when
    `per_warps`) stay clear of spills and of a consumer GPU's shared memory (benchmarks/kernel_audit.py
    checks them)."""

    def fits(config, args) -> bool:
        values = {**args, **config.kwargs}
        scale = config.num_warps / 4 if per_warps else 1
        return values[blocks[0]] * values[blocks[1]] <= limit * scale

    def pruned(configs, args):
        if any(args[name].element_size() == 4 for name in operand_args):
            small = [c for c in configs if fits(c, args)]
            configs = small or configs
        return prune(configs, args)

    return pruned


def _rank_pruner():
    def smem(config, args):
        e = args["x_ptr"].element_size()
        return pipeline_smem_bytes(config, (("BLOCK_M", "BLOCK_K", e), ("BLOCK_K", "BLOCK_R", e)), args)

    prune = gemm_pruner({"BLOCK_M": "M_BUCKET", "BLOCK_K": "K"}, smem, "x_ptr")
    return _small_tiles_for_fp32(prune, ("x_ptr", "a_ptr"), ("BLOCK_M", "BLOCK_K"))


def _weight_grad_pruner():
    def smem(config, args):
        e = args["r_ptr"].element_size()
        tiles = (("BLOCK_P", "BLOCK_M", args["l_ptr"].element_size()), ("BLOCK_M", "BLOCK_Q", e))
        return pipeline_smem_bytes(config, tiles, args)

    prune = gemm_pruner({"BLOCK_M": "M_BUCKET"}, smem, "r_ptr")
    # a dropout-scaled fp32 tile split for 3xTF32 needs about 16 elements per thread to stay clear of
    # spills on sm_89 (32 x 128 with 8 warps)
    return _small_tiles_for_fp32(prune, ("r_ptr", "l_ptr"), ("BLOCK_M", "BLOCK_Q"), 2048, per_warps=True)


@autotune(
    configs=_PROJ_CONFIGS,
    key=["M_BUCKET", "K", "R"],
    interpret_config=_INTERPRET_PROJ_CONFIG,
    prune=_rank_pruner(),
)
@triton.jit
def _rank_projection_kernel(
    x_ptr, a_ptr, out_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or,
    seed, dropout_p, dropout_scale,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """out[M, R] = dropout(x)[M, K] @ A[R, K]^T, fp32 accumulation, rounded once to out's dtype.

    The product runs in A's dtype, as PEFT casts x to lora_A's dtype (fp32 adapters over a bf16 base:
    an fp32 product); M_BUCKET is only the autotune key.
    """
    adapter_dtype = a_ptr.dtype.element_ty
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_r = tl.arange(0, BLOCK_R)
    m_m = o_m < M
    m_r = o_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_x = load_tile(x_ptr, o_m, o_k, m_m, m_k, stride_xm, stride_xk)  # [BLOCK_M, BLOCK_K]
        if HAS_DROPOUT:
            b_keep = keep_mask(seed, o_m, o_k, K, dropout_p)
            b_x = tl.where(b_keep, b_x.to(tl.float32) * dropout_scale, 0.0)
        b_at = load_tile(a_ptr, o_k, o_r, m_k, m_r, stride_ak, stride_ar)  # [BLOCK_K, BLOCK_R]
        acc = rank_dot(round_to(b_x.to(tl.float32), adapter_dtype, UPCAST), b_at, acc, UPCAST)
    p_o = out_ptr + o_m[:, None] * stride_om + o_r[None, :] * stride_or
    tl.store(p_o, round_to(acc, out_ptr.dtype.element_ty, UPCAST), mask=m_m[:, None] & m_r[None, :])


@triton.jit
def _dy_projection_kernel(
    dy_ptr, b_ptr, xa_ptr, g_part_ptr, db_part_ptr,
    M, N, R, rows_per_split, cols_per_group,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_xam, stride_xar,
    stride_gj, stride_gm, stride_gr, stride_ds, stride_dn, stride_dr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """One read of dy for both of its rank-r products, over the block (rows of split s) x (columns of
    group j) that program (j, s) owns:

        g_part[j, rows]  = dy[rows, cols] @ B[cols]      (summed over j by the launcher)
        db_part[s, cols] = dy[rows, cols]^T @ xa[rows]   (summed over s by the launcher)

    dB accumulates in registers across the program's rows; g, whose reduction runs across the column
    tiles, is read-modify-written in the program's own slice of g_part (no other program touches it,
    so there are no atomics and the result is deterministic). Both products run in B's dtype, the
    adapter's (PEFT's autograd runs lora_B's backward in it).
    """
    i_j = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    m_begin = i_s * rows_per_split
    m_end = tl.minimum(M, m_begin + rows_per_split)
    n_begin = i_j * cols_per_group
    n_end = tl.minimum(N, n_begin + cols_per_group)
    compute_dtype = b_ptr.dtype.element_ty
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R
    for n0 in range(n_begin, n_end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < n_end
        # [BLOCK_N, BLOCK_R]
        b_b = load_tile(b_ptr, o_n, o_r, m_n, m_r, stride_bn, stride_br).to(compute_dtype)
        acc_db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for m0 in range(m_begin, m_end, BLOCK_M):
            o_m = m0 + tl.arange(0, BLOCK_M)
            m_m = o_m < m_end
            # [BLOCK_M, BLOCK_N] and [BLOCK_M, BLOCK_R]
            b_dy = load_tile(dy_ptr, o_m, o_n, m_m, m_n, stride_dym, stride_dyn).to(compute_dtype)
            b_xa = load_tile(xa_ptr, o_m, o_r, m_m, m_r, stride_xam, stride_xar).to(compute_dtype)
            acc_db = rank_dot(tl.trans(b_dy), b_xa, acc_db, UPCAST)
            p_g = g_part_ptr + i_j * stride_gj + o_m[:, None] * stride_gm + o_r[None, :] * stride_gr
            m_g = m_m[:, None] & m_r[None, :]
            b_g = rank_dot(b_dy, b_b, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), UPCAST)  # [M, R] tile
            if n0 != n_begin:
                b_g += tl.load(p_g, mask=m_g, other=0.0)
            tl.store(p_g, b_g, mask=m_g)
        tl.store(db_part_ptr + i_s * stride_ds + o_n[:, None] * stride_dn + o_r[None, :] * stride_dr,
                 acc_db, mask=m_n[:, None] & m_r[None, :])  # fmt: skip


@autotune(
    configs=_WGRAD_CONFIGS,
    key=["M_BUCKET", "P", "Q"],
    interpret_config=_INTERPRET_WGRAD_CONFIG,
    prune=_weight_grad_pruner(),
)
@triton.jit
def _weight_grad_kernel(
    l_ptr, r_ptr, out_ptr,
    M, P, Q, rows_per_split, M_BUCKET,
    stride_lm, stride_lp, stride_rm, stride_rq, stride_os, stride_op, stride_oq,
    seed, dropout_p, dropout_scale,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """out[s, P, Q] = L[rows of split s]^T @ dropout(R)[rows of split s], in L's dtype (g: the adapter's),
    fp32 partials.

    dA = g^T @ dropout(x) is this reduction over the M tokens with P = r small. Splitting M over
    programs keeps a GPU busy; the partials are summed by the launcher in a fixed order.
    """
    i_p = tl.program_id(0).to(tl.int64)
    i_q = tl.program_id(1).to(tl.int64)
    i_s = tl.program_id(2).to(tl.int64)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_q = i_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_p = o_p < P
    m_q = o_q < Q
    compute_dtype = l_ptr.dtype.element_ty
    m_begin = i_s * rows_per_split
    m_end = tl.minimum(M, m_begin + rows_per_split)

    # out^T = R^T @ L: the wide side (Q) is the MMA's M dimension, so Hopper can use a warpgroup MMA
    # (its M is at least 64) while the rank side (P, 16 and up) is N
    acc = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < m_end
        b_l = load_tile(l_ptr, o_m, o_p, m_m, m_p, stride_lm, stride_lp)  # [BLOCK_M, BLOCK_P]
        b_r = load_tile(r_ptr, o_m, o_q, m_m, m_q, stride_rm, stride_rq)  # [BLOCK_M, BLOCK_Q]
        if HAS_DROPOUT:
            b_keep = keep_mask(seed, o_m, o_q, Q, dropout_p)
            b_r = tl.where(b_keep, b_r.to(tl.float32) * dropout_scale, 0.0)
        b_r = round_to(b_r.to(tl.float32), compute_dtype, UPCAST)
        acc = rank_dot(tl.trans(b_r.to(compute_dtype)), b_l, acc, UPCAST)
    tl.store(out_ptr + i_s * stride_os + o_q[:, None] * stride_oq + o_p[None, :] * stride_op,
             acc, mask=m_q[:, None] & m_p[None, :])  # fmt: skip


@triton.jit
def _low_rank_fill_kernel(
    left_ptr, right_ptr, bias_ptr, out_ptr,
    M, N, R,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
    scaling, seed, dropout_p, dropout_scale,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """out[M, N] = scaling * dropout'(left[M, R] @ right[R, N]) + bias, rounded once to out's dtype.

    The rank-r product runs in left's dtype (the adapter's), as in the fused kernels' epilogue; the
    dropout keep-mask is the one of an [M, N] input (the backward's dx: N is the layer's in_features).
    """
    i_m = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_r = tl.arange(0, BLOCK_R)
    m_m = o_m < M
    m_n = o_n < N
    m_r = o_r < R
    b_out = low_rank_term(left_ptr, right_ptr, bias_ptr, o_m, o_n, o_r, m_m, m_n, m_r,
                          stride_lm, stride_lr, stride_rr, stride_rn,
                          scaling, seed, dropout_p, dropout_scale, N,
                          HAS_BIAS, HAS_DROPOUT, left_ptr.dtype.element_ty, UPCAST,
                          BLOCK_M, BLOCK_N)  # fmt: skip
    tl.store(out_ptr + o_m[:, None] * stride_om + o_n[None, :] * stride_on,
             round_to(b_out, out_ptr.dtype.element_ty, UPCAST), mask=m_m[:, None] & m_n[None, :])  # fmt: skip


def rank_projection(x: torch.Tensor, a: torch.Tensor, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """out[M, R] = dropout(x) @ a^T in a's dtype, the adapter's (fp32 accumulation). x [M, K]; a [R, K]."""
    M, K = x.shape
    R = a.shape[0]
    if a.shape[1] != K:
        raise ValueError(f"a: expected shape [R, {K}], got {list(a.shape)}")
    check_dropout_size(M * K, dropout_p)
    out = empty((M, R), a.dtype, x.device)
    p, p_scale = dropout_args(dropout_p)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    _rank_projection_kernel[grid](
        x, a, out, M, K, R, token_bucket(M),
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        seed, p, p_scale,
        HAS_DROPOUT=dropout_p > 0.0, UPCAST=INTERPRET, BLOCK_R=rank_block(R),
    )  # fmt: skip
    return out


def _dy_projection_grid(M: int, N: int, R: int, device: torch.device, blocks: dict) -> tuple[int, int]:
    """(column groups J, row splits S) for the dy pass: about two programs per SM, shaped so the
    partials (J * M + S * N) * R stay small next to dy itself (J / S ~ N / M... per element)."""
    tiles_m, tiles_n = triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(N, blocks["BLOCK_N"])
    programs = 2 * target_of(device).sm_count
    if programs <= 1:
        return 1, 1
    # J * S = programs with J * M ~ S * N minimises J * M + S * N
    groups = max(1, min(tiles_n, round((programs * N / M) ** 0.5)))
    splits = max(1, min(tiles_m, triton.cdiv(programs, groups)))
    return groups, splits


def dy_projections(
    dy: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g [M, R], dB [N, R] fp32) = (dy @ lora_B, scaling * dy^T @ xa) from one read of dy, in lora_B's
    dtype (the adapter's): g is rounded to it once, as PEFT's autograd returns it (it feeds dx and dA).
    """
    M, N = dy.shape
    R = lora_B.shape[1]
    if lora_B.shape[0] != N or tuple(xa.shape) != (M, R):
        raise ValueError(
            f"lora_B, xa: expected [{N}, R] and [{M}, R], got {list(lora_B.shape)} and {list(xa.shape)}"
        )
    blocks = DY_PROJECTION_BLOCKS
    if dy.element_size() == 4:
        blocks = DY_PROJECTION_BLOCKS_FP32
    elif lora_B.element_size() == 4:
        blocks = DY_PROJECTION_BLOCKS_FP32_ADAPTER
    blocks = _INTERPRET_DY_PROJECTION_BLOCKS if INTERPRET else blocks
    groups, splits = _dy_projection_grid(M, N, R, dy.device, blocks)
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), blocks["BLOCK_M"]) * blocks["BLOCK_M"]
    cols_per_group = triton.cdiv(triton.cdiv(N, groups), blocks["BLOCK_N"]) * blocks["BLOCK_N"]
    splits, groups = triton.cdiv(M, rows_per_split), triton.cdiv(N, cols_per_group)
    g_part = empty((groups, M, R), torch.float32, dy.device)
    db_part = empty((splits, N, R), torch.float32, dy.device)
    _dy_projection_kernel[(groups, splits)](
        dy, lora_B, xa, g_part, db_part,
        M, N, R, rows_per_split, cols_per_group,
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), xa.stride(0), xa.stride(1),
        g_part.stride(0), g_part.stride(1), g_part.stride(2),
        db_part.stride(0), db_part.stride(1), db_part.stride(2),
        UPCAST=INTERPRET, BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], BLOCK_R=rank_block(R),
        num_warps=blocks["num_warps"], num_stages=blocks["num_stages"],
    )  # fmt: skip
    # fixed-order sums: deterministic
    g = (g_part[0] if groups == 1 else g_part.sum(0)).to(lora_B.dtype)
    db = (db_part[0] if splits == 1 else db_part.sum(0)).mul_(scaling)
    return g, db


def _num_splits(M: int, tiles: int, device: torch.device) -> int:
    """How many slices of the token dimension to reduce in parallel for a weight gradient."""
    wanted = triton.cdiv(2 * target_of(device).sm_count, max(tiles, 1))
    # each slice keeps at least 256 rows, so the partial buffer stays small next to the inputs
    return max(1, min(wanted, triton.cdiv(M, 256)))


def lora_weight_grad(
    left: torch.Tensor,
    right: torch.Tensor,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """out[P, Q] = scale * left^T @ dropout(right), fp32. left [M, P] (P small: the rank, g in the
    adapter's dtype) sets the compute dtype; right [M, Q]. With dropout, the keep-mask is indexed as for
    an [M, Q] tensor, i.e. `right` must be the layer input."""
    M, P = left.shape
    Q = right.shape[1]
    check_dropout_size(M * Q, dropout_p)
    block_p = rank_block(P)
    block_q = 256 if INTERPRET else 128
    tiles = triton.cdiv(P, block_p) * triton.cdiv(Q, block_q)
    splits = _num_splits(M, tiles, left.device)
    rows_per_split = triton.cdiv(M, splits)
    partial = empty((splits, P, Q), torch.float32, left.device)
    p, p_scale = dropout_args(dropout_p)
    grid = (triton.cdiv(P, block_p), triton.cdiv(Q, block_q), splits)
    _weight_grad_kernel[grid](
        left, right, partial,
        M, P, Q, rows_per_split, token_bucket(M),
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2),
        seed, p, p_scale,
        HAS_DROPOUT=dropout_p > 0.0, UPCAST=INTERPRET, BLOCK_P=block_p, BLOCK_Q=block_q,
    )  # fmt: skip
    out = partial[0] if splits == 1 else partial.sum(0)
    return out.mul_(scale)


def low_rank_fill(
    left: torch.Tensor,
    right: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """[M, N] = scaling * dropout'(left @ right) + bias in `out_dtype`. left [M, R]; right [R, N] (a view
    is fine); bias [N] or None. The buffer a cuBLAS GEMM then accumulates into with beta = 1."""
    M, R = left.shape
    N = right.shape[1]
    if right.shape[0] != R:
        raise ValueError(f"right: expected shape [{R}, N], got {list(right.shape)}")
    check_dropout_size(M * N, dropout_p)
    out = empty((M, N), out_dtype, left.device)
    blocks = _INTERPRET_FILL_BLOCKS if INTERPRET else FILL_BLOCKS
    p, p_scale = dropout_args(dropout_p)
    grid = (triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(N, blocks["BLOCK_N"]))
    _low_rank_fill_kernel[grid](
        left, right, bias if bias is not None else out, out,
        M, N, R,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1), out.stride(0), out.stride(1),
        float(scaling), seed, p, p_scale,
        HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0, UPCAST=INTERPRET,
        BLOCK_M=blocks["BLOCK_M"], BLOCK_N=blocks["BLOCK_N"], BLOCK_R=rank_block(R),
        num_warps=blocks["num_warps"],
    )  # fmt: skip
    return out
