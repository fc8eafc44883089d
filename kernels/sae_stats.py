"""Triton kernels and launcher for streaming SAE feature statistics (docs/sae_stats.md has the design).

    pre = (x - b_dec?) @ W_enc + b_enc,  a = act(pre)     x [T, d], W_enc [d, F]
    per class c, per latent f:  sum w*a, sum w*a^2, #(a > 0), max a, first argmax

One pass: a program owns one BLOCK_F slice of latents and one contiguous split of tokens. It walks its
tokens BLOCK_T at a time, builds the [BLOCK_T, BLOCK_F] pre-activation tile with tl.dot over d, applies the
activation in registers and folds the tile into [BLOCK_C, BLOCK_F] register accumulators. At the end it
adds them to the [C, F] outputs: fp32 atomics (default) or, with `deterministic`, a store into its own
slot of a [S, C, F] buffer summed in split order by the launcher. The max and its token index go out as
one int64 (order-preserving float bits << 32 | (2^32 - 1 - index)) through atomic_max, so the largest
value wins and on a tie the smallest index: exact and order-independent. No [T, F] tensor exists.

TopK first runs `_topk_threshold_kernel`: per row, a running top-k over the F tiles gives the k-th
largest pre-activation ([T] fp32), which the stats pass uses as the row's cut.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import INTERPRET, MAX_BLOCK, check_gpu_dot_width, empty, next_power_of_2

ACT_CODES = {"relu": 0, "jumprelu": 1, "topk": 2}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# tile sizes: fixed (not autotuned) so the TopK pre-pass and the stats pass compute bit-identical
# pre-activations, and the deterministic mode does not depend on an autotuning outcome
_GPU_CONFIG = {"BLOCK_T": 128, "BLOCK_F": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3}
# the interpreter pays per program and per op: few, large tiles
_INTERPRET_CONFIG = {"BLOCK_T": 64, "BLOCK_F": 256, "BLOCK_D": 256, "num_warps": 4, "num_stages": 1}
# tokens per split in deterministic mode: depends on nothing but T, so the summation order is fixed
DETERMINISTIC_ROWS_PER_SPLIT = 2048
# largest token count per call: token indices travel in the low 32 bits of the packed max
MAX_TOKENS_PER_CALL = 2**31 - 1
_INT64_MIN = -(2**63)


@triton.jit
def _pre_activation_tile(
    x_ptr, w_ptr, b_enc_ptr, b_dec_ptr,
    o_t, m_t, o_f, m_f, D,
    stride_xt, stride_xd, stride_wd, stride_wf,
    SUB_B_DEC: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """[BLOCK_T, BLOCK_F] fp32 pre-activations: (x in the SAE dtype, minus b_dec) @ W_enc + b_enc."""
    sae_dtype = w_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_x = tl.load(
            x_ptr + o_t[:, None] * stride_xt + o_d[None, :] * stride_xd,
            mask=m_t[:, None] & m_d[None, :],
            other=0.0,
        ).to(sae_dtype)  # [BLOCK_T, BLOCK_D]
        if SUB_B_DEC:
            # one rounding to the SAE dtype, as torch does for x - b_dec in SAELens' process_sae_in
            b_bdec = tl.load(b_dec_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BLOCK_D]
            b_x = (b_x.to(tl.float32) - b_bdec[None, :]).to(sae_dtype)
        b_w = tl.load(
            w_ptr + o_d[:, None] * stride_wd + o_f[None, :] * stride_wf,
            mask=m_d[:, None] & m_f[None, :],
            other=0.0,
        )  # [BLOCK_D, BLOCK_F]
        if FP32_DOT:
            # fp32 SAEs: full fp32 products (no tf32), as SAELens' fp32 matmul; also the interpreter,
            # where bf16 tl.dot is wrong
            acc = tl.dot(b_x.to(tl.float32), b_w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(b_x, b_w, acc)
    b_benc = tl.load(b_enc_ptr + o_f, mask=m_f, other=0.0).to(tl.float32)  # [BLOCK_F]
    return acc + b_benc[None, :]


@triton.jit
def _topk_threshold_kernel(
    x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, kth_ptr,
    T, D, F, K,
    stride_xt, stride_xd, stride_wd, stride_wf,
    SUB_B_DEC: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """kth[T]: the K-th largest pre-activation of each row, by a running top-K merged over the F tiles.

    The run holds the K largest values seen so far (a multiset, unsorted; slots >= K pinned to +inf).
    A tile's values above the run's minimum are its only candidates; they are inserted largest first,
    each replacing the run's minimum, until none beats it. After the first tiles few values qualify,
    so the loop is short. (tl.topk / tl.sort would do the merge too, but the interpreter runs their
    bitonic stages element by element, about a second per stage.)
    """
    i_t = tl.program_id(0).to(tl.int64)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    o_k = tl.arange(0, BLOCK_K)
    o_col = tl.arange(0, BLOCK_F)
    b_run = tl.where(o_k[None, :] < K, float("-inf"), float("inf")) + tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    for f0 in range(0, F, BLOCK_F):
        o_f = f0 + o_col
        m_f = o_f < F
        b_pre = _pre_activation_tile(
            x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, o_t, m_t, o_f, m_f, D,
            stride_xt, stride_xd, stride_wd, stride_wf,
            SUB_B_DEC, FP32_DOT, BLOCK_T, BLOCK_F, BLOCK_D,
        )  # fmt: skip
        b_cand = tl.where(m_f[None, :] & m_t[:, None], b_pre, float("-inf"))  # [BLOCK_T, BLOCK_F]
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
    tl.store(kth_ptr + o_t, tl.min(b_run, axis=1), mask=m_t)


@triton.jit
def _sae_stats_kernel(
    x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, thr_ptr, kth_ptr, label_ptr, tw_ptr,
    sum_ptr, sq_ptr, cnt_ptr, max_ptr,
    T, D, F, rows_per_split,
    stride_xt, stride_xd, stride_wd, stride_wf, stride_split,
    C: tl.constexpr, ACT: tl.constexpr, SUB_B_DEC: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    DETERMINISTIC: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per-class sums / squares / counts / packed max of one latent slice over one token split."""
    i_f = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    o_f = i_f * BLOCK_F + tl.arange(0, BLOCK_F)
    m_f = o_f < F
    o_c = tl.arange(0, BLOCK_C)
    acc_sum = tl.zeros((BLOCK_C, BLOCK_F), dtype=tl.float32)
    acc_sq = tl.zeros((BLOCK_C, BLOCK_F), dtype=tl.float32)
    acc_cnt = tl.zeros((BLOCK_C, BLOCK_F), dtype=tl.int32)
    acc_max = tl.full((BLOCK_C, BLOCK_F), float("-inf"), dtype=tl.float32)
    acc_arg = tl.zeros((BLOCK_C, BLOCK_F), dtype=tl.int64)
    if ACT == 1:
        b_thr = tl.load(thr_ptr + o_f, mask=m_f, other=0.0).to(tl.float32)  # [BLOCK_F]

    t_begin = i_s * rows_per_split
    t_end = tl.minimum(T, t_begin + rows_per_split)
    for t0 in range(t_begin, t_end, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T)
        m_t = o_t < t_end
        b_pre = _pre_activation_tile(
            x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, o_t, m_t, o_f, m_f, D,
            stride_xt, stride_xd, stride_wd, stride_wf,
            SUB_B_DEC, FP32_DOT, BLOCK_T, BLOCK_F, BLOCK_D,
        )  # fmt: skip
        # where(pre > 0, pre, 0) rather than max(pre, 0): a -0.0 would pack below +0.0
        b_keep = b_pre > 0.0
        if ACT == 1:
            b_keep = b_keep & (b_pre > b_thr[None, :])
        if ACT == 2:
            b_kth = tl.load(kth_ptr + o_t, mask=m_t, other=float("inf"))  # [BLOCK_T]
            b_keep = b_keep & (b_pre >= b_kth[:, None])
        b_a = tl.where(b_keep, b_pre, 0.0)  # [BLOCK_T, BLOCK_F]
        b_label = tl.load(label_ptr + o_t, mask=m_t, other=-1)  # [BLOCK_T]
        if HAS_WEIGHTS:
            b_w = tl.load(tw_ptr + o_t, mask=m_t, other=0.0)  # [BLOCK_T]
        else:
            b_w = tl.where(m_t, 1.0, 0.0)
        b_aw = b_a * b_w[:, None]
        for c in tl.static_range(C):
            m_c = (b_label == c)[:, None]  # [BLOCK_T, 1]
            b_s = tl.sum(tl.where(m_c, b_aw, 0.0), axis=0)  # [BLOCK_F]
            b_sq = tl.sum(tl.where(m_c, b_aw * b_a, 0.0), axis=0)
            b_n = tl.sum((m_c & b_keep).to(tl.int32), axis=0)
            b_ac = tl.where(m_c, b_a, float("-inf"))
            b_mx = tl.max(b_ac, axis=0)  # [BLOCK_F]
            # first token of the tile reaching the max
            b_ix = tl.min(tl.where(m_c & (b_ac == b_mx[None, :]), o_t[:, None], T), axis=0)
            sel = (o_c == c)[:, None]  # [BLOCK_C, 1]
            acc_sum += tl.where(sel, b_s[None, :], 0.0)
            acc_sq += tl.where(sel, b_sq[None, :], 0.0)
            acc_cnt += tl.where(sel, b_n[None, :], 0)
            # strictly larger: an earlier tile of this split keeps a tie
            take = sel & (b_mx[None, :] > acc_max)
            acc_arg = tl.where(take, b_ix[None, :].to(tl.int64), acc_arg)
            acc_max = tl.where(take, b_mx[None, :], acc_max)

    m_cf = (o_c < C)[:, None] & m_f[None, :]
    p_cf = o_c[:, None] * F + o_f[None, :]  # [BLOCK_C, BLOCK_F] into a [C, F] row-major array
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
    b_packed = (b_key << 32) + (4294967295 - acc_arg)
    tl.atomic_max(max_ptr + p_cf, b_packed, mask=m_cf & (acc_max > float("-inf")))


