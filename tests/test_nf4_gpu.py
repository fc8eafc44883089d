"""gpu tier: NF4 dequantisation and every QLoRA strategy compiled, at real-model shapes, bf16 and fp16."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close

from sails_fast import dequantize_nf4, qlora_linear, quantize_nf4
from sails_fast.kernels.lora_ref import lora_linear_ref

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from shapes import MODELS  # noqa: E402

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
CASES = [(model, proj) for model in MODELS for proj in ("q_proj", "down_proj")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("model", "proj"), CASES)
def test_dequantize_triton_equals_reference(model, proj, dtype):
    k, n = MODELS[model].projections()[proj]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)
    nf4 = quantize_nf4(w, blocksize=64, double_quant=True)
    ours = dequantize_nf4(nf4, dtype, backend="triton")
    ref = dequantize_nf4(nf4, dtype, backend="torch")
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("strategy", ["fused", "dequant", "cublas"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("model", "proj"), CASES)
def test_qlora_real_shapes_forward_and_backward(model, proj, dtype, strategy):
    k, n = MODELS[model].projections()[proj]
    m, r = 1000, 16  # not a multiple of any block
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    nf4 = quantize_nf4(w, blocksize=64, double_quant=True)
    w_deq = dequantize_nf4(nf4, torch.float32, backend="torch")
    x = torch.randn(m, k, generator=g)
    a = torch.randn(r, k, generator=g) / k**0.5
    b = torch.randn(n, r, generator=g) / r**0.5
    bias = torch.randn(n, generator=g)
    dy = torch.randn(m, n, generator=g)

    def grads(y, xs, as_, bs, d):
        return (y, *torch.autograd.grad(y, (xs, as_, bs), d))

    xs, as_, bs = (t.to(DEVICE, dtype).requires_grad_() for t in (x, a, b))
    y = qlora_linear(xs, nf4, as_, bs, 2.0, bias.to(DEVICE, dtype), backend="triton", strategy=strategy)
    ours = grads(y, xs, as_, bs, dy.to(DEVICE, dtype))
    refs = []
    for run_dtype in (torch.float32, dtype):
        xr, ar, br = (t.to(DEVICE, run_dtype).requires_grad_() for t in (x, a, b))
        yr = lora_linear_ref(xr, w_deq.to(run_dtype), ar, br, 2.0, bias.to(DEVICE, run_dtype))
        refs.append(grads(yr, xr, ar, br, dy.to(DEVICE, run_dtype)))
    for name, o, r32, rlo in zip(("y", "dx", "dA", "dB"), ours, *refs, strict=True):
        assert_close(f"{model}/{proj}/{strategy}/{name}", o, r32, rlo, dtype)
