"""NF4 format: quantize_nf4 / dequantize_nf4 bit for bit against bitsandbytes, the Triton dequantisation
kernel against the reference, NF4Weight round trips, error statistics, size and bad input."""

from __future__ import annotations

import pytest
import torch

from sails_fast import NF4Weight, dequantize_nf4, quantize_nf4
from sails_fast.kernels import nf4_ref

try:
    import bitsandbytes.functional as bnbF
except ImportError:  # the GPU machine: the kernel tests against the reference still run
    bnbF = None
needs_bnb = pytest.mark.skipif(bnbF is None, reason="bitsandbytes (the oracle) is not installed")

BLOCKSIZES = [32, 64, 256, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def shapes_for(blocksize: int) -> dict[str, tuple[int, ...]]:
    """A size that is a multiple of the block, one that is not, and an odd element count.

    bitsandbytes 0.50.2's CPU dequantisation kernel misplaces blocks when the row length is a multiple of
    16 but not of the blocksize (see docs/nf4.md); those shapes are checked in
    test_rows_not_a_multiple_of_the_block instead, through a 1-D view bitsandbytes handles correctly.
    """
    if blocksize == 4096:
        return {"multiple": (2, 4096), "not_multiple": (3, 4100), "odd": (5, 4099)}
    return {"multiple": (24, 256), "not_multiple": (37, 100), "odd": (33, 7)}


def bnb_quantize(w: torch.Tensor, blocksize: int, double_quant: bool):
    return bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def bnb_dequantize(packed, state, dtype=torch.float32):
    """bitsandbytes' dequantize_4bit to `dtype`. Its odd-row fallback is torch.compile'd; compiling a graph
    per shape would dominate this file's run time, and does not change the arithmetic (a product, a cast)."""
    state = bnbF.QuantState(
        absmax=state.absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
        quant_type=state.quant_type, dtype=dtype, offset=state.offset, state2=state.state2,
    )  # fmt: skip
    with torch._dynamo.config.patch(disable=True):
        return bnbF.dequantize_4bit(packed, state)


@needs_bnb
def test_code_tables_equal_bitsandbytes():
    assert torch.equal(nf4_ref.nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4_ref.dynamic_code(), bnbF.create_dynamic_map())


CASES = [(bs, shape) for bs in BLOCKSIZES for shape in shapes_for(bs)]


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize(("blocksize", "shape"), CASES)
def test_quantize_matches_bitsandbytes_bytes(blocksize, shape, double_quant):
    w = torch.randn(shapes_for(blocksize)[shape], generator=torch.Generator().manual_seed(blocksize)) * 0.7
    packed, state = bnb_quantize(w, blocksize, double_quant)
    ours = quantize_nf4(w, blocksize, double_quant)
    assert torch.equal(ours.packed, packed), "packed codes differ"
    assert torch.equal(ours.absmax, state.absmax), "absmax differs"
    if double_quant:
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.nested_offset, state.offset)
        assert torch.equal(ours.nested_code, state.state2.code)


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_quantize_matches_bitsandbytes_for_half_inputs(dtype):
    w = torch.randn(50, 70, generator=torch.Generator().manual_seed(3)).to(dtype)
    packed, state = bnb_quantize(w, 64, True)
    ours = quantize_nf4(w, 64, True)
    assert ours.dtype == dtype
    assert torch.equal(ours.packed, packed) and torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.nested_absmax, state.state2.absmax)


