"""Strategy "chunked" of the SAE feature statistics (docs/sae_stats.md): per chunk of tokens, torch's GEMM
(cuBLAS on a GPU) computes fp32 pre-activations [T_c, F] (at most `max_chunk_bytes`), and
`_chunk_stats_kernel` reduces them per class with the same tile fold and flush as the fused kernel
(`sae_stats.py`), so both strategies keep identical statistics. Memory O(T_c * F), never O(T * F).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import INTERPRET, load_tile, next_power_of_2
from .sae_stats import (
    ACT_CODES,
    _Accumulators,
    _check_launch,
    _empty_accumulators,
    _flush,
    _fold_tile,
    _splits,
    sae_input,
)

# the chunk-reduction kernel streams fp32 pre-activations: latents along threads (coalesced), tokens
# along each thread's registers
_CHUNK_CONFIG = {"BLOCK_F": 512, "BLOCK_T": 8, "num_warps": 4}
_INTERPRET_CHUNK_CONFIG = {"BLOCK_F": 512, "BLOCK_T": 64, "num_warps": 4}


@triton.jit
def _chunk_stats_kernel(
    pre_ptr, thr_ptr, kth_ptr, label_ptr, tw_ptr,
    sum_ptr, sq_ptr, cnt_ptr, max_ptr, wsum_ptr, tokens_ptr,
    T, F, rows_per_split, n_splits, token_offset, stride_pt, stride_split,
    C: tl.constexpr, ACT: tl.constexpr, HAS_WEIGHTS: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The chunked strategy's reduction: the same per-class statistics from fp32 pre-activations
    [T, F] (b_enc included) that torch's GEMM wrote, one read of each element."""
    i_f = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    o_f = i_f * BLOCK_F + tl.arange(0, BLOCK_F)
    m_f = o_f < F
    acc_sum, acc_sq, acc_cnt, acc_max, acc_arg, acc_wsum, acc_tokens = _empty_accumulators(BLOCK_F, BLOCK_C)
    t_begin = i_s * rows_per_split
    t_end = tl.minimum(T, t_begin + rows_per_split)
    for t0 in range(t_begin, t_end, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < t_end
        b_pre = load_tile(pre_ptr, o_f, o_t, m_f, m_t, 1, stride_pt)  # [BLOCK_F, BLOCK_T]
        acc_sum, acc_sq, acc_cnt, acc_max, acc_arg, acc_wsum, acc_tokens = _fold_tile(
            b_pre, t0, o_t, m_t, o_f, m_f, label_ptr, tw_ptr, thr_ptr, kth_ptr, token_offset, i_f == 0,
            acc_sum, acc_sq, acc_cnt, acc_max, acc_arg, acc_wsum, acc_tokens,
            C, ACT, HAS_WEIGHTS, BLOCK_C,
        )  # fmt: skip
    _flush(o_f, m_f, i_s, F, acc_sum, acc_sq, acc_cnt, acc_max, acc_arg, acc_wsum, acc_tokens, i_f == 0,
           sum_ptr, sq_ptr, cnt_ptr, max_ptr, wsum_ptr, tokens_ptr, stride_split,
           C, DETERMINISTIC, BLOCK_C)  # fmt: skip


def encode_fp32(sae_in: torch.Tensor, sae) -> torch.Tensor:
    """pre = sae_in @ W_enc + b_enc in fp32 [T, F], by torch's GEMM (cuBLAS on a GPU): 16-bit operands
    with fp32 accumulation and an fp32 result, as the fused kernel's pre-activations."""
    bias = sae.b_enc.float()
    if sae_in.dtype != torch.float32 and sae_in.is_cuda:
        try:
            return torch.addmm(bias, sae_in, sae.W_enc, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass  # a torch without the out_dtype GEMM: fp32 operands (exact products, slower)
    return torch.addmm(bias, sae_in.float(), sae.W_enc.float())


def chunk_tokens(F: int, max_chunk_bytes: int) -> int:
    """Tokens per chunk so the fp32 [T_c, F] pre-activations fit `max_chunk_bytes`."""
    return max(1, max_chunk_bytes // (4 * F))


def chunk_statistics(
    pre: torch.Tensor,
    sae,
    labels,
    token_weights,
    acc: _Accumulators,
    token_offset: int,
    deterministic: bool,
    rows_per_split: int | None = None,
) -> None:
    """Reduce fp32 pre-activations [T_c, F] (b_enc included) of tokens starting at `token_offset`
    into the call's accumulators: the chunked strategy's Triton half."""  # fmt: skip
    T, F = pre.shape
    out = acc.out
    C = out.num_classes
    cfg = dict(_INTERPRET_CHUNK_CONFIG if INTERPRET else _CHUNK_CONFIG)
    tiles_f = triton.cdiv(F, cfg["BLOCK_F"])
    rows, n_splits = _splits(T, tiles_f, cfg["BLOCK_T"], pre.device, deterministic, rows_per_split)
    kth = None
    if sae.activation == "topk":
        kth = torch.topk(pre, sae.k, dim=1, sorted=False).values.amin(dim=1)
    thr = sae.threshold if sae.activation == "jumprelu" else sae.b_enc
    sums, squares, wsums = acc.buffers(n_splits)
    _chunk_stats_kernel[(tiles_f, n_splits)](
        pre, thr, kth if kth is not None else pre, labels,
        token_weights if token_weights is not None else pre,
        sums, squares, out.active_count, acc.packed_max, wsums, out.token_count,
        T, F, rows, n_splits, token_offset, pre.stride(0), C * F,
        C=C, ACT=ACT_CODES[sae.activation], HAS_WEIGHTS=token_weights is not None,
        DETERMINISTIC=deterministic, BLOCK_T=cfg["BLOCK_T"], BLOCK_F=cfg["BLOCK_F"],
        BLOCK_C=next_power_of_2(C), num_warps=cfg["num_warps"],
    )  # fmt: skip
    acc.after_launch()


@torch.no_grad()
def sae_stats_chunked(
    x: torch.Tensor,
    sae,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None,
    out,
    max_chunk_bytes: int,
    deterministic: bool = False,
    rows_per_split: int | None = None,
) -> None:
    """The chunked strategy: per chunk of tokens, torch's GEMM writes fp32 pre-activations [T_c, F]
    (at most `max_chunk_bytes`), TopK takes torch.topk of them, and `_chunk_stats_kernel` reduces them
    per class. Memory O(T_c * F), never O(T * F)."""
    _check_launch(x, sae, out)
    T = x.shape[0]
    if T == 0:
        return
    chunk = chunk_tokens(out.num_features, max_chunk_bytes)
    acc = _Accumulators(out, deterministic)
    for start in range(0, T, chunk):
        stop = min(T, start + chunk)
        pre = encode_fp32(sae_input(x[start:stop], sae), sae)
        weights = token_weights[start:stop] if token_weights is not None else None
        chunk_statistics(pre, sae, labels[start:stop], weights, acc, start, deterministic, rows_per_split)
        del pre
    acc.finish(T)
