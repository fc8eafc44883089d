"""Fused layers inside real training code: the dtype combinations PEFT uses, autocast (bf16, and fp16 with
a GradScaler), deepcopy, state dicts and .to(), torch.compile, and the fuse_lora API.

The fused op runs its Triton kernels (under the interpreter here) through `backend="triton"`; PEFT's own
layer, run the same way, is the oracle, by the house rule (tests/helpers.py): at most twice the error of
PEFT in the low precision against PEFT in fp32.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import assert_close
from torch import nn

import sails_fast
from sails_fast import fuse_lora, is_fused, unfuse_lora

peft = pytest.importorskip("peft")

K, N, R, ALPHA = 96, 80, 8, 16


def peft_mlp(base_dtype: torch.dtype, adapter_dtype: torch.dtype, seed: int = 0, dropout: float = 0.0):
    """Two PEFT LoRA linears (with a GELU between) over a base in `base_dtype`, adapters in
    `adapter_dtype`, B non-zero so the adapter term counts."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Sequential(nn.Linear(K, N), nn.GELU(), nn.Linear(N, K))
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0", "2"], lora_dropout=dropout)
    model = peft.get_peft_model(base.to(base_dtype), config, autocast_adapter_dtype=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(adapter_dtype)
    return model


def outputs_and_grads(model, x, dy):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    grads = torch.autograd.grad(y, [x, *params], dy.to(y.dtype))
    return [y, *grads]


COMBOS = [
    (torch.bfloat16, torch.float32),  # PEFT's default over a bf16 model (autocast_adapter_dtype=True)
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32),
]


def _grid(shape, gen) -> torch.Tensor:
    """Multiples of 2^-6 in [-2, 2]: exact in bf16 and fp16, so the low-precision runs start from the
    very inputs of the fp32 one."""
    return torch.randint(-128, 129, shape, generator=gen).float() / 64


@pytest.mark.parametrize("strategy", ["fused", "cublas"])
@pytest.mark.parametrize(("base_dtype", "adapter_dtype"), COMBOS, ids=lambda d: str(d).removeprefix("torch."))
def test_numerics_equal_peft_in_every_dtype_combination(base_dtype, adapter_dtype, strategy):
    """One LoRA linear, the adapter term in the adapter's dtype as PEFT computes it: with fp32 adapters
    PEFT's dA and dB are fp32-accurate, and so must ours be (an adapter term run in bf16 is off by
    2^-9 there). The fp32 reference is the same model, same weights, upcast."""
    g = torch.Generator().manual_seed(1)
    x, dy = _grid((3, 13, K), g), _grid((3, 13, N), g)
    lowp = peft_mlp(base_dtype, adapter_dtype)
    lowp.base_model.model[2] = nn.Identity()  # one layer: no upstream rounding in the adapter gradients
    lowp.base_model.model[1] = nn.Identity()
    ref32 = outputs_and_grads(copy.deepcopy(lowp).float(), x, dy)
    ref_lo = outputs_and_grads(lowp, x.to(base_dtype), dy)
    model = copy.deepcopy(lowp)
    assert fuse_lora(model, backend="triton", strategy=strategy).fused
    ours = outputs_and_grads(model, x.to(base_dtype), dy)
    for name, o, r32, rlo in zip(["y", "dx", "dA", "dB"], ours, ref32, ref_lo, strict=True):
        assert o.dtype == rlo.dtype, f"{name}: {o.dtype}, PEFT gives {rlo.dtype}"
        assert_close(name, o, r32, rlo, base_dtype if name in ("y", "dx") else adapter_dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16_autocast_over_an_fp32_model_follows_peft(backend):
    """What Trainer(bf16=True) does on this machine: torch.autocast over an fp32 model. The fused layers
    return bf16 as PEFT's do, and the fp32 adapters get fp32 gradients."""
    g = torch.Generator().manual_seed(2)
    x, dy = torch.randn(2, 9, K, generator=g), torch.randn(2, 9, K, generator=g)
    ref32 = outputs_and_grads(peft_mlp(torch.float32, torch.float32), x, dy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_lo = outputs_and_grads(peft_mlp(torch.float32, torch.float32), x, dy)
        model = peft_mlp(torch.float32, torch.float32)
        fuse_lora(model, backend=backend)
        ours = outputs_and_grads(model, x, dy)
    assert ref_lo[0].dtype == torch.bfloat16
    for name, o, r32, rlo in zip(["y", "dx", "dA0", "dB0", "dA1", "dB1"], ours, ref32, ref_lo, strict=True):
        assert o.dtype == rlo.dtype, f"{name}: {o.dtype}, PEFT gives {rlo.dtype}"
        assert_close(name, o, r32, rlo, torch.bfloat16)


def test_fp16_autocast_with_a_grad_scaler_trains():
    """fp16 mixed precision with a GradScaler: scaled gradients reach the fp32 adapters, steps apply."""
    model = peft_mlp(torch.float32, torch.float32)
    fuse_lora(model, backend="triton")
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(x).float().square().mean()
    scaler.scale(loss).backward()
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in params
    )
    scaler.step(opt)
    scaler.update()
    assert all(not torch.equal(b, p) for b, p in zip(before, params, strict=True))


def test_deepcopy_of_a_fused_model_runs_on_its_own_weights():
    """trl's reference model and EMA copies: a deep copy must use its own weights, fused or falling back
    (adapters disabled, merged), exactly like a deep copy of the unfused PEFT model."""
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(4))
    fused = peft_mlp(torch.float32, torch.float32)
    fuse_lora(fused, backend="torch")
    fused_copy = copy.deepcopy(fused)
    plain_copy = copy.deepcopy(peft_mlp(torch.float32, torch.float32))
    assert is_fused(fused_copy)
    # the original changes; the copies must not notice
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(1.0)
    with torch.no_grad():
        assert torch.allclose(fused_copy(x), plain_copy(x), atol=1e-5)
        with fused_copy.disable_adapter(), plain_copy.disable_adapter():
            assert torch.allclose(fused_copy(x), plain_copy(x), atol=1e-5)
        fused_copy.merge_adapter()
        plain_copy.merge_adapter()
        assert torch.allclose(fused_copy(x), plain_copy(x), atol=1e-5)