@needs_bnb
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize(("blocksize", "shape"), CASES)
def test_dequantize_equals_bitsandbytes_exactly(blocksize, shape, double_quant, backend, kernel_device):
    """bitsandbytes quantises; dequantize_nf4 of the wrapped tensors equals its dequantize_4bit (fp32)."""
    w = torch.randn(shapes_for(blocksize)[shape], generator=torch.Generator().manual_seed(7)) * 2.5
    packed, state = bnb_quantize(w, blocksize, double_quant)
    expected = bnb_dequantize(packed, state)
    nf4 = NF4Weight.from_bnb(packed, state)
    device = kernel_device if backend == "triton" else "cpu"
    ours = dequantize_nf4(nf4.to(device), torch.float32, backend=backend)
    assert ours.shape == w.shape and ours.dtype == torch.float32
    assert torch.equal(ours.cpu(), expected)


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_low_precision_equals_bitsandbytes(dtype, double_quant, kernel_device):
    """One rounding of the fp32 product to fp16 / bf16 (to nearest even), as bitsandbytes does."""
    w = torch.randn(37, 100, generator=torch.Generator().manual_seed(8)) * 3
    packed, state = bnb_quantize(w, 64, double_quant)
    expected = bnb_dequantize(packed, state, dtype)
    nf4 = NF4Weight.from_bnb(packed, state)
    assert torch.equal(dequantize_nf4(nf4, dtype, backend="torch"), expected)
    assert torch.equal(dequantize_nf4(nf4.to(kernel_device), dtype, backend="triton").cpu(), expected)


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True])
def test_rows_not_a_multiple_of_the_block(double_quant, kernel_device):
    """Row length 96 (a multiple of 16, not of 64): compare with bitsandbytes on a 1-D view of the
    same bytes (one row), which its CPU kernel handles; the layout is flat, so the values must agree."""
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(9))
    packed, state = bnb_quantize(w, 64, double_quant)
    flat_state = bnbF.QuantState(
        absmax=state.absmax, shape=torch.Size([w.numel()]), code=state.code, blocksize=64,
        quant_type="nf4", dtype=torch.float32, offset=state.offset, state2=state.state2,
    )  # fmt: skip
    expected = bnbF.dequantize_4bit(packed, flat_state).reshape(w.shape)
    nf4 = NF4Weight.from_bnb(packed, state)
    assert torch.equal(dequantize_nf4(nf4, torch.float32, backend="torch"), expected)
    assert torch.equal(dequantize_nf4(nf4.to(kernel_device), torch.float32, backend="triton").cpu(), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 256])
def test_triton_dequantize_equals_reference(blocksize, dtype, kernel_device):
    """The kernel on weights we quantised, every output dtype, including a bf16-stored weight."""
    g = torch.Generator().manual_seed(blocksize)
    for shape, stored in [((129, 77), torch.float32), ((3, 1001), torch.bfloat16)]:
        nf4 = quantize_nf4(torch.randn(shape, generator=g).to(stored), blocksize, True).to(kernel_device)
        ref = dequantize_nf4(nf4.to("cpu"), dtype, backend="torch")
        assert torch.equal(dequantize_nf4(nf4, dtype, backend="triton").cpu(), ref)


@needs_bnb
def test_tie_breaking_goes_to_the_lower_code():
    """A value exactly on the mid-point of two NF4 values takes the lower code, in bitsandbytes too."""
    code = nf4_ref.nf4_code()
    mids = (code[:-1] + code[1:]) / 2
    # absmax 1 (the first element), so scaled values are the values themselves
    block = torch.cat([torch.ones(1), mids, -mids.flip(0), torch.zeros(64 - 1 - 30)])
    w = block.repeat(3).reshape(3, 64)
    ours = quantize_nf4(w, 64, False)
    packed, _ = bnb_quantize(w, 64, False)
    assert torch.equal(ours.packed, packed)
    codes = nf4_ref.unpack_nibbles(ours.packed, w.numel())[:64]
    assert torch.equal(codes[1:16], torch.arange(15)), "mid-point i must map to code i (the lower one)"


@needs_bnb
def test_double_quant_of_equal_absmax_values():
    """Every block with the same absmax: absmax - mean is all zero, a nested block of zeros (codes 0,
    nested absmax 0), which still dequantises to the right scale."""
    signs = torch.where(torch.randn(64, 64, generator=torch.Generator().manual_seed(4)) > 0, 1.0, -1.0)
    w = signs * 0.5
    ours = quantize_nf4(w, 64, True)
    packed, state = bnb_quantize(w, 64, True)
    assert torch.equal(ours.absmax, state.absmax) and torch.equal(ours.nested_absmax, state.state2.absmax)
    assert torch.equal(ours.nested_absmax, torch.zeros(1))
    assert torch.equal(dequantize_nf4(ours, torch.float32, backend="torch"), w)


