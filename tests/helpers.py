"""One comparison rule for every kernel test, and its tolerance table.

A kernel output in a low precision passes when

    max |out - ref_fp32| <= 2 * max |ref_lowp - ref_fp32| + atol[dtype] * max(1, max |ref_fp32|)

i.e. it may be at most twice as wrong as the plain PyTorch reference run in the same precision
(flash-attention's rule), plus a small floor scaled to the output's magnitude. NaN always fails.
"""

from __future__ import annotations

import torch

# floor per dtype, relative to the output's magnitude. fp32: summation order over ~1e3-1e4 terms.
# fp16 / bf16: one rounding of the output (half an ulp) that the reference may happen to avoid.
ATOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_close(
    name: str,
    out: torch.Tensor,
    ref_fp32: torch.Tensor,
    ref_lowp: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Fail with max abs diff, relative RMSE and the first mismatches when `out` breaks the rule."""
    dtype = dtype or out.dtype
    out32, ref32 = out.detach().float().cpu(), ref_fp32.detach().float().cpu()
    assert out32.shape == ref32.shape, f"{name}: shape {tuple(out32.shape)} != reference {tuple(ref32.shape)}"
    assert not torch.isnan(out32).any(), f"{name}: {int(torch.isnan(out32).sum())} NaN (unwritten or invalid)"
    err = (out32 - ref32).abs()
    scale = max(1.0, ref32.abs().max().item()) if ref32.numel() else 1.0
    ref_err = 0.0 if ref_lowp is None else (ref_lowp.detach().float().cpu() - ref32).abs().max().item()
    bound = 2.0 * ref_err + ATOL[dtype] * scale
    max_err = err.max().item() if err.numel() else 0.0
    if max_err > bound:
        rel_rmse = ((err**2).mean().sqrt() / ref32.pow(2).mean().sqrt().clamp_min(1e-12)).item()
        bad = torch.nonzero(err > bound)[:5].tolist()
        firsts = [(i, out32[tuple(i)].item(), ref32[tuple(i)].item()) for i in bad]
        raise AssertionError(
            f"{name}: max abs diff {max_err:.3e} > bound {bound:.3e} (2 x reference {dtype} error "
            f"{ref_err:.3e} + floor); relative RMSE {rel_rmse:.3e}; "
            f"first mismatches (index, out, ref): {firsts}"
        )
