"""QLoRA linear: forward and gradients of both paths against the reference and against PEFT's
lora.bnb.Linear4bit; the modules; and fuse_lora on a tiny Llama loaded in 4-bit through transformers."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import assert_close
from torch import nn

from sails_fast import (
    NF4LoraLinear,
    NF4Weight,
    dequantize_nf4,
    qlora_linear,
    quantize_model_nf4,
    quantize_nf4,
)
from sails_fast.kernels.nf4_ref import qlora_linear_ref

needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes (the oracle) is not installed"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PATHS = ["fused", "dequant", "cublas"]
# (leading dims of x, in, out, r, blocksize): tiny odd (an odd element count), a real width (rows start
# a quantisation block: the kernels' dense byte-tile path), blocks narrower than the tile (gather path),
# not a multiple of the block, 3-D input
SHAPES = {
    "tiny_odd": ((5,), 7, 11, 3, 32),
    "smollm2_576": ((19,), 576, 192, 16, 64),
    "rows_aligned_blocksize_32": ((9,), 128, 72, 8, 32),
    "not_block_multiple": ((70,), 300, 130, 16, 256),
    "three_d": ((2, 13), 96, 80, 8, 64),
}


def make_inputs(lead, k, n, r, blocksize, dtype, device, bias=True, seed=0, stored=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    a = torch.randn(r, k, generator=g) / k**0.5
    b = torch.randn(n, r, generator=g) / r**0.5
    bvec = torch.randn(n, generator=g) if bias else None
    nf4 = quantize_nf4(w.to(stored), blocksize, True)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return cast(x), nf4.to(device), cast(a), cast(b), cast(bvec)


def run_with_grads(fn, x, nf4, a, b, bias, dy, **kw):
    x, a, b = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y = fn(x, nf4, a, b, 1.75, bias, **kw)
    gx, ga, gb = torch.autograd.grad(y, (x, a, b), dy)
    return y, gx, ga, gb


def check_against_reference(x, nf4, a, b, bias, dy, dtype, dropout_p=0.0, mask=None, tag="", **kw):
    ours = run_with_grads(qlora_linear, x, nf4, a, b, bias, dy, dropout_p=dropout_p, backend="triton", **kw)
    cpu_nf4 = nf4.to("cpu")
    f32 = lambda t: None if t is None else t.detach().cpu().float()
    lowp = lambda t: None if t is None else t.detach().cpu()
    ref32 = run_with_grads(
        qlora_linear_ref, f32(x), cpu_nf4, f32(a), f32(b), f32(bias), f32(dy), dropout_p=dropout_p,
        dropout_mask=mask,
    )  # fmt: skip
    ref_lo = run_with_grads(
        qlora_linear_ref, lowp(x), cpu_nf4, lowp(a), lowp(b), lowp(bias), lowp(dy), dropout_p=dropout_p,
        dropout_mask=mask,
    )  # fmt: skip
    for name, o, r32, rlo in zip(("y", "dx", "dA", "dB"), ours, ref32, ref_lo, strict=True):
        assert o.dtype == dtype, f"{name}: dtype {o.dtype}, expected {dtype}"
        assert_close(f"{tag}/{name}", o, r32, rlo, dtype)


# fp16 on the small shapes only: the interpreter pays per op, and fp16 adds no path the others miss
CASES = [(s, d) for s in SHAPES for d in DTYPES if d != torch.float16 or s in ("tiny_odd", "three_d")]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("shape", "dtype"), CASES, ids=[f"{s}-{d}" for s, d in CASES])
def test_forward_and_grads_match_reference(shape, dtype, path, kernel_device):
    lead, k, n, r, bs = SHAPES[shape]
    x, nf4, a, b, bias = make_inputs(lead, k, n, r, bs, dtype, kernel_device)
    dy = torch.randn(*lead, n, generator=torch.Generator().manual_seed(1)).to(kernel_device, dtype)
    check_against_reference(x, nf4, a, b, bias, dy, dtype, tag=f"{shape}/{path}", strategy=path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_and_no_bias(dtype, path, kernel_device):
    """Dropout mask regenerated from the seed in the backward; no bias."""
    from sails_fast.kernels.lora import lora_dropout_mask

    lead, k, n, r, bs = (37,), 160, 72, 8, 32
    x, nf4, a, b, _ = make_inputs(lead, k, n, r, bs, dtype, kernel_device, bias=False)
    dy = torch.randn(*lead, n, generator=torch.Generator().manual_seed(2)).to(kernel_device, dtype)
    seed, p = 4321, 0.3
    mask = lora_dropout_mask((37, k), p, seed, kernel_device).cpu()
    check_against_reference(x, nf4, a, b, None, dy, dtype, p, mask, tag=path, strategy=path, seed=seed)


@pytest.mark.parametrize("compute", [torch.float32, torch.float16], ids=str)
def test_weight_rounded_to_its_stored_dtype_first(compute, kernel_device):
    """A bf16-stored weight is dequantised to bf16, then cast to the compute dtype (as bitsandbytes does),
    on both paths."""
    x, nf4, a, b, bias = make_inputs((23,), 200, 40, 4, 64, compute, kernel_device, stored=torch.bfloat16)
    assert nf4.dtype == torch.bfloat16
    expected_w = dequantize_nf4(nf4.to("cpu"), torch.bfloat16, backend="torch").to(compute)
    for path in PATHS:
        y = qlora_linear(x, nf4, a, b, 0.0, None, backend="triton", strategy=path)
        ref = x.cpu().float() @ expected_w.float().T
        lowp = x.cpu() @ expected_w.T
        assert_close(path, y, ref, lowp, compute)


def test_backward_keeps_no_dequantised_weight(kernel_device):
    """Only x, the adapters, xa, the 0-d seed and the NF4 tensors themselves are saved; the base weight
    is rebuilt in the backward."""
    lead, k, n, r, bs = (9,), 128, 96, 4, 64
    for path in PATHS:
        x, nf4, a, b, bias = make_inputs(lead, k, n, r, bs, torch.float32, kernel_device)
        a.requires_grad_()
        y = qlora_linear(x.requires_grad_(), nf4, a, b, 1.0, bias, backend="triton", strategy=path)
        node = y.grad_fn
        while not hasattr(node, "saved_tensors"):  # the op's autograd node
            node = node.next_functions[0][0]
        saved = [t for t in node.saved_tensors if t is not None]
        assert not any(t.numel() >= n * k for t in saved), [tuple(t.shape) for t in saved]
        nf4_tensors = [nf4.packed, nf4.absmax, nf4.nested_absmax, nf4.nested_offset, nf4.nested_code]
        expected = [(9, k), (r, k), (n, r), (9, r), ()] + [tuple(t.shape) for t in nf4_tensors]
        assert sorted(tuple(t.shape) for t in saved) == sorted(expected)
        y.sum().backward()
        assert a.grad is not None and x.grad is not None


def test_reused_buffer_between_layers(kernel_device):
    """Two layers of one shape share the dequantisation buffer: chained forward, then backward."""
    g = torch.Generator().manual_seed(3)
    k = 64
    nf4s = [quantize_nf4(torch.randn(k, k, generator=g) / 8, 64, True).to(kernel_device) for _ in range(2)]
    adapters = [(torch.randn(4, k, generator=g) / 8, torch.randn(k, 4, generator=g) / 2) for _ in range(2)]
    x = torch.randn(300, k, generator=g)

    def run(fn, device, **kw):
        params = [(a.to(device).requires_grad_(), b.to(device).requires_grad_()) for a, b in adapters]
        h = x.to(device).requires_grad_()
        out = h
        for nf4, (a, b) in zip(nf4s, params, strict=True):
            out = torch.tanh(fn(out, nf4.to(device), a, b, 2.0, None, **kw))
        grads = torch.autograd.grad(out.square().sum(), [h, *[p for ab in params for p in ab]])
        return out, grads

    out, grads = run(qlora_linear, kernel_device, backend="triton", strategy="dequant")
    ref_out, ref_grads = run(qlora_linear_ref, "cpu")
    assert_close("out", out, ref_out)
    for i, (gr, rr) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close(f"grad{i}", gr, rr)


def test_auto_runs_the_strategy_the_table_or_roofline_picks(kernel_device):
    from sails_fast.fused import strategy

    x, nf4, a, b, bias = make_inputs((20,), 64, 48, 4, 64, torch.float32, kernel_device)
    chosen = strategy.choose("qlora_linear", x.device, M=20, K=64, N=48, R=4)
    y_auto = qlora_linear(x, nf4, a, b, 1.0, bias, backend="triton")
    y_chosen = qlora_linear(x, nf4, a, b, 1.0, bias, backend="triton", strategy=chosen)
    assert torch.equal(y_auto, y_chosen)


def test_path_is_the_old_name_of_strategy(kernel_device):
    x, nf4, a, b, bias = make_inputs((6,), 64, 48, 4, 64, torch.float32, kernel_device)
    with pytest.warns(DeprecationWarning, match="strategy"):
        y_path = qlora_linear(x, nf4, a, b, 1.0, bias, backend="triton", path="dequant")
    y_strategy = qlora_linear(x, nf4, a, b, 1.0, bias, backend="triton", strategy="dequant")
    assert torch.equal(y_path, y_strategy)
    with pytest.raises(ValueError, match="^path:"), pytest.warns(DeprecationWarning):
        qlora_linear(x, nf4, a, b, 1.0, bias, path="dequant", strategy="fused")


def test_torch_backend_is_the_reference():
    x, nf4, a, b, bias = make_inputs((4, 3), 16, 8, 4, 32, torch.float32, "cpu")
    y = qlora_linear(x, nf4, a, b, 0.5, bias, backend="torch")
    assert torch.equal(y, qlora_linear_ref(x, nf4, a, b, 0.5, bias))


class _MaskDropout(nn.Module):
    """Stands in for PEFT's nn.Dropout with a fixed keep-mask, so PEFT sees our kernel's mask."""

    def __init__(self, mask: torch.Tensor, p: float):
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x):
        return x * self.mask.to(x.dtype) / (1 - self.p)


def _peft_linear4bit(w, bias, r, alpha, dropout, a, b):
    """PEFT's lora.bnb.Linear4bit over a bitsandbytes NF4 Linear4bit (double quantisation, blocksize 64)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    n, k = w.shape
    base = bnb.nn.Linear4bit(k, n, bias=True, compress_statistics=True, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
    base.bias = nn.Parameter(bias.clone(), requires_grad=False)
    base = base.to("cpu")  # bitsandbytes quantises here
    model = nn.Sequential(base)
    # what transformers sets on a 4-bit model; PEFT picks lora.bnb.Linear4bit by it
    model.is_loaded_in_4bit = True
    model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["0"])
    )
    layer = model.base_model.model[0]
    assert type(layer).__module__ == "peft.tuners.lora.bnb" and type(layer).__name__ == "Linear4bit"
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    # training mode: in eval mode without gradients bitsandbytes repacks CPU weights for inference
    return layer.train()