def test_nested_codes_within_one_bin_of_exact_nearest():
    """The 8-bit quantiser maps a value to one of 65536 bins, then to the code nearest the bin centre
    (bitsandbytes' CPU kernel, reproduced bit for bit). Against an exact nearest-code search its error is
    at most one bin width (2 / 65535) larger, and the codes rarely differ at all."""
    g = torch.Generator().manual_seed(11)
    absmax = torch.randn(4096, 64, generator=g).abs().amax(1)
    tiny = torch.linspace(-3e-5, 3e-5, 256) * absmax.abs().max()  # the region finer than a bin
    values = torch.cat([absmax - absmax.mean(), tiny])
    codes, scale = nf4_ref.quantize_blockwise_8bit_ref(values, 256)
    u = (values.view(-1, 256) * (1.0 / scale)[:, None]).reshape(-1)
    code = nf4_ref.dynamic_code()
    exact = torch.bucketize(u, (code[:-1] + code[1:]) / 2)
    ours_err = (code[codes.long()] - u).abs()
    exact_err = (code[exact] - u).abs()
    assert (ours_err <= exact_err + 2 / 65535 + 1e-7).all()
    assert (codes.long() != exact)[:4096].float().mean() < 0.01


@pytest.mark.parametrize("double_quant", [False, True])
def test_error_statistics_match_bitsandbytes_published_figure(double_quant):
    """bitsandbytes' test figure: NF4, blocksize 64, 1024 x 1024 N(0, 1), mean |error| 0.0728 (+- 7 sigma,
    sigma the standard error of the mean measured here); mean relative error 0.2033 likewise."""
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    err = (dequantize_nf4(quantize_nf4(w, 64, double_quant), torch.float32, backend="torch") - w).abs()
    sigma = err.std().item() / err.numel() ** 0.5
    assert abs(err.mean().item() - 0.072792) < 7 * sigma, (err.mean().item(), sigma)
    rel = err / w.abs()
    rel = rel[torch.isfinite(rel)]
    rel_sigma = rel.std().item() / rel.numel() ** 0.5
    # relative error has a heavy tail near w = 0: a looser 7-sigma bound still pins the figure to ~1 %
    assert abs(rel.mean().item() - 0.2033) < max(7 * rel_sigma, 0.002), (rel.mean().item(), rel_sigma)


def test_bits_per_parameter():
    nf4 = quantize_nf4(torch.randn(4096, 4096, generator=torch.Generator().manual_seed(1)), 64, True)
    assert nf4.bits_per_param <= 4.13
    # 4 bits + an 8-bit code per 64 + fp32 per 64 * 256 + the offset
    assert nf4.nbytes == 4096 * 4096 // 2 + 4096 * 4096 // 64 + 4 * (4096 * 4096 // 64 // 256) + 4
    plain = quantize_nf4(torch.randn(256, 256), 64, False)
    assert plain.bits_per_param == 4.5


@needs_bnb
def test_bnb_round_trip_through_params4bit():
    import bitsandbytes as bnb

    w = torch.randn(48, 72, generator=torch.Generator().manual_seed(2))
    param = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=64).to("cpu")
    nf4 = NF4Weight.from_bnb(param)
    assert nf4.packed.data_ptr() == param.data.data_ptr(), "from_bnb must share, not copy"
    assert nf4.double_quant and nf4.shape == w.shape and nf4.dtype == torch.float32
    expected = bnb_dequantize(param.data, param.quant_state)
    assert torch.equal(dequantize_nf4(nf4, torch.float32, backend="torch"), expected)
    # and back: bitsandbytes reads our own weight
    ours = quantize_nf4(w, 64, True)
    packed, state = ours.to_bnb()
    assert torch.equal(bnb_dequantize(packed, state), dequantize_nf4(ours, torch.float32, backend="torch"))
    again = NF4Weight.from_bnb(packed, state)
    assert torch.equal(again.packed, ours.packed) and torch.equal(again.nested_offset, ours.nested_offset)


