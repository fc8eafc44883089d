"""Triton kernels and launchers for NF4 (bitsandbytes layout) and the QLoRA linear.

    W[n, k] = NF4[code(n * K + k)] * absmax[(n * K + k) // blocksize]        W [N, K], packed flat, 2 per byte

Kernels:
  `_nf4_dequant_kernel`     codes (+ nested absmax) -> W in fp32 / fp16 / bf16: the dequantise-once path and
                            `dequantize_nf4`. Double-quantised absmax is rebuilt inline.
  `_absmax_dequant_kernel`  double-quantised absmax -> fp32 [blocks], for the fused GEMM kernels.
  `_qlora_fwd_kernel`       y = x @ W^T + scaling * xa @ B^T + bias with W tiles dequantised in registers
                            inside the K loop (the LoRA term and bias in the epilogue).
  `_qlora_bwd_dx_kernel`    dx = dy @ W + scaling * dropout'(g @ A), W tiles dequantised inside the N loop.
The LoRA pieces (xa = dropout(x) @ A^T, g = dy @ B, dA, dB, and the dense "matmul + LoRA epilogue" kernels
of the dequantise-once path) are `kernels/lora.py`'s. Layout and rounding rules: docs/nf4.md.

Exactness: bitsandbytes rebuilds a double-quantised absmax with two fp32 roundings (product, then sum), so
the kernels that do it launch with `enable_fp_fusion=False` (no FMA contraction). fp32 -> bf16 casts are
rounded to nearest-even by hand under the interpreter, whose own cast truncates (a GPU rounds to nearest).

Launchers check shapes, allocate through `_triton.empty` and launch; no autograd here.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._gemm import INTERPRET_NF4_CONFIG, grouped_tile, nf4_matmul_configs, nf4_matmul_pruner
from ._triton import INTERPRET, autotune, dot, empty, load_tile, low_rank_term, round_to, token_bucket
from .lora_rank import rank_block
from .nf4_ref import NESTED_BLOCKSIZE, dynamic_code, nf4_code

_DEQUANT_CONFIGS = [
    triton.Config({"BLOCK": b}, num_warps=w, num_stages=s)
    for b, w, s in [(1024, 4, 2), (2048, 4, 2), (2048, 8, 2), (4096, 8, 2)]
]
_INTERPRET_DEQUANT_CONFIG = triton.Config({"BLOCK": 4096})

_ABSMAX_BLOCK = 1024

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _dequant_tile(packed_ptr, absmax_ptr, code_ptr, o_flat, m_flat, BLOCKSIZE: tl.constexpr):
    """fp32 weights at flat indices `o_flat` (any shape): the nibble lookup times the block's absmax."""
    b_byte = tl.load(packed_ptr + o_flat // 2, mask=m_flat, other=0)
    # even element in the high nibble
    b_code = tl.where(o_flat % 2 == 0, b_byte >> 4, b_byte & 15).to(tl.int32)
    b_absmax = tl.load(absmax_ptr + o_flat // BLOCKSIZE, mask=m_flat, other=0.0)
    return tl.load(code_ptr + b_code) * b_absmax


@triton.jit
def _dequant_rows(
    packed_ptr, absmax_ptr, code_ptr, o_rows, m_rows, o_cols, m_cols, col0, K,
    ROW_ALIGNED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    """fp32 W[o_rows, col0 : col0 + BLOCK_COLS] of an [N, K] NF4 weight, as [BLOCK_ROWS, BLOCK_COLS].

    When every row starts a new absmax block (K % BLOCKSIZE == 0) and the tile stays inside one block
    (BLOCK_COLS <= BLOCKSIZE), each row's codes are BLOCK_COLS / 2 contiguous bytes and its scale one
    value: a dense byte tile and an [BLOCK_ROWS] scale vector, which the pipeliner stages in little
    shared memory. Otherwise every element's byte and scale are gathered by flat index.
    """
    if ROW_ALIGNED and BLOCK_COLS <= BLOCKSIZE:
        o_bytes = col0 // 2 + tl.arange(0, BLOCK_COLS // 2)
        b_byte = tl.load(
            packed_ptr + o_rows[:, None] * (K // 2) + o_bytes[None, :], mask=m_rows[:, None], other=0
        )  # [BLOCK_ROWS, BLOCK_COLS // 2]
        # element 2j is the high nibble of byte j: interleave (high, low) pairs
        b_code = tl.reshape(tl.join(b_byte >> 4, b_byte & 15), (BLOCK_ROWS, BLOCK_COLS)).to(tl.int32)
        b_scale = tl.load(absmax_ptr + o_rows * (K // BLOCKSIZE) + col0 // BLOCKSIZE, mask=m_rows, other=0.0)
        return tl.load(code_ptr + b_code) * b_scale[:, None]
    o_flat = o_rows[:, None] * K + o_cols[None, :]
    return _dequant_tile(
        packed_ptr, absmax_ptr, code_ptr, o_flat, m_rows[:, None] & m_cols[None, :], BLOCKSIZE
    )


@autotune(configs=_DEQUANT_CONFIGS, key=["N_ELEM"], interpret_config=_INTERPRET_DEQUANT_CONFIG)
@triton.jit
def _nf4_dequant_kernel(
    packed_ptr, absmax_ptr, nested_absmax_ptr, offset_ptr, code_ptr, nested_code_ptr, out_ptr,
    N_ELEM,
    BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    ROUND_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out[BLOCK elements] = NF4[code] * absmax, one program per BLOCK consecutive flat elements."""
    i_b = tl.program_id(0).to(tl.int64)
    o_byte = i_b * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
    b_byte = tl.load(packed_ptr + o_byte, mask=o_byte < (N_ELEM + 1) // 2, other=0)  # [BLOCK // 2]
    # element 2j is the high nibble of byte j: interleave (high, low) pairs
    b_code = tl.reshape(tl.join(b_byte >> 4, b_byte & 15), (BLOCK,)).to(tl.int32)  # [BLOCK]
    o = i_b * BLOCK + tl.arange(0, BLOCK)
    m = o < N_ELEM
    o_blk = o // BLOCKSIZE
    if NESTED:
        b_q = tl.load(absmax_ptr + o_blk, mask=m, other=0).to(tl.int32)
        b_scale = tl.load(nested_absmax_ptr + o_blk // NESTED_BLOCKSIZE, mask=m, other=0.0)
        # product and sum rounded separately (the launch disables FMA contraction)
        b_absmax = tl.load(nested_code_ptr + b_q) * b_scale + tl.load(offset_ptr)
    else:
        b_absmax = tl.load(absmax_ptr + o_blk, mask=m, other=0.0)
    b_w = tl.load(code_ptr + b_code) * b_absmax  # [BLOCK] fp32
    out_dtype: tl.constexpr = out_ptr.dtype.element_ty
    if out_dtype != ROUND_DTYPE:
        b_w = round_to(b_w, ROUND_DTYPE, MANUAL_BF16).to(tl.float32)
    tl.store(out_ptr + o, round_to(b_w, out_dtype, MANUAL_BF16), mask=m)


@triton.jit
def _absmax_dequant_kernel(
    qabsmax_ptr, nested_absmax_ptr, offset_ptr, nested_code_ptr, out_ptr, N_BLOCKS,
    NESTED_BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out[b] = DYN[q[b]] * nested_absmax[b // NESTED_BLOCKSIZE] + offset, fp32."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N_BLOCKS
    b_q = tl.load(qabsmax_ptr + o, mask=m, other=0).to(tl.int32)
    b_scale = tl.load(nested_absmax_ptr + o // NESTED_BLOCKSIZE, mask=m, other=0.0)
    b_absmax = tl.load(nested_code_ptr + b_q) * b_scale + tl.load(offset_ptr)
    tl.store(out_ptr + o, b_absmax, mask=m)


@autotune(
    configs=nf4_matmul_configs(),
    key=["M_BUCKET", "N", "K"],
    interpret_config=INTERPRET_NF4_CONFIG,
    prune=nf4_matmul_pruner("BLOCK_K", "x_ptr"),
)
@triton.jit
def _qlora_fwd_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, xa_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_xam, stride_xar, stride_bn, stride_br, stride_ym, stride_yn,
    scaling,
    BLOCKSIZE: tl.constexpr, ROW_ALIGNED: tl.constexpr, W_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """y[M, N] = x @ W^T + scaling * xa @ B^T + bias.

    Each [BLOCK_K, BLOCK_N] tile of W^T is dequantised in registers and rounded to the weight's dtype
    W_DTYPE, then to x's dtype, as the dequantise-once path does.
    """
    i_m, i_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_r = tl.arange(0, BLOCK_R)
    m_m = o_m < M
    m_n = o_n < N
    m_r = o_r < R
    compute_dtype = x_ptr.dtype.element_ty
    adapter_dtype = xa_ptr.dtype.element_ty

    # the accumulator starts as the rank-r term and bias, so they need no second register tile
    acc = low_rank_term(xa_ptr, b_ptr, bias_ptr, o_m, o_n, o_r, m_m, m_n, m_r,
                        stride_xam, stride_xar, stride_br, stride_bn, scaling, 0, 0.0, 1.0, N,
                        HAS_BIAS, False, adapter_dtype, UPCAST, BLOCK_M, BLOCK_N)  # fmt: skip
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_x = load_tile(x_ptr, o_m, o_k, m_m, m_k, stride_xm, stride_xk)  # [BLOCK_M, BLOCK_K]
        b_w = _dequant_rows(
            packed_ptr,
            absmax_ptr,
            code_ptr,
            o_n,
            m_n,
            o_k,
            m_k,
            k0,
            K,
            ROW_ALIGNED,
            BLOCKSIZE,
            BLOCK_N,
            BLOCK_K,
        )  # [BLOCK_N, BLOCK_K], fmt: skip
        b_w = round_to(b_w, W_DTYPE, UPCAST)
        b_w = round_to(b_w.to(tl.float32), compute_dtype, UPCAST)
        acc = dot(b_x, tl.trans(b_w), acc, UPCAST)

    tl.store(y_ptr + o_m[:, None] * stride_ym + o_n[None, :] * stride_yn,
             round_to(acc, y_ptr.dtype.element_ty, UPCAST), mask=m_m[:, None] & m_n[None, :])  # fmt: skip


@autotune(
    configs=nf4_matmul_configs(out_block="BLOCK_K", reduce_block="BLOCK_N"),  # [BLOCK_N, BLOCK_K] W tiles
    key=["M_BUCKET", "N", "K"],
    interpret_config=INTERPRET_NF4_CONFIG,
    prune=nf4_matmul_pruner("BLOCK_N", "dy_ptr", out_block="BLOCK_K"),
)
@triton.jit
def _qlora_bwd_dx_kernel(
    dy_ptr, packed_ptr, absmax_ptr, code_ptr, g_ptr, a_ptr, dx_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_gm, stride_gr, stride_ar, stride_ak, stride_dxm, stride_dxk,
    scaling, seed, dropout_p, dropout_scale,
    BLOCKSIZE: tl.constexpr, ROW_ALIGNED: tl.constexpr, W_DTYPE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """dx[M, K] = dy @ W + scaling * dropout'(g @ A), W tiles [BLOCK_N, BLOCK_K] dequantised in the N loop."""
    i_m, i_k = grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    o_r = tl.arange(0, BLOCK_R)
    m_m = o_m < M
    m_k = o_k < K
    m_r = o_r < R
    compute_dtype = dy_ptr.dtype.element_ty
    adapter_dtype = g_ptr.dtype.element_ty

    # the accumulator starts as the rank-r term, with the forward's dropout keep-mask regenerated from
    # the seed, so it needs no second register tile
    acc = low_rank_term(g_ptr, a_ptr, a_ptr, o_m, o_k, o_r, m_m, m_k, m_r,
                        stride_gm, stride_gr, stride_ar, stride_ak,
                        scaling, seed, dropout_p, dropout_scale, K,
                        False, HAS_DROPOUT, adapter_dtype, UPCAST, BLOCK_M, BLOCK_K)  # fmt: skip
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        b_dy = load_tile(dy_ptr, o_m, o_n, m_m, m_n, stride_dym, stride_dyn)  # [BLOCK_M, BLOCK_N]
        b_w = _dequant_rows(
            packed_ptr,
            absmax_ptr,
            code_ptr,
            o_n,
            m_n,
            o_k,
            m_k,
            i_k * BLOCK_K,
            K,
            ROW_ALIGNED,
            BLOCKSIZE,
            BLOCK_N,
            BLOCK_K,
        )  # [BLOCK_N, BLOCK_K], fmt: skip
        b_w = round_to(b_w, W_DTYPE, UPCAST)
        b_w = round_to(b_w.to(tl.float32), compute_dtype, UPCAST)
        acc = dot(b_dy, b_w, acc, UPCAST)

    tl.store(dx_ptr + o_m[:, None] * stride_dxm + o_k[None, :] * stride_dxk,
             round_to(acc, dx_ptr.dtype.element_ty, UPCAST), mask=m_m[:, None] & m_k[None, :])  # fmt: skip


def _tl_dtype(dtype: torch.dtype, name: str):
    if dtype not in _TL_DTYPES:
        raise ValueError(f"{name}: expected float32, float16 or bfloat16, got {dtype}")
    return _TL_DTYPES[dtype]


def _nested_code(nf4) -> torch.Tensor:
    code = nf4.nested_code if nf4.nested_code is not None else dynamic_code(nf4.packed.device)
    return code.to(device=nf4.packed.device, dtype=torch.float32)


def _check_nested_blocksize(nf4) -> int:
    nbs = int(nf4.nested_blocksize if nf4.nested_absmax is not None else NESTED_BLOCKSIZE)
    if nbs <= 0 or nbs & (nbs - 1):
        raise ValueError(f"nested_blocksize: expected a power of two, got {nbs}")
    return nbs


def dequantize(
    nf4, dtype: torch.dtype, round_dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """W = NF4[code] * absmax as `dtype`, shape nf4.shape; written into `out` when given (a reused buffer).

    `round_dtype`: round to this dtype first, then to `dtype` (the QLoRA weight is rounded to the stored
    weight's dtype before the cast to the activation dtype, as bitsandbytes' matmul_4bit does).
    """
    n = math.prod(nf4.shape)
    out_tl = _tl_dtype(dtype, "dtype")
    round_tl = out_tl if round_dtype is None else _tl_dtype(round_dtype, "round_dtype")
    device = nf4.packed.device
    if out is None:
        out = empty(tuple(nf4.shape), dtype, device)
    elif out.dtype != dtype or out.numel() != n or not out.is_contiguous():
        raise ValueError(
            f"out: expected a contiguous {dtype} buffer of {n} elements, got {out.dtype} {out.shape}"
        )
    if n == 0:
        return out
    nested = nf4.nested_absmax is not None
    nested_blocksize = _check_nested_blocksize(nf4)
    dummy = nf4.absmax
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK"]),)
    _nf4_dequant_kernel[grid](
        nf4.packed, nf4.absmax,
        nf4.nested_absmax if nested else dummy,
        nf4.nested_offset.reshape(1).float() if nested else dummy,
        nf4_code(device), _nested_code(nf4) if nested else dummy, out,
        n,
        BLOCKSIZE=int(nf4.blocksize), NESTED_BLOCKSIZE=nested_blocksize, NESTED=nested,
        ROUND_DTYPE=round_tl, MANUAL_BF16=INTERPRET, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def absmax_fp32(nf4) -> torch.Tensor:
    """The per-block fp32 absmax [blocks]: nf4.absmax itself, or rebuilt from its double-quantised form."""
    if nf4.nested_absmax is None:
        return nf4.absmax if nf4.absmax.dtype == torch.float32 else nf4.absmax.float()
    nb = nf4.absmax.numel()
    out = empty((nb,), torch.float32, nf4.absmax.device)
    if nb == 0:
        return out
    _absmax_dequant_kernel[(triton.cdiv(nb, _ABSMAX_BLOCK),)](
        nf4.absmax, nf4.nested_absmax, nf4.nested_offset.reshape(1).float(), _nested_code(nf4), out, nb,
        NESTED_BLOCKSIZE=_check_nested_blocksize(nf4), BLOCK=_ABSMAX_BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return out


_workspaces: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, reused across calls (one per device and dtype).

    The dequantise-once path writes each layer's weight here and consumes it at once, forward and
    backward alike, so one buffer the size of the largest weight serves every layer. Not thread-safe;
    calls on one CUDA stream are ordered, so a later layer cannot overwrite a weight still being read.
    """
    key = (str(device), dtype)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        buf = empty((numel,), dtype, device)
        _workspaces[key] = buf
    return buf[:numel]


def release_workspace() -> None:
    """Free the reused dequantisation buffers (they are re-allocated on the next call)."""
    _workspaces.clear()


def dequantize_to_workspace(nf4, dtype: torch.dtype) -> torch.Tensor:
    """The QLoRA base weight [N, K] in `dtype`, written into the reused buffer."""
    n = math.prod(nf4.shape)
    buf = workspace(n, dtype, nf4.packed.device)
    dequantize(nf4, dtype, round_dtype=nf4.dtype, out=buf)
    return buf.view(tuple(nf4.shape))


def qlora_forward_fused(
    x: torch.Tensor,
    nf4,
    absmax: torch.Tensor,
    xa: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y[M, N] = x @ W^T + scaling * xa @ lora_B^T + bias with W dequantised inside the GEMM, in x's dtype.

    `absmax` is the fp32 per-block absmax (`absmax_fp32(nf4)`).
    """
    M, K = x.shape
    N = nf4.shape[0]
    R = xa.shape[1]
    y = empty((M, N), x.dtype, x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _qlora_fwd_kernel[grid](
        x, nf4.packed, absmax, nf4_code(x.device), xa, lora_B, bias if bias is not None else x, y,
        M, N, K, R, token_bucket(M),
        x.stride(0), x.stride(1), xa.stride(0), xa.stride(1), lora_B.stride(0), lora_B.stride(1),
        y.stride(0), y.stride(1),
        float(scaling),
        BLOCKSIZE=int(nf4.blocksize), ROW_ALIGNED=K % int(nf4.blocksize) == 0,
        W_DTYPE=_tl_dtype(nf4.dtype, "nf4.dtype"), HAS_BIAS=bias is not None,
        UPCAST=INTERPRET, BLOCK_R=rank_block(R),
    )  # fmt: skip
    return y


def qlora_backward_dx_fused(
    dy: torch.Tensor,
    nf4,
    absmax: torch.Tensor,
    g: torch.Tensor,
    lora_A: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """dx[M, K] = dy @ W + scaling * dropout'(g @ lora_A), W dequantised inside the GEMM, dy's dtype."""
    M, N = dy.shape
    K = nf4.shape[1]
    R = g.shape[1]
    dx = empty((M, K), dy.dtype, dy.device)
    p = float(dropout_p)
    p_scale = 1.0 / (1.0 - p) if p > 0.0 else 1.0
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    _qlora_bwd_dx_kernel[grid](
        dy, nf4.packed, absmax, nf4_code(dy.device), g, lora_A, dx,
        M, N, K, R, token_bucket(M),
        dy.stride(0), dy.stride(1), g.stride(0), g.stride(1), lora_A.stride(0), lora_A.stride(1),
        dx.stride(0), dx.stride(1),
        float(scaling), seed, p, p_scale,
        BLOCKSIZE=int(nf4.blocksize), ROW_ALIGNED=K % int(nf4.blocksize) == 0,
        W_DTYPE=_tl_dtype(nf4.dtype, "nf4.dtype"), HAS_DROPOUT=p > 0.0,
        UPCAST=INTERPRET, BLOCK_R=rank_block(R),
    )  # fmt: skip
    return dx
