"""Fused LoRA linear: forward and every gradient against the reference and against PEFT's lora.Linear."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from torch import nn

from sails_fast import FusedLoraLinear, lora_linear
from sails_fast.kernels.lora_ref import lora_linear_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# both strategies run the same reference and oracle tests (the "cublas" GEMM is torch's: CPU here)
STRATEGIES = ["fused", "cublas"]
# (leading dims of x, in, out, r): tiny odd, the real widths 576 and 2304, not a block multiple, 3-D
SHAPES = {
    "tiny_odd": ((5,), 7, 11, 3),
    "smollm2_576": ((37,), 576, 576, 16),
    "gemma2b_2304": ((9,), 2304, 264, 8),
    "not_block_multiple": ((70,), 300, 130, 16),
    "three_d": ((2, 13), 96, 80, 8),
}


def make_inputs(lead, k, n, r, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    a = torch.randn(r, k, generator=g) / k**0.5
    b = torch.randn(n, r, generator=g) / r**0.5
    bvec = torch.randn(n, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return cast(x), cast(w), cast(a), cast(b), cast(bvec)


def run_with_grads(fn, x, w, a, b, bias, dy, **kw):
    x, a, b = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y = fn(x, w, a, b, 1.75, bias, **kw)
    gx, ga, gb = torch.autograd.grad(y, (x, a, b), dy)
    return y, gx, ga, gb


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_grads_match_reference(shape, dtype, bias, dropout_p, strategy, kernel_device):
    from sails_fast.kernels.lora import lora_dropout_mask

    lead, k, n, r = SHAPES[shape]
    x, w, a, b, bvec = make_inputs(lead, k, n, r, dtype, kernel_device, bias)
    dy = torch.randn(*lead, n, generator=torch.Generator().manual_seed(1)).to(kernel_device, dtype)
    seed = 1234
    mask = None
    if dropout_p > 0:
        m = x.numel() // k
        mask = lora_dropout_mask((m, k), dropout_p, seed, kernel_device).reshape(x.shape).cpu()

    ours = run_with_grads(
        lora_linear, x, w, a, b, bvec, dy, dropout_p=dropout_p, backend="triton", seed=seed, strategy=strategy
    )
    f32 = lambda t: None if t is None else t.detach().cpu().float()
    ref32 = run_with_grads(
        lora_linear_ref, *map(f32, (x, w, a, b, bvec, dy)), dropout_p=dropout_p, dropout_mask=mask
    )
    lowp = lambda t: None if t is None else t.detach().cpu()
    ref_lo = run_with_grads(
        lora_linear_ref, *map(lowp, (x, w, a, b, bvec, dy)), dropout_p=dropout_p, dropout_mask=mask
    )
    for name, o, r32, rlo in zip(("y", "dx", "dA", "dB"), ours, ref32, ref_lo, strict=True):
        assert o.dtype == dtype, f"{name}: dtype {o.dtype}, expected {dtype}"
        assert_close(f"{shape}/{name}", o, r32, rlo, dtype)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_saves_nothing_of_size_tokens_by_out(strategy, kernel_device):
    """The autograd contract of both strategies: x, the weights, the adapters, xa [M, r] (in the
    adapter's dtype) and the 0-d dropout seed; no [M, N] tensor, no dropout mask."""
    lead, k, n, r = (40,), 64, 96, 8
    x, w, a, b, bias = make_inputs(lead, k, n, r, torch.bfloat16, kernel_device)
    a.requires_grad_()
    y = lora_linear(x.requires_grad_(), w, a, b, 1.0, bias, 0.1, backend="triton", seed=3, strategy=strategy)
    node = y.grad_fn
    while not hasattr(node, "saved_tensors"):  # the op's autograd node
        node = node.next_functions[0][0]
    saved = sorted(((tuple(t.shape), t.dtype) for t in node.saved_tensors), key=str)
    bf16 = torch.bfloat16
    expected = [
        ((40, k), bf16),
        ((n, k), bf16),
        ((r, k), bf16),
        ((n, r), bf16),
        ((40, r), bf16),
        ((), torch.int64),
    ]
    assert saved == sorted(expected, key=str), saved


def test_weight_and_bias_grads_only_when_required(kernel_device):
    x, w, a, b, bias = make_inputs((19,), 64, 48, 8, torch.float32, kernel_device)
    dy = torch.randn(19, 48).to(kernel_device)
    # frozen base: no weight or bias gradient computed
    x1, a1, b1 = (t.clone().requires_grad_() for t in (x, a, b))
    lora_linear(x1, w, a1, b1, 2.0, bias, backend="triton").backward(dy)
    assert w.grad is None and bias.grad is None
    # trainable base: gradients equal autograd through the reference
    w2, bias2 = w.clone().requires_grad_(), bias.clone().requires_grad_()
    y = lora_linear(x, w2, a, b, 2.0, bias2, backend="triton")
    gw, gbias = torch.autograd.grad(y, (w2, bias2), dy)
    w3, bias3 = w.cpu().clone().requires_grad_(), bias.cpu().clone().requires_grad_()
    rw, rbias = torch.autograd.grad(
        lora_linear_ref(x.cpu(), w3, a.cpu(), b.cpu(), 2.0, bias3), (w3, bias3), dy.cpu()
    )
    assert_close("dW", gw, rw)
    assert_close("dbias", gbias, rbias)


def test_dropout_is_reproducible_and_backward_reuses_the_mask(kernel_device):
    x, w, a, b, bias = make_inputs((33,), 96, 40, 8, torch.float32, kernel_device)
    y1 = lora_linear(x, w, a, b, 1.0, bias, 0.5, backend="triton", seed=7)
    y2 = lora_linear(x, w, a, b, 1.0, bias, 0.5, backend="triton", seed=7)
    y3 = lora_linear(x, w, a, b, 1.0, bias, 0.5, backend="triton", seed=8)
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y3)
    torch.manual_seed(3)
    z1 = lora_linear(x, w, a, b, 1.0, bias, 0.5, backend="triton")
    torch.manual_seed(3)
    z2 = lora_linear(x, w, a, b, 1.0, bias, 0.5, backend="triton")
    assert torch.equal(z1, z2), "torch.manual_seed must make the drawn dropout seed reproducible"


