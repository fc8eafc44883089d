"""Plain PyTorch reference for NF4 (bitsandbytes-compatible) quantisation and the QLoRA linear.

The test oracle and the CPU backend of `sails_fast.quantize_nf4`, `sails_fast.dequantize_nf4` and
`sails_fast.qlora_linear`. Imports no triton. The format and the rounding rules are written out in
docs/nf4.md; in short:

    packed  uint8 [(n + 1) // 2, 1], row-major flat order, high nibble = even element
    absmax  one per block of `blocksize` elements (the last block may be short)
    w[i]    = NF4[code[i]] * absmax[i // blocksize]                                   (fp32)
    double quantisation: absmax[b] = DYN[qabsmax[b]] * nested_absmax[b // 256] + offset (fp32, in that order)

Functions that take an `nf4` argument read these attributes from it (duck typing, so this module does not
import `sails_fast`): packed, absmax, shape, dtype, blocksize, nested_absmax, nested_offset, nested_code,
nested_blocksize.
"""

from __future__ import annotations

import math

import torch

from .lora_ref import lora_linear_ref

# the 16 NF4 values (QLoRA, arXiv 2305.14314): quantiles of N(0, 1) scaled to [-1, 1], exact zero at 7.
# these decimal strings are the fp32 values bitsandbytes' get_4bit_type("nf4") holds
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_ZERO_CODE = 7
NESTED_BLOCKSIZE = 256
MIN_BLOCKSIZE, MAX_BLOCKSIZE = 32, 4096
# resolution of the 8-bit quantiser's lookup table (bitsandbytes' CPU path: normalised value -> 16-bit bin)
_LUT_BINS = 65536

_tables: dict[tuple[str, str], torch.Tensor] = {}


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 code table, fp32 [16], cached per device."""
    key = ("nf4", str(device))
    if key not in _tables:
        _tables[key] = torch.tensor(NF4_VALUES, dtype=torch.float32).to(device)
    return _tables[key]


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The signed 8-bit dynamic code (Dettmers, arXiv 1511.04561) double quantisation uses, fp32 [256].

    For each decade 10^(e-6), e = 0..6, the 2^e mid-points of an equal split of [0.1, 1] (computed in
    fp32), with both signs; plus 0 and 1, sorted. Equal to bitsandbytes' create_dynamic_map().
    """
    key = ("dynamic", str(device))
    if key not in _tables:
        magnitudes = []
        for e in range(7):
            edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
            magnitudes.append((edges[:-1] + edges[1:]) / 2 * (10.0 ** (e - 6)))
        pos = torch.cat(magnitudes)
        values = torch.cat([pos, -pos, torch.tensor([0.0, 1.0])])
        _tables[key] = torch.sort(values).values.to(device)
    return _tables[key]


def _dynamic_lut(device: torch.device) -> torch.Tensor:
    """int64 [65536]: 16-bit bin of a normalised value -> index of the nearest dynamic code (ties down)."""
    key = ("dynamic_lut", str(device))
    if key not in _tables:
        code = dynamic_code("cpu")
        mid = (code[:-1] + code[1:]) * 0.5
        i = torch.arange(_LUT_BINS, dtype=torch.float32)
        centre = -1.0 + (2.0 * i) / (_LUT_BINS - 1)
        # number of mid-points strictly below the bin centre
        _tables[key] = torch.searchsorted(mid, centre, right=False).to(device)
    return _tables[key]


def check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    ok = isinstance(blocksize, int) and MIN_BLOCKSIZE <= blocksize <= MAX_BLOCKSIZE
    if not ok or blocksize & (blocksize - 1):
        raise ValueError(
            f"{name}: expected a power of two from {MIN_BLOCKSIZE} to {MAX_BLOCKSIZE}, got {blocksize!r}"
        )


