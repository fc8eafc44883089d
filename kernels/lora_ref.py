"""Plain PyTorch reference for the fused LoRA linear: the test oracle and the CPU backend.

Same math and signature as `sails_fast.lora_linear` (PEFT's lora.Linear, dtypes included):

    y = x @ W^T + bias + scaling * (dropout(x) @ A^T) @ B^T

The base runs in x's dtype; the adapter in lora_A's dtype (PEFT casts the adapter's input to it, so fp32
adapters over a bf16 base give an fp32 adapter term), and the sum is rounded to x's dtype.

Imports no triton. Autograd comes from PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference LoRA linear.

    Args:
        x: [..., in].
        weight: [out, in]. bias: [out] or None.
        lora_A: [r, in]. lora_B: [out, r] (read in lora_A's dtype). The adapter product runs in lora_A's
            dtype, as PEFT's: x is cast to it, dropout applied there.
        scaling: alpha / r (or alpha / sqrt(r)).
        dropout_p: dropout probability on the adapter input.
        dropout_mask: optional boolean keep-mask shaped like x; when given it replaces a fresh Bernoulli
            draw (tests pass the mask the Triton kernel generates, to compare bit for bit).
    Returns:
        [..., out] in x's dtype.
    """
    base = F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    adapter_dtype = lora_A.dtype
    x_adapter = x.to(adapter_dtype)
    if dropout_p > 0.0:
        keep = (
            dropout_mask if dropout_mask is not None else torch.rand_like(x, dtype=torch.float32) >= dropout_p
        )
        x_adapter = x_adapter * keep.to(adapter_dtype) / (1.0 - dropout_p)
    xa = F.linear(x_adapter, lora_A)
    adapter = F.linear(xa, lora_B.to(adapter_dtype)) * scaling
    return (base + adapter).to(x.dtype)
