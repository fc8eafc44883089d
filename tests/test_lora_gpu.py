"""gpu tier: the compiled LoRA kernels at real-model shapes, bf16 and fp16, forward and backward."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close

from sails_fast import lora_linear
from sails_fast.kernels.lora_ref import lora_linear_ref

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from shapes import MODELS  # noqa: E402

pytestmark = pytest.mark.gpu

CASES = [(model, proj) for model in MODELS for proj in ("q_proj", "o_proj", "down_proj")]


@pytest.mark.parametrize("strategy", ["fused", "cublas"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("model", "proj"), CASES)
def test_real_shapes_forward_and_backward(model, proj, dtype, strategy):
    k, n = MODELS[model].projections()[proj]
    m, r = 1000, 16  # 1000 tokens: not a multiple of any block
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    a = torch.randn(r, k, generator=g) / k**0.5
    b = torch.randn(n, r, generator=g) / r**0.5
    bias = torch.randn(n, generator=g)
    dy = torch.randn(m, n, generator=g)

    def run(fn, device, run_dtype, **kw):
        xs, as_, bs = (t.to(device, run_dtype).requires_grad_() for t in (x, a, b))
        y = fn(xs, w.to(device, run_dtype), as_, bs, 2.0, bias.to(device, run_dtype), **kw)
        return (y, *torch.autograd.grad(y, (xs, as_, bs), dy.to(device, run_dtype)))

    ours = run(lora_linear, "cuda", dtype, backend="triton", strategy=strategy)
    ref32 = run(lora_linear_ref, "cuda", torch.float32)
    ref_lo = run(lora_linear_ref, "cuda", dtype)
    for name, o, r32, rlo in zip(("y", "dx", "dA", "dB"), ours, ref32, ref_lo, strict=True):
        assert_close(f"{model}/{proj}/{strategy}/{name}", o, r32, rlo, dtype)


def test_dropout_on_gpu_matches_the_reference_with_the_kernel_mask():
    from sails_fast.kernels.lora import lora_dropout_mask

    m, k, n, r = 777, 2304, 2048, 16
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    a = (torch.randn(r, k, device="cuda") / k**0.5).requires_grad_()
    b = (torch.randn(n, r, device="cuda") / r**0.5).requires_grad_()
    y = lora_linear(x, w, a, b, 2.0, None, 0.1, backend="triton", seed=5)
    mask = lora_dropout_mask((m, k), 0.1, 5, x.device)
    y_ref = lora_linear_ref(x.float(), w.float(), a, b, 2.0, None, 0.1, dropout_mask=mask)
    y_lo = lora_linear_ref(x, w, a, b, 2.0, None, 0.1, dropout_mask=mask)
    assert_close("y", y, y_ref, y_lo, torch.bfloat16)