def test_dropout_mask_keeps_the_expected_fraction(kernel_device):
    from sails_fast.kernels.lora import lora_dropout_mask

    mask = lora_dropout_mask((256, 512), 0.3, 11, kernel_device)
    keep = mask.float().mean().item()
    # 131072 Bernoulli(0.7) draws: standard error 0.0013, so 0.01 is over 7 sigma
    assert abs(keep - 0.7) < 0.01
    assert not torch.equal(mask, lora_dropout_mask((256, 512), 0.3, 12, kernel_device))


def test_mixed_adapter_dtype_reads_adapter_in_activation_dtype(kernel_device):
    # PEFT keeps adapters in fp32 over a bf16 base; gradients come back in the adapter's own dtype
    x, w, _, _, bias = make_inputs((21,), 128, 64, 8, torch.bfloat16, kernel_device)
    _, _, a, b, _ = make_inputs((21,), 128, 64, 8, torch.float32, kernel_device)
    a, b = a.requires_grad_(), b.requires_grad_()
    y = lora_linear(x, w, a, b, 2.0, bias, backend="triton")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    a_ref, b_ref = a.detach().cpu().clone().requires_grad_(), b.detach().cpu().clone().requires_grad_()
    f = lambda t: t.detach().cpu().float()
    y_ref = lora_linear_ref(f(x), f(w), a_ref, b_ref, 2.0, f(bias))
    y_ref.sum().backward()
    assert_close(
        "y", y, y_ref, lora_linear_ref(x.cpu(), w.cpu(), a.detach().cpu(), b.detach().cpu(), 2.0, bias.cpu())
    )
    assert_close("dA", a.grad, a_ref.grad, dtype=torch.bfloat16)
    assert_close("dB", b.grad, b_ref.grad, dtype=torch.bfloat16)


def test_torch_backend_is_the_reference():
    x, w, a, b, bias = make_inputs((4, 3), 16, 8, 4, torch.float32, "cpu")
    torch.manual_seed(0)
    y = lora_linear(x, w, a, b, 0.5, bias, backend="torch")
    assert torch.equal(y, lora_linear_ref(x, w, a, b, 0.5, bias))


class _MaskDropout(nn.Module):
    """Stands in for PEFT's nn.Dropout with a fixed keep-mask, so PEFT sees our kernel's mask."""

    def __init__(self, mask: torch.Tensor, p: float):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask.to(x.dtype) / (1 - self.p)