def test_state_dict_round_trip_and_dtype_moves_after_fusing():
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(5))
    model = peft_mlp(torch.float32, torch.float32)
    fuse_lora(model, backend="torch")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    other = peft_mlp(torch.float32, torch.float32, seed=9)
    fuse_lora(other, backend="torch")
    other.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))
        half = model.to(torch.bfloat16)
        assert half(x.to(torch.bfloat16)).dtype == torch.bfloat16 and is_fused(half)
    assert unfuse_lora(model) == 2 and not is_fused(model)


def test_torch_compile_keeps_the_fused_ops_whole():
    """torch.compile sees each fused layer as one registered operator: no graph break at the ops, and
    the compiled model computes what the eager one does, gradients included."""
    model = peft_mlp(torch.float32, torch.float32, dropout=0.1)
    fuse_lora(model, backend="triton")
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(6))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, backend="aot_eager")
    model.eval()
    compiled_y, eager_y = compiled(x), model(x)
    assert torch.allclose(compiled_y, eager_y, atol=1e-6)
    (grad_c,) = torch.autograd.grad(
        compiled(x).square().sum(), [model.base_model.model[0].lora_A["default"].weight]
    )
    (grad_e,) = torch.autograd.grad(
        model(x).square().sum(), [model.base_model.model[0].lora_A["default"].weight]
    )
    assert torch.allclose(grad_c, grad_e, atol=1e-5)


def test_torch_compile_keeps_the_4bit_op_whole():
    layer = sails_fast.NF4LoraLinear.from_linear(nn.Linear(K, N), r=R, alpha=ALPHA, backend="triton")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(7))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert torch.allclose(torch.compile(layer, backend="aot_eager")(x), layer(x), atol=1e-6)


def test_fuse_lora_api():
    assert {"fuse_lora", "unfuse_lora", "is_fused"} <= set(sails_fast.__all__)
    model = peft_mlp(torch.float32, torch.float32)
    with pytest.raises(ValueError, match="^backend:"):
        fuse_lora(model, backend="typo")
    with pytest.raises(ValueError, match="^strategy:"):
        fuse_lora(model, strategy="typo")
    assert not is_fused(model), "a refused call changes nothing"
    with pytest.warns(UserWarning, match="fused nothing"):
        report = fuse_lora(nn.Sequential(nn.Linear(4, 4)))
    assert report.fused == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(fuse_lora(model).fused) == 2


def _readme_blocks(section: str) -> list[str]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = readme.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_readme_fused_layer_examples_run_on_cpu_as_written():
    blocks = _readme_blocks("Use the fused layers")
    assert len(blocks) >= 2
    done = subprocess.run(
        [sys.executable, "-c", "\n".join(blocks)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