PEFT_CASES = [(torch.float32, 0.0), (torch.float16, 0.0), (torch.bfloat16, 0.0), (torch.bfloat16, 0.2)]


@needs_bnb
@pytest.mark.parametrize("strategy", PATHS)
@pytest.mark.parametrize(("dtype", "dropout_p"), PEFT_CASES, ids=[f"{d}-{p}" for d, p in PEFT_CASES])
def test_matches_peft_bnb_linear4bit(dtype, dropout_p, strategy, kernel_device):
    """External oracle: PEFT's lora.bnb.Linear4bit on bitsandbytes' own NF4 weight; ours reads that weight
    through NF4Weight.from_bnb (no re-quantisation)."""
    from sails_fast.kernels.lora import lora_dropout_mask

    lead, k, n, r, alpha, seed = (3, 11), 576, 200, 16, 32, 99
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(*lead, k, generator=g), torch.randn(n, k, generator=g) / k**0.5
    a, b = torch.randn(r, k, generator=g) / k**0.5, torch.randn(n, r, generator=g) / r**0.5
    bias, dy = torch.randn(n, generator=g), torch.randn(*lead, n, generator=g)
    mask = None
    if dropout_p:
        mask = lora_dropout_mask((33, k), dropout_p, seed, kernel_device).reshape(x.shape).cpu()

    def peft_run(run_dtype):
        layer = _peft_linear4bit(w, bias, r, alpha, dropout_p, a, b)
        if dropout_p:
            layer.lora_dropout["default"] = _MaskDropout(mask, dropout_p)
        xx = x.to(run_dtype).requires_grad_()
        y = layer(xx)
        adapters = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        return (y, *torch.autograd.grad(y, (xx, *adapters), dy.to(run_dtype))), layer

    (ref32, layer), (ref_lo, _) = peft_run(torch.float32), peft_run(dtype)
    nf4 = NF4Weight.from_bnb(layer.get_base_layer().weight).to(kernel_device)
    xx = x.to(kernel_device, dtype).requires_grad_()
    # the adapters stay fp32, as PEFT keeps them over a quantised base
    aa, bb = a.to(kernel_device).requires_grad_(), b.to(kernel_device).requires_grad_()
    y = qlora_linear(
        xx, nf4, aa, bb, alpha / r, bias.to(kernel_device), dropout_p, backend="triton", seed=seed,
        strategy=strategy,
    )  # fmt: skip
    ours = (y, *torch.autograd.grad(y, (xx, aa, bb), dy.to(kernel_device, dtype)))
    for name, o, r32, rlo in zip(("y", "dx", "dA", "dB"), ours, ref32, ref_lo, strict=True):
        assert_close(f"peft/{strategy}/{name}", o, r32, rlo, dtype)


