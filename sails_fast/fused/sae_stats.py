"""Streaming SAE encoding fused with per-class feature statistics: the public function.

Kernels and launcher live in `sails_fast.kernels.sae_stats`; the plain chunked reference, which is also
the CPU backend, in `sails_fast.kernels.sae_stats_ref`. docs/sae_stats.md explains the design.
"""

from __future__ import annotations

from typing import Literal

import torch

from sails_fast.core.feature_stats import FeatureStats
from sails_fast.fused import strategy as strategies
from sails_fast.fused.backend import resolve_backend
from sails_fast.fused.roofline import DEFAULT_MAX_CHUNK_BYTES
from sails_fast.kernels.sae_stats_ref import sae_feature_stats_ref
from sails_fast.sae.weights import SAEWeights

Backend = Literal["auto", "triton", "torch"]


Strategy = Literal["auto", "fused", "chunked"]


def _validate(
    x: torch.Tensor,
    sae: SAEWeights,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None,
    num_classes: int,
    out: FeatureStats | None,
) -> None:
    if not isinstance(sae, SAEWeights):
        raise ValueError(
            "sae: expected SAEWeights (SAEWeights.from_sae_lens converts a SAELens SAE), "
            f"got {type(sae).__name__}"
        )
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != sae.d_model:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected shape [T, {sae.d_model}] (the SAE's d_in), got {shape}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x: expected a floating-point dtype, got {x.dtype}")
    if x.device != sae.device:
        raise ValueError(f"sae: weights on {sae.device}, x on {x.device}; move one of them")
    T = x.shape[0]
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != T:
        shape = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: expected shape [{T}] (one per token of x), got {shape}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"labels: expected an integer dtype (int64), got {labels.dtype}")
    if labels.device != x.device:
        raise ValueError(f"labels: on {labels.device}, x on {x.device}")
    if T and bool(((labels < -1) | (labels >= num_classes)).any()):
        bad = labels[(labels < -1) | (labels >= num_classes)][:5].tolist()
        raise ValueError(f"labels: expected values in [-1, {num_classes}) (-1 = skip), got e.g. {bad}")
    if token_weights is not None:
        if not isinstance(token_weights, torch.Tensor) or token_weights.shape != (T,):
            shape = list(token_weights.shape) if isinstance(token_weights, torch.Tensor) else token_weights
            raise ValueError(f"token_weights: expected shape [{T}] (one per token of x), got {shape}")
        if not token_weights.dtype.is_floating_point:
            raise ValueError(f"token_weights: expected a floating-point dtype, got {token_weights.dtype}")
        if token_weights.device != x.device:
            raise ValueError(f"token_weights: on {token_weights.device}, x on {x.device}")
        if T and not bool(torch.isfinite(token_weights).all()):
            raise ValueError("token_weights: expected finite values, got NaN or inf")
        if T and bool((token_weights < 0).any()):
            raise ValueError(f"token_weights: expected values >= 0, got min {token_weights.min().item()}")
    if out is not None:
        if not isinstance(out, FeatureStats):
            raise ValueError(f"out: expected a FeatureStats, got {type(out).__name__}")
        if (out.num_classes, out.num_features) != (num_classes, sae.num_features):
            raise ValueError(
                f"out: has C={out.num_classes}, F={out.num_features}; expected C={num_classes} "
                f"(num_classes), F={sae.num_features} (the SAE's latents)"
            )
        if out.device != x.device:
            raise ValueError(f"out: on {out.device}, x on {x.device}")