def _peft_linear(base: nn.Linear, r: int, alpha: int, dropout: float, a: torch.Tensor, b: torch.Tensor):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        nn.Sequential(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["0"])
    )
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return layer


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_peft_lora_linear(dtype, dropout_p, strategy, kernel_device):
    """External oracle: PEFT's lora.Linear with the same weights (and our dropout mask)."""
    from sails_fast.kernels.lora import lora_dropout_mask

    lead, k, n, r = (3, 11), 576, 200, 16
    x, w, a, b, bias = make_inputs(lead, k, n, r, torch.float32, "cpu")
    dy = torch.randn(*lead, n)
    alpha, seed = 32, 99
    mask = (
        lora_dropout_mask((33, k), dropout_p, seed, kernel_device).reshape(x.shape).cpu()
        if dropout_p
        else None
    )

    def peft_run(run_dtype):
        base = nn.Linear(k, n).to(run_dtype)
        with torch.no_grad():
            base.weight.copy_(w)
            base.bias.copy_(bias)
        layer = _peft_linear(base, r, alpha, dropout_p, a, b).to(run_dtype)
        if dropout_p:
            layer.lora_dropout["default"] = _MaskDropout(mask, dropout_p)
        xx = x.to(run_dtype).requires_grad_()
        y = layer(xx)
        grads = torch.autograd.grad(
            y, (xx, layer.lora_A["default"].weight, layer.lora_B["default"].weight), dy.to(run_dtype)
        )
        return (y, *grads)

    ref32, ref_lo = peft_run(torch.float32), peft_run(dtype)
    dev = lambda t: t.to(kernel_device, dtype)
    xx, aa, bb = (dev(t).requires_grad_() for t in (x, a, b))
    y = lora_linear(
        xx, dev(w), aa, bb, alpha / r, dev(bias), dropout_p, backend="triton", seed=seed, strategy=strategy
    )
    ours = (y, *torch.autograd.grad(y, (xx, aa, bb), dev(dy)))
    for name, o, r32, rlo in zip(("y", "dx", "dA", "dB"), ours, ref32, ref_lo, strict=True):
        assert_close(f"peft/{name}", o, r32, rlo, dtype)


def test_fused_module_starts_as_the_base_and_trains():
    torch.manual_seed(0)
    base = nn.Linear(40, 24)
    layer = FusedLoraLinear(base, r=4, alpha=8, dropout=0.1)
    x = torch.randn(6, 40)
    layer.eval()
    assert torch.allclose(layer(x), base(x), atol=1e-6), "B = 0 at init: the output must equal the base"
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad
    assert layer.scaling == 2.0
    assert FusedLoraLinear(nn.Linear(40, 24), r=4, alpha=8, use_rslora=True).scaling == 4.0
    with torch.no_grad():
        layer.lora_B.normal_()
    merged = layer.merged_linear()
    assert torch.allclose(layer(x), merged(x), atol=1e-5)
    layer.train()
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None and layer.weight.grad is None


BAD_INPUTS = [
    ("x", dict(x=torch.randn(3, 9))),
    ("lora_A", dict(lora_A=torch.randn(4, 9))),
    ("lora_B", dict(lora_B=torch.randn(6, 5))),
    ("lora_B", dict(lora_B=torch.randn(7, 4))),
    ("bias", dict(bias=torch.randn(5))),
    ("lora_A", dict(lora_A=torch.randint(0, 3, (4, 8)))),
    ("x", dict(x=torch.randint(0, 3, (3, 8)))),
    ("dropout_p", dict(dropout_p=1.0)),
    ("dropout_p", dict(dropout_p=-0.1)),
    ("weight", dict(weight=torch.randn(6, 8, dtype=torch.float64))),
    ("backend", dict(backend="cuda")),
    ("strategy", dict(strategy="chunked")),
]


@pytest.mark.parametrize(
    ("arg", "override"), BAD_INPUTS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD_INPUTS)]
)
def test_bad_input_names_the_argument(arg, override):
    args = dict(
        x=torch.randn(3, 8), weight=torch.randn(6, 8), lora_A=torch.randn(4, 8), lora_B=torch.randn(6, 4),
        scaling=1.0, bias=torch.randn(6), dropout_p=0.0, backend="auto",
    )  # fmt: skip
    args.update(override)
    with pytest.raises(ValueError, match=arg):
        lora_linear(**args)


def test_tensors_on_different_devices_are_refused():
    meta = torch.randn(4, 8, device="meta")
    with pytest.raises(ValueError, match="lora_A"):
        lora_linear(torch.randn(3, 8), torch.randn(6, 8), meta, torch.randn(6, 4), 1.0)