def test_nf4_lora_linear_module(kernel_device):
    torch.manual_seed(0)
    base = nn.Linear(40, 24)
    layer = NF4LoraLinear.from_linear(base, r=4, alpha=8, dropout=0.1, blocksize=32).to(kernel_device)
    x = torch.randn(6, 40).to(kernel_device)
    w = dequantize_nf4(layer.nf4, torch.float32)
    layer.eval()
    assert_close("init", layer(x), x @ w.T + base.bias.to(kernel_device))
    assert layer.scaling == 2.0 and not layer.bias.requires_grad
    # the state dict carries the NF4 tensors: a fresh module reproduces the output
    with torch.no_grad():
        layer.lora_B.normal_()
    clone = NF4LoraLinear(quantize_nf4(torch.zeros(24, 40), 32), torch.zeros(24), r=4, alpha=8)
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone.to(kernel_device).eval()(x), layer(x))
    layer.train()
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.weight_packed.grad is None and layer.bias.grad is None
    # a dtype change converts the adapter and bias, never the NF4 tensors
    half = NF4LoraLinear.from_linear(base, r=4).to(torch.bfloat16)
    assert half.lora_A.dtype == torch.bfloat16 and half.weight_nested_absmax.dtype == torch.float32
    assert torch.equal(half.weight_nested_offset, NF4LoraLinear.from_linear(base, r=4).weight_nested_offset)
    frozen = NF4LoraLinear.from_linear(base, r=0).to(kernel_device)
    assert frozen.lora_A is None and not list(frozen.parameters(recurse=False))[0].requires_grad
    assert_close(
        "r=0", frozen(x), x @ dequantize_nf4(frozen.nf4, torch.float32).T + base.bias.to(kernel_device)
    )