def pick_config(T: int, F: int, k: int | None = None) -> dict:
    """Tile sizes for this problem: the fixed config, shrunk along T for tiny batches."""
    cfg = dict(_INTERPRET_CONFIG if INTERPRET else _GPU_CONFIG)
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


def _num_programs_target(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def topk_thresholds(x: torch.Tensor, sae, cfg: dict) -> torch.Tensor:
    """[T] fp32: the k-th largest pre-activation of each row of x (TopK pre-pass)."""
    T, D = x.shape
    F = sae.num_features
    kth = empty((T,), torch.float32, x.device)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]),)
    _topk_threshold_kernel[grid](
        x, sae.W_enc, sae.b_enc, sae.b_dec, kth,
        T, D, F, sae.k,
        x.stride(0), x.stride(1), sae.W_enc.stride(0), sae.W_enc.stride(1),
        SUB_B_DEC=sae.apply_b_dec_to_input, FP32_DOT=INTERPRET or sae.dtype == torch.float32,
        BLOCK_T=cfg["BLOCK_T"], BLOCK_F=cfg["BLOCK_F"], BLOCK_D=cfg["BLOCK_D"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return kth


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
    """Fold the statistics of x [T, d] into `out` (a FeatureStats on x's device), in place.

    labels [T] int64 in [-1, C); token_weights [T] fp32 or None. Arguments are checked by the public
    function; this launcher checks what the kernel itself relies on. `rows_per_split` overrides the
    token split (tests use it to exercise the cross-program merge).
    """
    T, D = x.shape
    C, F = out.num_classes, out.num_features
    if sae.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"sae: the Triton backend takes {SUPPORTED_DTYPES} weights, got {sae.dtype}")
    if T > MAX_TOKENS_PER_CALL:
        raise ValueError(f"x: at most {MAX_TOKENS_PER_CALL} tokens per call, got {T}; split the batch")
    for name in ("act_sum", "act_sq_sum", "active_count"):
        if not getattr(out, name).is_contiguous():
            raise ValueError(f"out: {name} must be contiguous")
    if T == 0:
        return
    cfg = pick_config(T, F, sae.k if sae.activation == "topk" else None)
    block_t, block_f = cfg["BLOCK_T"], cfg["BLOCK_F"]
    n_f = triton.cdiv(F, block_f)
    if rows_per_split is None:
        if deterministic:
            rows_per_split = DETERMINISTIC_ROWS_PER_SPLIT
        else:
            # enough token splits to give every SM a few programs
            splits = max(1, min(triton.cdiv(T, block_t), triton.cdiv(_num_programs_target(x.device), n_f)))
            rows_per_split = triton.cdiv(T, splits)
    rows_per_split = triton.cdiv(rows_per_split, block_t) * block_t
    n_s = triton.cdiv(T, rows_per_split)

    kth = topk_thresholds(x, sae, cfg) if sae.activation == "topk" else None
    packed_max = torch.full((C, F), _INT64_MIN, dtype=torch.int64, device=x.device)
    if deterministic:
        sum_buf = empty((n_s, C, F), torch.float32, x.device)
        sq_buf = empty((n_s, C, F), torch.float32, x.device)
    else:
        sum_buf, sq_buf = out.act_sum, out.act_sq_sum
    thr = sae.threshold if sae.activation == "jumprelu" else sae.b_enc
    _sae_stats_kernel[(n_f, n_s)](
        x, sae.W_enc, sae.b_enc, sae.b_dec, thr, kth if kth is not None else x, labels,
        token_weights if token_weights is not None else x,
        sum_buf, sq_buf, out.active_count, packed_max,
        T, D, F, rows_per_split,
        x.stride(0), x.stride(1), sae.W_enc.stride(0), sae.W_enc.stride(1), C * F,
        C=C, ACT=ACT_CODES[sae.activation], SUB_B_DEC=sae.apply_b_dec_to_input,
        HAS_WEIGHTS=token_weights is not None, DETERMINISTIC=deterministic,
        FP32_DOT=INTERPRET or sae.dtype == torch.float32,
        BLOCK_T=block_t, BLOCK_F=block_f, BLOCK_D=cfg["BLOCK_D"], BLOCK_C=next_power_of_2(C),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    if deterministic:
        # split order, fixed by T alone
        out.act_sum += sum_buf.sum(0)
        out.act_sq_sum += sq_buf.sum(0)

    # per-class token counts and weights: [T, C] booleans, a plain reduction
    in_class = labels[:, None] == torch.arange(C, device=x.device)
    weights = token_weights if token_weights is not None else torch.ones(T, device=x.device)
    out.weight_sum += (in_class * weights[:, None]).sum(0)
    out.token_count += in_class.sum(0)

    batch_max, batch_arg = unpack_max(packed_max)
    # strictly larger: on a tie the earlier batch keeps its token
    take = batch_max > out.act_max
    out.act_argmax = torch.where(take, batch_arg + out.tokens_seen, out.act_argmax)
    out.act_max = torch.maximum(out.act_max, batch_max)
    out.tokens_seen += T


def unpack_max(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max [C, F] fp32, argmax [C, F] int64) from the kernel's packed keys; (-inf, -1) where none."""
    none = packed == _INT64_MIN
    key = (packed >> 32).to(torch.int32)
    bits = torch.where(key < 0, key ^ 0x7FFFFFFF, key)
    value = bits.view(torch.float32)
    index = 4294967295 - (packed & 4294967295)
    return value.masked_fill(none, float("-inf")), index.masked_fill(none, -1)