@torch.no_grad()
def sae_feature_stats(
    x: torch.Tensor,
    sae: SAEWeights,
    labels: torch.Tensor,
    *,
    token_weights: torch.Tensor | None = None,
    num_classes: int = 2,
    out: FeatureStats | None = None,
    backend: Backend = "auto",
    deterministic: bool = False,
    strategy: Strategy = "auto",
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> FeatureStats:
    """Per-class statistics of the SAE's latents over a batch of tokens, without a [T, F] matrix.

    For each class c and latent f, with a = act((x - b_dec?) @ W_enc + b_enc) the SAE's activation
    (SAELens semantics; pre-activations accumulated in fp32) and w the token weight:

        weight_sum[c] = sum w            token_count[c] = #tokens
        act_sum[c, f] = sum w * a        act_sq_sum[c, f] = sum w * a^2
        active_count[c, f] = #(a > 0)    act_max[c, f] / act_argmax[c, f] = max a and its first token

    over the tokens labelled c. Tokens labelled -1 are skipped but still counted in `tokens_seen`, so
    argmax indices stay positions in the whole stream. TopK keeps every latent whose pre-activation
    ties the row's k-th largest (SAELens keeps exactly k, picking among ties arbitrarily).

    Args:
        x: [T, d] activations, any float dtype (cast to the SAE's dtype, as SAELens does).
        sae: SAEWeights with d = sae.d_model and F = sae.num_features, on x's device.
        labels: [T] integer class of each token in [-1, num_classes); -1 = skip.
        token_weights: [T] non-negative weights, default 1. 1 / len(response) per token gives
            per-example mean pooling.
        num_classes: C.
        out: a FeatureStats [C, F] on x's device to accumulate into (streaming); this batch counts as
            the tokens after those already in it. Updated in place and returned.
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (chunked PyTorch reference),
            or "auto" (triton where it can run).
        deterministic: Triton backend only. False (default): fp32 atomics, whose summation order, and so
            the last bits of act_sum / act_sq_sum, can change from run to run. True: per-split partials
            summed in a fixed order (bitwise reproducible), at the cost of a [splits, C, F] buffer
            (T / 2048 splits) and one extra reduction. Counts, max and argmax are exact either way.
        strategy: Triton backend only. "fused" (the encode GEMM and the statistics in one Triton kernel;
            extra memory: a few [C, F] arrays, plus a [chunk, d] input buffer when x must be cast or
            have b_dec subtracted), "chunked" (torch's GEMM, cuBLAS on a GPU, writes fp32
            pre-activations of a chunk of tokens, a Triton kernel reduces them: memory O(chunk x F)) or
            "auto" (the measured choice for this GPU and shape in `sails_fast/fused/strategy_table.json`, else
            the roofline model's: `sails_fast.fused.strategy`).
        max_chunk_bytes: the chunked strategy's [T_c, F] fp32 buffer is at most this (default 256 MiB).

    Returns:
        FeatureStats: `out`, or a new one.

    Example:
        >>> sae = load_sae("my_sae_dir")
        >>> stats = FeatureStats.empty(num_classes=2, num_features=sae.num_features, device="cuda")
        >>> for x, labels in batches:      # x [T, d], labels [T] in {-1, 0, 1}
        ...     sae_feature_stats(x, sae, labels, out=stats)
        >>> diff = stats.mean()[1] - stats.mean()[0]     # [F]
    """
    _validate(x, sae, labels, token_weights, num_classes, out)
    strategies.check_strategy("sae_feature_stats", strategy)
    if not isinstance(max_chunk_bytes, int) or isinstance(max_chunk_bytes, bool) or max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes: expected a positive int (bytes), got {max_chunk_bytes!r}")
    chosen = resolve_backend(backend, x, sae.W_enc)
    labels = labels.to(torch.int64).contiguous()
    if token_weights is not None:
        token_weights = token_weights.to(torch.float32).contiguous()
    if chosen == "torch":
        return sae_feature_stats_ref(x, sae, labels, token_weights, num_classes, out)

    from sails_fast.kernels.sae_stats import sae_stats_accumulate
    from sails_fast.kernels.sae_stats_chunked import sae_stats_chunked

    if out is None:
        out = FeatureStats.empty(num_classes, sae.num_features, device=x.device)
    if strategy == "auto" and x.shape[0]:
        shape = {"T": x.shape[0], "d": sae.d_model, "F": sae.num_features}
        strategy = strategies.choose("sae_feature_stats", x.device, **shape)
    if strategy == "fused":
        sae_stats_accumulate(x, sae, labels, token_weights, out, deterministic=deterministic)
    else:
        sae_stats_chunked(x, sae, labels, token_weights, out, max_chunk_bytes, deterministic=deterministic)
    return out
