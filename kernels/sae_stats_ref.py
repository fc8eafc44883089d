"""Plain PyTorch reference for streaming SAE feature statistics; the CPU backend.

Same math as `kernels/sae_stats.py`: pre-activations are computed from the input processed in the SAE's
dtype (cast, minus b_dec when the SAE says so, exactly as SAELens' process_sae_in), multiplied by W_enc in
fp32 accumulation, plus b_enc; the activation and every reduction are fp32. Tokens are taken class by
class in chunks of at most `max_chunk_elements` activations, so memory does not grow with the number of
tokens. No triton import here.
"""

from __future__ import annotations

import torch

from sails_fast.core.feature_stats import FeatureStats

# activations held at once per chunk (fp32): 2**23 -> 32 MiB per [chunk, F] temporary
DEFAULT_CHUNK_ELEMENTS = 2**23


def activations_fp32(x: torch.Tensor, sae) -> torch.Tensor:
    """[n, F] fp32 activations of rows x [n, d] (the whole row is needed for TopK)."""
    sae_in = x.to(sae.W_enc.dtype)
    if sae.apply_b_dec_to_input:
        sae_in = sae_in - sae.b_dec
    pre = sae_in.float() @ sae.W_enc.float() + sae.b_enc.float()
    if sae.activation == "relu":
        return pre.clamp_(min=0.0)
    if sae.activation == "jumprelu":
        return torch.where((pre > 0) & (pre > sae.threshold.float()), pre, 0.0)
    # topk: the k-th largest pre-activation of the row is the cut; ties at the cut all stay active
    kth = torch.topk(pre, sae.k, dim=-1, sorted=True).values[:, -1:]
    return torch.where((pre > 0) & (pre >= kth), pre, 0.0)


@torch.no_grad()
def sae_feature_stats_ref(
    x: torch.Tensor,
    sae,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    num_classes: int = 2,
    out: FeatureStats | None = None,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> FeatureStats:
    """Per-class statistics of the SAE's activations on x, folded into `out` (or a new FeatureStats).

    Args:
        x [T, d], labels [T] int64 in [-1, num_classes), token_weights [T] or None (all 1): checked by the
            caller (`sails_fast.sae_feature_stats`).
        sae: SAEWeights.
        out: statistics of earlier tokens; this batch counts as coming after them.
        max_chunk_elements: cap on the [chunk, F] activations held at once.

    Returns:
        `out` updated in place, or a new FeatureStats when out is None.
    """
    T = x.shape[0]
    C, F = num_classes, sae.num_features
    device = x.device
    w = torch.ones(T, device=device) if token_weights is None else token_weights.float()
    batch = FeatureStats.empty(C, F, device=device)
    in_class = labels[:, None] == torch.arange(C, device=device)  # [T, C]
    batch.weight_sum = (in_class * w[:, None]).sum(0)
    batch.token_count = in_class.sum(0)
    chunk = max(1, max_chunk_elements // F)
    for c in range(C):
        # ascending token order inside the class, so the first maximal token wins a tie
        rows = torch.nonzero(labels == c).flatten()
        for start in range(0, rows.numel(), chunk):
            idx = rows[start : start + chunk]
            a = activations_fp32(x[idx], sae)  # [n, F]
            wc = w[idx]
            top = a.amax(0)
            take = top > batch.act_max[c]
            # first token reaching the max, looked up only in the latents whose max this chunk raises
            cols = torch.nonzero(take).flatten()
            first = (a[:, cols] == top[cols]).int().argmax(0)
            batch.act_argmax[c, cols] = idx[first]
            batch.act_max[c] = torch.maximum(batch.act_max[c], top)
            batch.act_sum[c] += wc @ a
            # in place from here on, to keep one [n, F] buffer: a -> a^2 -> sign(a^2) (a >= 0)
            batch.act_sq_sum[c] += wc @ a.mul_(a)
            batch.active_count[c] += (torch.ones_like(wc) @ a.sign_()).round().long()
            del a
    batch.tokens_seen = T
    if out is None:
        return batch
    return out.merge(batch)
