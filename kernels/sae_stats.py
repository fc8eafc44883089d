"""Triton kernels and launchers for streaming SAE feature statistics (docs/sae_stats.md has the design).

    pre = (x - b_dec?) @ W_enc + b_enc,  a = act(pre)     x [T, d], W_enc [d, F]
    per class c, per latent f:  sum w*a, sum w*a^2, #(a > 0), max a, first argmax; per class sum w, #tokens

Strategy "fused" (`sae_stats_accumulate`), no [T, F] tensor anywhere:
  `_sae_input_kernel`        x cast to the SAE dtype minus b_dec (SAELens' rounding), when the SAE asks for
                             either; a bounded [chunk, d] buffer, so both dot operands are plain loads
  `_topk_candidates_kernel`  TopK only: each program keeps the K largest pre-activations of its rows over
                             one group of latents; torch.topk of the [rows, groups * K] candidates gives
                             each row's K-th largest value
  `_sae_stats_kernel`        a program owns a BLOCK_F slice of latents and a split of tokens; it builds
                             [BLOCK_F, BLOCK_T] pre-activation tiles (latents x tokens, so the per-class
                             reductions over tokens stay inside a thread quad) and folds them into
                             [BLOCK_F, C] register accumulators, flushed once with atomics (or into its
                             own slot in deterministic mode). Programs are ordered GROUP_F latent slices
                             at a time over all splits, so the W_enc slices in flight fit in L2.
Strategy "chunked" (`sae_stats_chunked.py`): torch's GEMM (cuBLAS) computes fp32 pre-activations of a
chunk of tokens, then `_chunk_stats_kernel` reduces them per class with this module's tile fold.

Max and argmax go out as one int64 (order-preserving float bits << 32 | (2^32 - 1 - index)) through
atomic_max: the largest value wins and on a tie the smallest index, exact and order-independent.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import (
    INTERPRET,
    MAX_BLOCK,
    check_gpu_dot_width,
    empty,
    load_tile,
    next_power_of_2,
    round_to,
    target_of,
)

ACT_CODES = {"relu": 0, "jumprelu": 1, "topk": 2}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Fused tiles, fixed (not autotuned) so the TopK candidate pass and the stats pass compute bit-identical
# pre-activations, and the deterministic mode depends on nothing but the shapes. Per SAE element size:
# 16-bit dots on tensor cores (BLOCK_F is the MMA's M: 128 for Hopper's warpgroup MMA), fp32 with
# full-precision FMA dots, whose operands live in registers. benchmarks/kernel_audit.py checks both.
_FUSED_CONFIGS = {
    2: {"BLOCK_T": 64, "BLOCK_F": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3},
    4: {"BLOCK_T": 32, "BLOCK_F": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 2},
}
# the interpreter pays per program and per op: few, large tiles
_INTERPRET_CONFIG = {"BLOCK_T": 64, "BLOCK_F": 256, "BLOCK_D": 256, "num_warps": 4, "num_stages": 1}
_INPUT_BLOCK = 4096
# tokens per split in deterministic mode: depends on nothing but T, so the summation order is fixed
DETERMINISTIC_ROWS_PER_SPLIT = 2048
# the fused strategy's token chunk when it needs a buffer (b_dec pre-pass, TopK candidates): at most
# this many bytes of SAE input, in whole deterministic splits
FUSED_INPUT_CHUNK_BYTES = 64 * 2**20
# largest token count per call: token indices travel in the low 32 bits of the packed max
MAX_TOKENS_PER_CALL = 2**31 - 1
_INT64_MIN = -(2**63)


@triton.jit
def _sae_input_kernel(
    x_ptr, b_dec_ptr, out_ptr, T, D, stride_xt, stride_xd,
    SUB_B_DEC: tl.constexpr, MANUAL_BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """out[T, D] = x cast to the SAE dtype, minus b_dec in that dtype: two roundings, as SAELens'
    process_sae_in (`x.to(dtype) - b_dec`) does."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < T * D
    o_t, o_d = o // D, o % D
    sae_dtype: tl.constexpr = out_ptr.dtype.element_ty
    b_x = tl.load(x_ptr + o_t * stride_xt + o_d * stride_xd, mask=m, other=0.0).to(tl.float32)
    b_x = round_to(b_x, sae_dtype, MANUAL_BF16).to(tl.float32)
    if SUB_B_DEC:
        b_x = b_x - tl.load(b_dec_ptr + o_d, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + o, round_to(b_x, sae_dtype, MANUAL_BF16), mask=m)