@needs_bnb
def test_quant_storage_other_than_uint8():
    """Params4bit with quant_storage=bf16 (FSDP) holds the same bytes; from_bnb views them as uint8."""
    import bitsandbytes as bnb

    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    param = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", quant_storage=torch.bfloat16)
    param = param.to("cpu")
    assert param.dtype == torch.bfloat16
    nf4 = NF4Weight.from_bnb(param)
    assert torch.equal(nf4.packed, quantize_nf4(w, 64, True).packed)


def test_to_moves_every_tensor():
    nf4 = quantize_nf4(torch.randn(10, 30), 32, True)
    assert nf4.to("cpu") is nf4
    moved = nf4.to("meta")
    assert moved.packed.device.type == "meta" and moved.nested_code.device.type == "meta"


def _fp4_state():
    w = torch.randn(16, 64)
    return bnbF.quantize_4bit(w, blocksize=64, quant_type="fp4")


def _nf4_parts(**override):
    base = quantize_nf4(torch.randn(10, 30), 32, True)
    parts = dict(
        packed=base.packed, absmax=base.absmax, shape=base.shape, dtype=base.dtype, blocksize=32,
        nested_absmax=base.nested_absmax, nested_offset=base.nested_offset,
    )  # fmt: skip
    parts.update(override)
    return parts


BAD = [
    ("blocksize", lambda: quantize_nf4(torch.randn(8, 8), blocksize=48)),
    ("blocksize", lambda: quantize_nf4(torch.randn(8, 8), blocksize=16)),
    ("blocksize", lambda: quantize_nf4(torch.randn(8, 8), blocksize=8192)),
    ("weight", lambda: quantize_nf4(torch.randint(0, 5, (8, 8)))),
    ("weight", lambda: quantize_nf4(torch.randn(8, 8, dtype=torch.float64))),
    ("absmax", lambda: NF4Weight(**_nf4_parts(absmax=torch.zeros(3, dtype=torch.uint8)))),
    ("absmax", lambda: NF4Weight(**_nf4_parts(nested_absmax=None, nested_offset=None))),
    ("packed", lambda: NF4Weight(**_nf4_parts(packed=torch.zeros(151, 1, dtype=torch.uint8)))),
    ("packed", lambda: NF4Weight(**_nf4_parts(packed=torch.zeros(150, 1, dtype=torch.int8)))),
    ("blocksize", lambda: NF4Weight(**_nf4_parts(blocksize=100))),
    ("dtype", lambda: NF4Weight(**_nf4_parts(dtype=torch.int32))),
    ("nested_absmax", lambda: NF4Weight(**_nf4_parts(nested_absmax=torch.zeros(2)))),
    ("nested_absmax", lambda: NF4Weight(**_nf4_parts(nested_offset=None))),
    ("dtype", lambda: dequantize_nf4(quantize_nf4(torch.randn(8, 8), 32), torch.int8)),
    ("nf4", lambda: dequantize_nf4(torch.zeros(8, 8))),
    ("quant_state", lambda: NF4Weight.from_bnb(torch.zeros(4, 1, dtype=torch.uint8))),
]
BAD_BNB = [("quant_state", lambda: NF4Weight.from_bnb(*_fp4_state()))]
BAD_CASES = [pytest.param(a, m, id=f"{a}-{i}") for i, (a, m) in enumerate(BAD)] + [
    pytest.param(a, m, id=f"{a}-bnb{i}", marks=needs_bnb) for i, (a, m) in enumerate(BAD_BNB)
]


@pytest.mark.parametrize(("arg", "make"), BAD_CASES)
def test_bad_input_names_the_argument(arg, make):
    with pytest.raises(ValueError, match=arg):
        make()


@needs_bnb
def test_fp4_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="FP4 is not NF4"):
        NF4Weight.from_bnb(*_fp4_state())