def _blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a flat tensor into full blocks [nb, blocksize] and the short tail (or None)."""
    full = flat.numel() - flat.numel() % blocksize
    tail = flat[full:] if full < flat.numel() else None
    return flat[:full].view(-1, blocksize), tail


def _quantize_nf4_codes(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes [n] and fp32 absmax [blocks] of a flat fp32 tensor (bitsandbytes' rules, see docs)."""
    code = nf4_code(flat.device)
    bounds = (code[:-1] + code[1:]) / 2
    body, tail = _blocks(flat, blocksize)
    absmax = body.abs().amax(dim=1) if body.numel() else body.new_zeros(0)
    # full blocks: multiply by the fp32 reciprocal of absmax; an all-zero block keeps absmax 0
    scaled = [(body * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1.0, 1.0).reshape(-1)]
    if tail is not None:
        # the short last block divides instead, and stores its clamped absmax
        tail_max = tail.abs().max().clamp(min=1e-38)
        scaled.append((tail / tail_max).clamp(-1.0, 1.0))
        absmax = torch.cat([absmax, tail_max[None]])
    # nearest code; a value exactly on a mid-point goes to the lower code
    codes = torch.bucketize(torch.cat(scaled), bounds, right=False).to(torch.uint8)
    return codes, absmax


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [n] (values 0..15) -> packed [(n + 1) // 2, 1], high nibble = even element.

    An odd count is padded with the code of 0.0 (7), as bitsandbytes pads the scaled values with 0.
    """
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_ZERO_CODE)])
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """packed uint8 (any shape, flat order) -> int64 codes [n]."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n].long()


def quantize_blockwise_8bit_ref(values: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """Blockwise 8-bit dynamic quantisation of a flat fp32 tensor, as bitsandbytes 0.50's CPU kernel does it.

    Per block: absmax = max |v|; v * (1 / absmax) is clamped to [-1, 1], mapped to one of 65536 equal
    bins with trunc((u + 1) * 0.5 * 65535 + 0.5), and each bin to the code nearest its centre. An
    all-zero block gets absmax 0 and codes 0.

    Returns:
        (codes uint8 [n], absmax fp32 [ceil(n / blocksize)])
    """
    flat = values.reshape(-1).float()
    nb = -(-flat.numel() // blocksize)
    pad = nb * blocksize - flat.numel()
    padded = torch.cat([flat, flat.new_zeros(pad)]).view(nb, blocksize)
    absmax = padded.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax.clamp(min=1e-38), 0.0)
    normed = (padded * inv[:, None]).clamp(-1.0, 1.0)
    bins = ((normed + 1.0) * 0.5 * float(_LUT_BINS - 1) + 0.5).long()
    codes = _dynamic_lut(flat.device)[bins]
    codes = torch.where(absmax[:, None] > 0, codes, 0).to(torch.uint8).reshape(-1)
    return codes[: flat.numel()], absmax


def quantize_nf4_ref(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> dict:
    """Quantise a float tensor to NF4 in bitsandbytes' layout.

    Args:
        weight: any shape, fp32 / fp16 / bf16 (read as fp32).
        blocksize: elements per absmax block, a power of two in [32, 4096].
        double_quant: quantise the absmax values again (8-bit, blocks of 256, mean offset).
    Returns:
        dict with packed uint8 [(n+1)//2, 1]; absmax fp32 [blocks] (uint8 with double_quant);
        nested_absmax fp32 [ceil(blocks / 256)] and nested_offset fp32 [] (None without double_quant).
    """
    check_blocksize(blocksize)
    codes, absmax = _quantize_nf4_codes(weight.detach().reshape(-1).float(), blocksize)
    out = {"packed": pack_nibbles(codes), "absmax": absmax, "nested_absmax": None, "nested_offset": None}
    if double_quant:
        offset = absmax.mean()
        qabsmax, nested_absmax = quantize_blockwise_8bit_ref(absmax - offset, NESTED_BLOCKSIZE)
        out.update(absmax=qabsmax, nested_absmax=nested_absmax, nested_offset=offset)
    return out


def dequantize_absmax_ref(
    qabsmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_offset: torch.Tensor,
    nested_code: torch.Tensor | None = None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> torch.Tensor:
    """fp32 absmax [blocks] from its double-quantised form: DYN[q] * nested_absmax[b // 256] + offset."""
    code = dynamic_code(qabsmax.device) if nested_code is None else nested_code.float()
    scale = nested_absmax.float().repeat_interleave(nested_blocksize)[: qabsmax.numel()]
    # two separate fp32 roundings (product, then sum), as bitsandbytes does them
    return code[qabsmax.long()] * scale + nested_offset.float()


def absmax_fp32_ref(nf4) -> torch.Tensor:
    """The per-block fp32 absmax of an NF4 weight, undoing double quantisation when present."""
    if nf4.nested_absmax is None:
        return nf4.absmax.float()
    return dequantize_absmax_ref(
        nf4.absmax, nf4.nested_absmax, nf4.nested_offset, nf4.nested_code, nf4.nested_blocksize
    )


def dequantize_nf4_ref(nf4, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantise an NF4 weight: NF4[code] * absmax in fp32, then one cast to `dtype`. Shape nf4.shape."""
    n = math.prod(nf4.shape)
    codes = unpack_nibbles(nf4.packed, n)
    absmax = absmax_fp32_ref(nf4)
    scale = absmax.repeat_interleave(nf4.blocksize)[:n]
    return (nf4_code(codes.device)[codes] * scale).view(tuple(nf4.shape)).to(dtype)


def qlora_weight_ref(nf4, dtype: torch.dtype) -> torch.Tensor:
    """The base weight a QLoRA layer multiplies by: dequantised to the weight's own dtype, then cast.

    bitsandbytes' matmul_4bit does the same (dequantise to quant_state.dtype, then .to(x.dtype)), so a
    bf16-stored weight used in fp32 carries its bf16 rounding.
    """
    return dequantize_nf4_ref(nf4, nf4.dtype).to(dtype)


def qlora_linear_ref(
    x: torch.Tensor,
    nf4,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference QLoRA linear: x @ W^T + bias + scaling * (dropout(x) @ A^T) @ B^T, W = dequant(nf4).

    Args:
        x: [..., in]. nf4: NF4 weight of shape [out, in]. lora_A: [r, in]. lora_B: [out, r].
        scaling, bias, dropout_p, dropout_mask: as in `lora_linear_ref`.
    Returns:
        [..., out] in x's dtype. The base weight is a constant: autograd gives it no gradient.
    """
    weight = qlora_weight_ref(nf4, x.dtype)
    return lora_linear_ref(x, weight, lora_A, lora_B, scaling, bias, dropout_p, dropout_mask=dropout_mask)