@triton.jit
def _pre_activation_tile(
    x_ptr, w_ptr, b_enc_ptr, o_t, m_t, o_f, m_f, D,
    stride_xt, stride_xd, stride_wd, stride_wf,
    FP32_DOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """[BLOCK_F, BLOCK_T] fp32 pre-activations, latents x tokens: W_enc^T tile @ x^T tile + b_enc.

    x is already in the SAE's dtype (minus b_dec where the SAE says so), so both operands are plain
    loads the pipeliner can stage asynchronously.
    """
    acc = tl.zeros((BLOCK_F, BLOCK_T), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_wt = load_tile(w_ptr, o_f, o_d, m_f, m_d, stride_wf, stride_wd)  # [BLOCK_F, BLOCK_D]
        b_xt = load_tile(x_ptr, o_d, o_t, m_d, m_t, stride_xd, stride_xt)  # [BLOCK_D, BLOCK_T]
        if FP32_DOT:
            # fp32 SAEs: full fp32 products (no tf32), as SAELens' fp32 matmul; also the interpreter,
            # where bf16 tl.dot is wrong
            acc = tl.dot(b_wt.to(tl.float32), b_xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(b_wt, b_xt, acc)
    b_benc = tl.load(b_enc_ptr + o_f, mask=m_f, other=0.0).to(tl.float32)  # [BLOCK_F]
    return acc + b_benc[:, None]


@triton.jit
def _topk_candidates_kernel(
    x_ptr, w_ptr, b_enc_ptr, cand_ptr,
    T, D, F, K, cols_per_group,
    stride_xt, stride_xd, stride_wd, stride_wf, stride_ct, stride_cg,
    FP32_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """cand[t, g, :] = the K largest pre-activations of row t among latent group g (-inf past K).

    Programs run over (token tiles, latent groups), so a wide SAE gives enough programs to fill a GPU.
    The run holds the K largest values seen so far per row (a multiset, unsorted; slots >= K pinned to
    +inf). A tile's values above the run's minimum are its only candidates; they are inserted largest
    first, each replacing the run's minimum, until none beats it. After the first tiles few values
    qualify, so the loop is short. (tl.topk / tl.sort would do the merge too, but the interpreter runs
    their bitonic stages element by element, about a second per stage.)
    """
    i_t = tl.program_id(0).to(tl.int64)
    i_g = tl.program_id(1).to(tl.int64)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    o_k = tl.arange(0, BLOCK_K)
    o_col = tl.arange(0, BLOCK_F)
    f_begin = i_g * cols_per_group
    f_end = tl.minimum(F, f_begin + cols_per_group)
    # rows of the run are tokens: [BLOCK_T, BLOCK_K]
    b_run = tl.where(o_k[None, :] < K, float("-inf"), float("inf")) + tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    for f0 in range(f_begin, f_end, BLOCK_F):
        o_f = f0 + o_col
        m_f = o_f < f_end
        b_pre = _pre_activation_tile(
            x_ptr, w_ptr, b_enc_ptr, o_t, m_t, o_f, m_f, D,
            stride_xt, stride_xd, stride_wd, stride_wf,
            FP32_DOT, BLOCK_T, BLOCK_F, BLOCK_D,
        )  # fmt: skip
        b_cand = tl.where(m_f[None, :] & m_t[:, None], tl.trans(b_pre), float("-inf"))  # [BLOCK_T, BLOCK_F]
        b_min = tl.min(b_run, axis=1)  # [BLOCK_T]
        n_iter = tl.max(tl.minimum(tl.sum((b_cand > b_min[:, None]).to(tl.int32), axis=1), K))
        for _ in range(0, n_iter):
            b_best = tl.max(b_cand, axis=1)  # [BLOCK_T]
            b_min = tl.min(b_run, axis=1)
            # replace one slot holding the minimum where the best candidate beats it
            i_min = tl.min(tl.where(b_run == b_min[:, None], o_k[None, :], BLOCK_K), axis=1)
            b_put = (b_best > b_min)[:, None] & (o_k[None, :] == i_min[:, None])
            b_run = tl.where(b_put, b_best[:, None], b_run)
            # drop one occurrence of the best candidate
            i_best = tl.min(tl.where(b_cand == b_best[:, None], o_col[None, :], BLOCK_F), axis=1)
            b_cand = tl.where(o_col[None, :] == i_best[:, None], float("-inf"), b_cand)
    b_out = tl.where(o_k[None, :] < K, b_run, float("-inf"))
    tl.store(cand_ptr + o_t[:, None] * stride_ct + i_g * stride_cg + o_k[None, :], b_out, mask=m_t[:, None])


@triton.jit
def _empty_accumulators(BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr):
    """A program's per-(latent, class) accumulators: sum, squares, count, max, argmax; and per class
    the weight sum and token count."""
    acc_sum = tl.zeros((BLOCK_F, BLOCK_C), dtype=tl.float32)
    acc_sq = tl.zeros((BLOCK_F, BLOCK_C), dtype=tl.float32)
    acc_cnt = tl.zeros((BLOCK_F, BLOCK_C), dtype=tl.int32)
    acc_max = tl.full((BLOCK_F, BLOCK_C), float("-inf"), dtype=tl.float32)
    acc_arg = tl.zeros((BLOCK_F, BLOCK_C), dtype=tl.int32)  # token index in the call: < 2^31
    acc_wsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_tokens = tl.zeros((BLOCK_C,), dtype=tl.int32)
    return acc_sum, acc_sq, acc_cnt, acc_max, acc_arg, acc_wsum, acc_tokens


@triton.jit
def _fold_tile(
    b_pre, t0, o_t, m_t, o_f, m_f, label_ptr, tw_ptr, thr_ptr, kth_ptr, token_offset, count_tokens,
    acc_sum, acc_sq, acc_cnt, acc_max, acc_arg, acc_wsum, acc_tokens,
    C: tl.constexpr, ACT: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Fold a [BLOCK_F, BLOCK_T] pre-activation tile (latents x tokens, first token t0) into the
    [BLOCK_F, BLOCK_C] accumulators: the activation, then per class a masked row sum of w*a and w*a^2,
    the count of a > 0, and the row max with its first token (an index into the call's tokens:
    token_offset + t). `count_tokens` (one latent slice per split does it): also each class's token
    count and weight sum."""
    # where(pre > 0, pre, 0) rather than max(pre, 0): a -0.0 would pack below +0.0
    b_keep = b_pre > 0.0
    if ACT == 1:
        b_thr = tl.load(thr_ptr + o_f, mask=m_f, other=0.0).to(tl.float32)  # [BLOCK_F]
        b_keep = b_keep & (b_pre > b_thr[:, None])
    if ACT == 2:
        b_kth = tl.load(kth_ptr + o_t, mask=m_t, other=float("inf"))  # [BLOCK_T]
        b_keep = b_keep & (b_pre >= b_kth[None, :])
    b_a = tl.where(b_keep, b_pre, 0.0)  # [BLOCK_F, BLOCK_T]
    b_label = tl.load(label_ptr + o_t, mask=m_t, other=-1)  # [BLOCK_T]
    if HAS_WEIGHTS:
        b_w = tl.load(tw_ptr + o_t, mask=m_t, other=0.0)  # [BLOCK_T]
    else:
        b_w = tl.where(m_t, 1.0, 0.0)
    o_c = tl.arange(0, BLOCK_C)
    for c in tl.static_range(C):
        m_c = (b_label == c)[None, :]  # [1, BLOCK_T]
        b_aw = tl.where(m_c, b_a * b_w[None, :], 0.0)
        b_s = tl.sum(b_aw, axis=1)  # [BLOCK_F]
        b_sq = tl.sum(b_aw * b_a, axis=1)
        b_n = tl.sum((m_c & (b_a > 0.0)).to(tl.int32), axis=1)
        # the first token of the tile reaching the class's max
        b_mx, i_mx = tl.max(
            tl.where(m_c, b_a, float("-inf")), axis=1, return_indices=True, return_indices_tie_break_left=True
        )
        sel = (o_c == c)[None, :]  # [1, BLOCK_C]
        acc_sum += tl.where(sel, b_s[:, None], 0.0)
        acc_sq += tl.where(sel, b_sq[:, None], 0.0)
        acc_cnt += tl.where(sel, b_n[:, None], 0)
        # strictly larger: an earlier tile of this split keeps a tie
        take = sel & (b_mx[:, None] > acc_max)
        acc_arg = tl.where(take, (token_offset + t0 + i_mx[:, None]).to(tl.int32), acc_arg)
        acc_max = tl.where(take, b_mx[:, None], acc_max)
        if count_tokens:
            in_c = b_label == c
            acc_wsum += tl.where(o_c == c, tl.sum(tl.where(in_c, b_w, 0.0)), 0.0)
            acc_tokens += tl.where(o_c == c, tl.sum(in_c.to(tl.int32)), 0)
    return acc_sum, acc_sq, acc_cnt, acc_max, acc_arg, acc_wsum, acc_tokens


@triton.jit
def _flush(
    o_f, m_f, i_s, F, acc_sum, acc_sq, acc_cnt, acc_max, acc_arg, acc_wsum, acc_tokens, count_tokens,
    sum_ptr, sq_ptr, cnt_ptr, max_ptr, wsum_ptr, tokens_ptr, stride_split,
    C: tl.constexpr, DETERMINISTIC: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Add a program's accumulators to the [C, F] outputs: fp32 atomics (or its own slot of a [S, C, F]
    buffer when DETERMINISTIC), int64 atomics for counts, atomic_max of the packed (max, first token)."""
    o_c = tl.arange(0, BLOCK_C)
    m_cf = m_f[:, None] & (o_c < C)[None, :]
    p_cf = o_c[None, :] * F + o_f[:, None]  # [BLOCK_F, BLOCK_C] into a [C, F] row-major array
    if DETERMINISTIC:
        tl.store(sum_ptr + i_s * stride_split + p_cf, acc_sum, mask=m_cf)
        tl.store(sq_ptr + i_s * stride_split + p_cf, acc_sq, mask=m_cf)
    else:
        tl.atomic_add(sum_ptr + p_cf, acc_sum, mask=m_cf)
        tl.atomic_add(sq_ptr + p_cf, acc_sq, mask=m_cf)
    tl.atomic_add(cnt_ptr + p_cf, acc_cnt.to(tl.int64), mask=m_cf)
    # order-preserving int32 key of the float: flip the magnitude bits of negatives
    b_bits = acc_max.to(tl.int32, bitcast=True)
    b_key = tl.where(b_bits < 0, b_bits ^ 0x7FFFFFFF, b_bits).to(tl.int64)
    b_packed = (b_key << 32) + (4294967295 - acc_arg.to(tl.int64))
    tl.atomic_max(max_ptr + p_cf, b_packed, mask=m_cf & (acc_max > float("-inf")))
    if count_tokens:
        m_c = o_c < C
        if DETERMINISTIC:
            tl.store(wsum_ptr + i_s * C + o_c, acc_wsum, mask=m_c)
        else:
            tl.atomic_add(wsum_ptr + o_c, acc_wsum, mask=m_c)
        tl.atomic_add(tokens_ptr + o_c, acc_tokens.to(tl.int64), mask=m_c)


@triton.jit
def _grouped_slice_and_split(n_f, n_s, GROUP_F: tl.constexpr):
    """(latent slice, token split) of this program: GROUP_F slices at a time, slices fastest, all
    splits of a group before the next group, so the W_enc slices in flight stay in L2 and the programs
    running side by side read the same token tiles."""
    pid = tl.program_id(0)
    per_group = GROUP_F * n_s
    first_f = (pid // per_group) * GROUP_F
    size = tl.minimum(n_f - first_f, GROUP_F)
    i_f = first_f + (pid % per_group) % size
    i_s = (pid % per_group) // size
    return i_f.to(tl.int64), i_s.to(tl.int64)


@triton.jit
def _sae_stats_kernel(
    x_ptr, w_ptr, b_enc_ptr, thr_ptr, kth_ptr, label_ptr, tw_ptr,
    sum_ptr, sq_ptr, cnt_ptr, max_ptr, wsum_ptr, tokens_ptr,
    T, D, F, rows_per_split, n_splits, token_offset,
    stride_xt, stride_xd, stride_wd, stride_wf, stride_split,
    C: tl.constexpr, ACT: tl.constexpr, HAS_WEIGHTS: tl.constexpr, DETERMINISTIC: tl.constexpr,
    FP32_DOT: tl.constexpr, GROUP_F: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per-class sums / squares / counts / packed max of one latent slice over one token split; the
    programs of the first slice also count each class's tokens and weights."""
    i_f, i_s = _grouped_slice_and_split(tl.cdiv(F, BLOCK_F), n_splits, GROUP_F)
    o_f = i_f * BLOCK_F + tl.arange(0, BLOCK_F)
    m_f = o_f < F
    acc_sum, acc_sq, acc_cnt, acc_max, acc_arg, acc_wsum, acc_tokens = _empty_accumulators(BLOCK_F, BLOCK_C)
    t_begin = i_s * rows_per_split
    t_end = tl.minimum(T, t_begin + rows_per_split)
    for t0 in range(t_begin, t_end, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < t_end
        b_pre = _pre_activation_tile(
            x_ptr, w_ptr, b_enc_ptr, o_t, m_t, o_f, m_f, D,
            stride_xt, stride_xd, stride_wd, stride_wf,
            FP32_DOT, BLOCK_T, BLOCK_F, BLOCK_D,
        )  # fmt: skip
        acc_sum, acc_sq, acc_cnt, acc_max, acc_arg, acc_wsum, acc_tokens = _fold_tile(
            b_pre, t0, o_t, m_t, o_f, m_f, label_ptr, tw_ptr, thr_ptr, kth_ptr, token_offset, i_f == 0,
            acc_sum, acc_sq, acc_cnt, acc_max, acc_arg, acc_wsum, acc_tokens,
            C, ACT, HAS_WEIGHTS, BLOCK_C,
        )  # fmt: skip
    _flush(o_f, m_f, i_s, F, acc_sum, acc_sq, acc_cnt, acc_max, acc_arg, acc_wsum, acc_tokens, i_f == 0,
           sum_ptr, sq_ptr, cnt_ptr, max_ptr, wsum_ptr, tokens_ptr, stride_split,
           C, DETERMINISTIC, BLOCK_C)  # fmt: skip


# ------------------------------------------------------------------------------------------ launchers


def fused_config(T: int, sae_dtype: torch.dtype, k: int | None = None) -> dict:
    """Tiles of the fused kernels for this SAE dtype, shrunk along T for tiny batches; BLOCK_K for TopK."""
    elem = torch.empty((), dtype=sae_dtype).element_size()
    cfg = dict(_INTERPRET_CONFIG if INTERPRET else _FUSED_CONFIGS[elem])
    cfg["BLOCK_T"] = min(cfg["BLOCK_T"], max(16, next_power_of_2(T)))
    if k is not None:
        # the running top-k lives in registers: [BLOCK_T, next_power_of_2(k)]
        block_k = next_power_of_2(k)
        if block_k > MAX_BLOCK:
            raise ValueError(f"sae: TopK k={k} is above the kernel's limit of {MAX_BLOCK}")
        cfg["BLOCK_K"] = block_k
    for name in ("BLOCK_T", "BLOCK_F", "BLOCK_D"):
        check_gpu_dot_width(name, cfg[name])
    return cfg


def _check_launch(x: torch.Tensor, sae, out) -> None:
    if sae.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"sae: the Triton backend takes {SUPPORTED_DTYPES} weights, got {sae.dtype}")
    if x.shape[0] > MAX_TOKENS_PER_CALL:
        raise ValueError(
            f"x: at most {MAX_TOKENS_PER_CALL} tokens per call, got {x.shape[0]}; split the batch"
        )
    for name in ("act_sum", "act_sq_sum", "active_count", "weight_sum", "token_count"):
        if not getattr(out, name).is_contiguous():
            raise ValueError(f"out: {name} must be contiguous")


def _needs_input_pass(x: torch.Tensor, sae) -> bool:
    return x.dtype != sae.dtype or sae.apply_b_dec_to_input or x.stride(1) != 1


def sae_input(x: torch.Tensor, sae) -> torch.Tensor:
    """x as the encoder's GEMM reads it: in the SAE's dtype, minus b_dec when the SAE says so. x itself
    when nothing changes; otherwise a new [T, d] tensor (callers pass bounded chunks)."""
    if not _needs_input_pass(x, sae):
        return x
    T, D = x.shape
    out = empty((T, D), sae.dtype, x.device)
    if T:
        _sae_input_kernel[(triton.cdiv(T * D, _INPUT_BLOCK),)](
            x, sae.b_dec, out, T, D, x.stride(0), x.stride(1),
            SUB_B_DEC=sae.apply_b_dec_to_input, MANUAL_BF16=INTERPRET, BLOCK=_INPUT_BLOCK,
        )  # fmt: skip
    return out


def topk_thresholds(sae_in: torch.Tensor, sae, cfg: dict) -> torch.Tensor:
    """[T] fp32: the k-th largest pre-activation of each row (TopK), from per-group candidates."""
    T, D = sae_in.shape
    F = sae.num_features
    n_t = triton.cdiv(T, cfg["BLOCK_T"])
    tiles_f = triton.cdiv(F, cfg["BLOCK_F"])
    # enough latent groups for about two programs per SM; each group at least a few tiles wide
    groups = max(1, min(triton.cdiv(2 * target_of(sae_in.device).sm_count, n_t), tiles_f // 4))
    cols_per_group = triton.cdiv(tiles_f, groups) * cfg["BLOCK_F"]
    groups = triton.cdiv(F, cols_per_group)
    cand = empty((T, groups, cfg["BLOCK_K"]), torch.float32, sae_in.device)
    _topk_candidates_kernel[(n_t, groups)](
        sae_in, sae.W_enc, sae.b_enc, cand,
        T, D, F, sae.k, cols_per_group,
        sae_in.stride(0), sae_in.stride(1), sae.W_enc.stride(0), sae.W_enc.stride(1),
        cand.stride(0), cand.stride(1),
        FP32_DOT=INTERPRET or sae.dtype == torch.float32,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_F=cfg["BLOCK_F"], BLOCK_D=cfg["BLOCK_D"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return torch.topk(cand.view(T, -1), sae.k, dim=1, sorted=False).values.amin(dim=1)


def _splits(T: int, tiles_f: int, block_t: int, device: torch.device, deterministic: bool, rows_per_split):
    """Tokens per split: fixed by T in deterministic mode; otherwise enough splits for about eight
    waves of programs (a small tail), each split at least four token tiles."""
    if rows_per_split is None:
        if deterministic:
            rows_per_split = DETERMINISTIC_ROWS_PER_SPLIT
        else:
            wanted = triton.cdiv(8 * target_of(device).sm_count, tiles_f)
            splits = max(1, min(wanted, triton.cdiv(T, 4 * block_t)))
            rows_per_split = triton.cdiv(T, splits)
    rows_per_split = triton.cdiv(rows_per_split, block_t) * block_t
    return rows_per_split, triton.cdiv(T, rows_per_split)


class _Accumulators:
    """Where the kernels add a batch: `out` itself (atomics), or per-split slots summed in split order
    (deterministic); the packed max of the whole call is merged into `out` at the end."""

    def __init__(self, out, deterministic: bool):
        self.out, self.deterministic = out, deterministic
        C, F = out.num_classes, out.num_features
        self.packed_max = torch.full((C, F), _INT64_MIN, dtype=torch.int64, device=out.act_sum.device)

    def buffers(self, n_splits: int):
        """(sum, sum of squares, weight sum) the kernels write: slots when deterministic, else `out`."""
        out = self.out
        if not self.deterministic:
            return out.act_sum, out.act_sq_sum, out.weight_sum
        C, F, device = out.num_classes, out.num_features, out.act_sum.device
        self.slots = (
            empty((n_splits, C, F), torch.float32, device),
            empty((n_splits, C, F), torch.float32, device),
            empty((n_splits, C), torch.float32, device),
        )
        return self.slots

    def after_launch(self) -> None:
        if self.deterministic:
            # split order, fixed by T alone
            targets = (self.out.act_sum, self.out.act_sq_sum, self.out.weight_sum)
            for target, slot in zip(targets, self.slots, strict=True):
                target += slot.sum(0)

    def finish(self, T: int) -> None:
        out = self.out
        batch_max, batch_arg = unpack_max(self.packed_max)
        # strictly larger: on a tie the earlier batch keeps its token
        take = batch_max > out.act_max
        out.act_argmax = torch.where(take, batch_arg + out.tokens_seen, out.act_argmax)
        out.act_max = torch.maximum(out.act_max, batch_max)
        out.tokens_seen += T


@torch.no_grad()
def sae_stats_accumulate(
    x: torch.Tensor,
    sae,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None,
    out,
    deterministic: bool = False,
    rows_per_split: int | None = None,
) -> None:
    """The fused strategy: fold the statistics of x [T, d] into `out` (a FeatureStats on x's device).

    labels [T] int64 in [-1, C); token_weights [T] fp32 or None. Arguments are checked by the public
    function; this launcher checks what the kernels rely on. `rows_per_split` overrides the token split
    (tests use it to exercise the cross-program merge). Tokens go through in chunks only when a buffer
    is needed (a b_dec pre-pass or x in another dtype: [chunk, d]; TopK candidates), at most
    FUSED_INPUT_CHUNK_BYTES of SAE input each, in whole deterministic splits.
    """
    _check_launch(x, sae, out)
    T, D = x.shape
    if T == 0:
        return
    C, F = out.num_classes, out.num_features
    topk = sae.activation == "topk"
    cfg = fused_config(T, sae.dtype, sae.k if topk else None)
    elem = torch.empty((), dtype=sae.dtype).element_size()
    chunk = T
    if topk or _needs_input_pass(x, sae):
        per_chunk = max(1, FUSED_INPUT_CHUNK_BYTES // (D * elem) // DETERMINISTIC_ROWS_PER_SPLIT)
        chunk = per_chunk * DETERMINISTIC_ROWS_PER_SPLIT
    tiles_f = triton.cdiv(F, cfg["BLOCK_F"])
    # latent slices per group: the group's W_enc slices take at most half of L2
    slice_bytes = cfg["BLOCK_F"] * D * elem
    group_f = max(1, min(tiles_f, target_of(x.device).l2_bytes // 2 // slice_bytes))
    acc = _Accumulators(out, deterministic)
    thr = sae.threshold if sae.activation == "jumprelu" else sae.b_enc
    for start in range(0, T, chunk):
        xs = x[start : start + chunk]
        n = xs.shape[0]
        sae_in = sae_input(xs, sae)
        kth = topk_thresholds(sae_in, sae, cfg) if topk else None
        rows, n_splits = _splits(n, tiles_f, cfg["BLOCK_T"], x.device, deterministic, rows_per_split)
        sums, squares, wsums = acc.buffers(n_splits)
        weights = token_weights[start : start + n] if token_weights is not None else sae.b_enc
        _sae_stats_kernel[(tiles_f * n_splits,)](
            sae_in, sae.W_enc, sae.b_enc, thr, kth if kth is not None else sae.b_enc,
            labels[start : start + n], weights,
            sums, squares, out.active_count, acc.packed_max, wsums, out.token_count,
            n, D, F, rows, n_splits, start,
            sae_in.stride(0), sae_in.stride(1), sae.W_enc.stride(0), sae.W_enc.stride(1), C * F,
            C=C, ACT=ACT_CODES[sae.activation], HAS_WEIGHTS=token_weights is not None,
            DETERMINISTIC=deterministic, FP32_DOT=INTERPRET or sae.dtype == torch.float32, GROUP_F=group_f,
            BLOCK_T=cfg["BLOCK_T"], BLOCK_F=cfg["BLOCK_F"], BLOCK_D=cfg["BLOCK_D"],
            BLOCK_C=next_power_of_2(C), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
        acc.after_launch()
    acc.finish(T)


def unpack_max(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max [C, F] fp32, argmax [C, F] int64) from the kernel's packed keys; (-inf, -1) where none."""
    none = packed == _INT64_MIN
    key = (packed >> 32).to(torch.int32)
    bits = torch.where(key < 0, key ^ 0x7FFFFFFF, key)
    value = bits.view(torch.float32)
    index = 4294967295 - (packed & 4294967295)
    return value.masked_fill(none, float("-inf")), index.masked_fill(none, -1)