def _tiny_llama_config():
    import transformers

    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, max_position_embeddings=64,
    )  # fmt: skip


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_quantize_model_nf4_swaps_linears_and_trains():
    """The swap itself; the layer's Triton path is test_nf4_lora_linear_module's (torch here, for time)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_tiny_llama_config()).eval()
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(1))
    names = quantize_model_nf4(model, TARGETS, r=4, alpha=8, backend="torch")
    assert len(names) == 8 and all(n.rsplit(".", 1)[-1] in TARGETS for n in names)
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    # the reference: the same model with each swapped layer's dequantised weight in an nn.Linear
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(_tiny_llama_config()).eval()
    for name in names:
        layer = model.get_submodule(name)
        with torch.no_grad():
            ref.get_submodule(name).weight.copy_(dequantize_nf4(layer.nf4, torch.float32))
    with torch.no_grad():
        assert_close("logits", model(input_ids=ids).logits, ref(input_ids=ids).logits)
    model(input_ids=ids).logits.square().mean().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    # as get_peft_model leaves it: only the adapters train (embeddings, norms, the head are frozen)
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable), trainable
    everything = quantize_model_nf4(transformers.LlamaForCausalLM(_tiny_llama_config()))
    assert len(everything) == 2 * 7 and "lm_head" not in everything


def test_quantize_model_nf4_refuses_unknown_targets():
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM(_tiny_llama_config())
    with pytest.raises(ValueError, match=r"^target_modules: \['qproj', 'layers.9.mlp'\] match no nn.Linear"):
        quantize_model_nf4(model, ["q_proj", "qproj", "layers.9.mlp"], r=4)
    assert all(type(m) is not NF4LoraLinear for m in model.modules()), "nothing is swapped on a refusal"


def _load_4bit_peft_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_tiny_llama_config()).save_pretrained(tmp_path)
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quant, dtype=torch.float32, device_map="cpu"
    )
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    # training mode keeps bitsandbytes from repacking CPU weights for inference
    return model.train()


@needs_bnb
def test_fuse_lora_on_a_4bit_llama_matches_peft(tmp_path):
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    from sails_fast.integrations.peft import fuse_lora, unfuse_lora

    model = _load_4bit_peft_llama(tmp_path)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, PeftLinear4bit) and q_proj.get_base_layer().weight.quant_state.nested
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(5))

    def logits_and_grads():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        (logits.float() ** 2).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_logits, ref_grads = logits_and_grads()
    report = fuse_lora(model, backend="triton")
    assert len(report.fused) == 2 * len(TARGETS) and not report.skipped, str(report)
    logits, grads = logits_and_grads()
    assert_close("logits", logits, ref_logits)
    assert set(grads) == set(ref_grads) and len(grads) == 16
    for name in grads:
        assert_close(name, grads[name], ref_grads[name])
    assert unfuse_lora(model) == 2 * len(TARGETS)
    assert torch.equal(logits_and_grads()[0], ref_logits)


@needs_bnb
def test_fuse_lora_leaves_fp4_layers_alone():
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from sails_fast.integrations.peft import fuse_lora

    base = bnb.nn.Linear4bit(64, 32, quant_type="fp4")
    base.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="fp4")
    model = nn.Sequential(base.to("cpu"))
    model.is_loaded_in_4bit = True
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["0"]))
    report = fuse_lora(model)
    assert not report.fused and "FP4 is not NF4" in next(iter(report.skipped.values()))


def _args(**override):
    nf4 = quantize_nf4(torch.randn(6, 8), 32)
    args = dict(
        x=torch.randn(3, 8), nf4=nf4, lora_A=torch.randn(4, 8), lora_B=torch.randn(6, 4), scaling=1.0,
        bias=torch.randn(6), dropout_p=0.0,
    )  # fmt: skip
    args.update(override)
    return args


BAD_INPUTS = [
    ("nf4", dict(nf4=torch.randn(6, 8))),
    ("nf4", dict(nf4=quantize_nf4(torch.randn(2, 3, 8), 32))),
    ("x", dict(x=torch.randn(3, 9))),
    ("x", dict(x=torch.randn(3, 8, dtype=torch.float64))),
    ("lora_A", dict(lora_A=torch.randn(4, 9))),
    ("lora_B", dict(lora_B=torch.randn(7, 4))),
    ("bias", dict(bias=torch.randn(5))),
    ("dropout_p", dict(dropout_p=1.0)),
]


@pytest.mark.parametrize(
    ("arg", "override"), BAD_INPUTS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD_INPUTS)]
)
def test_bad_input_names_the_argument(arg, override):
    with pytest.raises(ValueError, match=arg):
        qlora_linear(**_args(**override))


def test_bad_strategy_and_backend():
    with pytest.raises(ValueError, match="^strategy:"):
        qlora_linear(**_args(), strategy="chunked")
    with pytest.raises(ValueError, match="backend"):
        qlora_linear(**_args(), backend="cuda")
