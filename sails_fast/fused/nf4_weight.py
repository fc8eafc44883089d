"""NF4 weights: the 4-bit NormalFloat layout (bit-compatible with bitsandbytes), quantise, dequantise, and
the conversion to and from bitsandbytes' Params4bit / QuantState."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sails_fast.fused.backend import Backend, resolve_backend
from sails_fast.kernels.nf4_ref import (
    NESTED_BLOCKSIZE,
    check_blocksize,
    dequantize_nf4_ref,
    dynamic_code,
    nf4_code,
    quantize_nf4_ref,
)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_float_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype}")


@dataclass(eq=False)
class NF4Weight:
    """A weight quantised to NF4 in bitsandbytes' layout (what `Params4bit` + `QuantState` hold).

    Attributes:
        packed: uint8 [(n + 1) // 2, 1], the 4-bit codes in row-major flat order, high nibble = even element.
        absmax: one scale per block of `blocksize` elements: fp32 [blocks], or with double quantisation
            uint8 [blocks] codes of the 8-bit dynamic type.
        shape: the original shape (n = its product). dtype: the original dtype (fp32 / fp16 / bf16).
        blocksize: 32 .. 4096, a power of two.
        nested_absmax: fp32 [ceil(blocks / nested_blocksize)] (double quantisation only).
        nested_offset: fp32 [] (double quantisation only): the mean of the fp32 absmax, subtracted before
            the 8-bit quantisation.
        nested_code: fp32 [256], the 8-bit code (default: bitsandbytes' dynamic map).
        nested_blocksize: 256.

    Example:
        >>> nf4 = quantize_nf4(torch.randn(4096, 4096), blocksize=64, double_quant=True)
        >>> nf4.bits_per_param   # 4.127
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype = torch.float32
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    def __post_init__(self) -> None:
        try:
            self.shape = torch.Size(tuple(int(s) for s in self.shape))
        except (TypeError, ValueError) as err:
            raise ValueError(f"shape: expected a sequence of ints, got {self.shape!r}") from err
        if any(s < 0 for s in self.shape):
            raise ValueError(f"shape: sizes must be non-negative, got {list(self.shape)}")
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"dtype: expected a torch.dtype, got {self.dtype!r}")
        _check_float_dtype("dtype", self.dtype)
        check_blocksize(self.blocksize)
        n = self.numel
        if not isinstance(self.packed, torch.Tensor) or self.packed.dtype != torch.uint8:
            got = self.packed.dtype if isinstance(self.packed, torch.Tensor) else type(self.packed).__name__
            raise ValueError(f"packed: expected a uint8 tensor, got {got}")
        if self.packed.numel() != (n + 1) // 2:
            raise ValueError(
                f"packed: expected (n + 1) // 2 = {(n + 1) // 2} bytes for shape {list(self.shape)}, "
                f"got {self.packed.numel()}"
            )
        if not self.packed.is_contiguous():
            raise ValueError("packed: expected a contiguous tensor (row-major flat codes)")
        self.packed = self.packed.view(-1, 1)
        blocks = -(-n // self.blocksize)
        if not isinstance(self.absmax, torch.Tensor) or self.absmax.numel() != blocks:
            got = self.absmax.numel() if isinstance(self.absmax, torch.Tensor) else type(self.absmax).__name__
            raise ValueError(
                f"absmax: expected {blocks} values (one per block of {self.blocksize} of {n} elements), "
                f"got {got}"
            )
        self.absmax = self.absmax.reshape(-1)
        if (self.nested_absmax is None) != (self.nested_offset is None):
            raise ValueError("nested_absmax: double quantisation needs both nested_absmax and nested_offset")
        if self.nested_absmax is None:
            if self.absmax.dtype != torch.float32:
                raise ValueError(
                    f"absmax: expected float32 without double quantisation, got {self.absmax.dtype}"
                )
        else:
            self._check_nested(blocks)
        device = self.packed.device
        for name in ("absmax", "nested_absmax", "nested_offset", "nested_code"):
            t = getattr(self, name)
            if t is not None and t.device != device:
                raise ValueError(f"{name}: on {t.device}, but packed is on {device}")

    def _check_nested(self, blocks: int) -> None:
        if self.absmax.dtype != torch.uint8:
            raise ValueError(
                f"absmax: expected uint8 codes with double quantisation, got {self.absmax.dtype}"
            )
        nbs = self.nested_blocksize
        if not isinstance(nbs, int) or nbs <= 0 or nbs & (nbs - 1):
            raise ValueError(f"nested_blocksize: expected a power of two, got {nbs!r}")
        want = -(-blocks // nbs)
        if self.nested_absmax.numel() != want or self.nested_absmax.dtype != torch.float32:
            raise ValueError(
                f"nested_absmax: expected {want} float32 values (one per {nbs} blocks), got "
                f"{self.nested_absmax.numel()} {self.nested_absmax.dtype}"
            )
        self.nested_absmax = self.nested_absmax.reshape(-1)
        if not isinstance(self.nested_offset, torch.Tensor):
            self.nested_offset = torch.tensor(float(self.nested_offset), device=self.packed.device)
        if self.nested_offset.numel() != 1:
            raise ValueError(f"nested_offset: expected one value, got {self.nested_offset.numel()}")
        self.nested_offset = self.nested_offset.reshape(()).float()
        if self.nested_code is None:
            self.nested_code = dynamic_code(self.packed.device)
        if self.nested_code.numel() != 256:
            raise ValueError(
                f"nested_code: expected the 256-entry 8-bit code, got {self.nested_code.numel()}"
            )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of the per-weight data: codes, absmax, nested absmax and offset (not the shared tables)."""
        total = self.packed.numel() + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            total += self.nested_absmax.numel() * 4 + 4
        return total

    @property
    def bits_per_param(self) -> float:
        """8 * nbytes / numel: 4.5 at blocksize 64 without double quantisation, 4.127 with it."""
        return 8.0 * self.nbytes / max(1, self.numel)

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy on `device` (the same object when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        move = lambda t: None if t is None else t.to(device)
        return NF4Weight(
            move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize,
            move(self.nested_absmax), move(self.nested_offset), move(self.nested_code), self.nested_blocksize,
        )  # fmt: skip

    @classmethod
    def from_bnb(cls, param: torch.Tensor, quant_state=None) -> NF4Weight:
        """Wrap a bitsandbytes NF4 weight without re-quantising (the tensors are shared, not copied).

        Args:
            param: a quantised `bitsandbytes.nn.Params4bit`, or its packed tensor with `quant_state`.
            quant_state: a `bitsandbytes.functional.QuantState` (default: `param.quant_state`).
        Returns:
            NF4Weight. FP4 weights, unquantised parameters and the CPU-repacked layout raise ValueError.

        Example:
            >>> nf4 = NF4Weight.from_bnb(model.model.layers[0].self_attn.q_proj.weight)
        """
        from sails_fast.fused.nf4_weight import nf4_from_bnb

        return nf4_from_bnb(param, quant_state)

    def to_bnb(self):
        """(packed uint8 [(n+1)//2, 1], QuantState) that bitsandbytes' dequantize_4bit accepts."""
        from sails_fast.fused.nf4_weight import nf4_to_bnb

        return nf4_to_bnb(self)

    def __repr__(self) -> str:
        return (
            f"NF4Weight(shape={list(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, device={self.device}, "
            f"bits_per_param={self.bits_per_param:.3f})"
        )


def _check_nf4(nf4) -> None:
    if not isinstance(nf4, NF4Weight):
        raise ValueError(f"nf4: expected an NF4Weight (see quantize_nf4), got {type(nf4).__name__}")


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantise a weight to NF4, producing the bytes bitsandbytes' quantize_4bit(quant_type="nf4") does.

    Per block of `blocksize` flat elements: absmax = max |w|; each w / absmax goes to the nearest of the
    16 NF4 values (ties to the lower one). With double quantisation the absmax values are quantised again
    (offset = their mean; 8-bit dynamic code in blocks of 256). Runs on any device with plain PyTorch.

    Args:
        weight: any shape (usually [out, in]), fp32 / fp16 / bf16.
        blocksize: 32 .. 4096, a power of two (bitsandbytes' default 64).
        double_quant: bitsandbytes' compress_statistics (transformers' bnb_4bit_use_double_quant).
    Returns:
        NF4Weight with shape and dtype of `weight`.

    Example:
        >>> nf4 = quantize_nf4(torch.randn(1536, 576))
        >>> w = dequantize_nf4(nf4, torch.float32)   # [1536, 576]
    """
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected a floating-point tensor (fp32 / fp16 / bf16), got {got}")
    _check_float_dtype("weight", weight.dtype)
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant: expected a bool, got {double_quant!r}")
    parts = quantize_nf4_ref(weight, blocksize, double_quant)
    return NF4Weight(
        parts["packed"], parts["absmax"], weight.shape, weight.dtype, blocksize,
        parts["nested_absmax"], parts["nested_offset"],
    )  # fmt: skip


def dequantize_nf4(
    nf4: NF4Weight, dtype: torch.dtype = torch.bfloat16, *, backend: Backend = "auto"
) -> torch.Tensor:
    """Dequantise: NF4[code] * absmax in fp32 (absmax rebuilt as DYN[q] * nested_absmax + offset with
    double quantisation), then one rounding to `dtype`. In fp32 equal to bitsandbytes' dequantize_4bit.

    Args:
        nf4: the NF4Weight.
        dtype: fp32 / fp16 / bf16.
        backend: "triton" (the kernel), "torch" (the reference) or "auto".
    Returns:
        [*nf4.shape] in `dtype`, on nf4's device.

    Example:
        >>> w = dequantize_nf4(quantize_nf4(torch.randn(64, 32)), torch.float32)
    """
    _check_nf4(nf4)
    _check_float_dtype("dtype", dtype)
    if resolve_backend(backend, nf4.packed) == "torch" or nf4.numel == 0:
        return dequantize_nf4_ref(nf4, dtype)
    from sails_fast.kernels import nf4 as NK

    return NK.dequantize(nf4, dtype)


_CPU_PACKED_REASON = (
    "bitsandbytes repacked this weight for its CPU inference kernel (absmax rounded to bf16), which is "
    "not the NF4 layout; load the model again, and run the unfused CPU model in training mode or with "
    "gradients enabled so bitsandbytes leaves the weight alone"
)


def _quant_type_reason(quant_state) -> str | None:
    quant_type = getattr(quant_state, "quant_type", None)
    if quant_type != "nf4":
        return (
            f"quant_type is {quant_type!r}: FP4 is not NF4 (a different 4-bit code table); quantise with "
            f"bnb_4bit_quant_type='nf4'"
        )
    if getattr(quant_state, "packing_format_for_cpu", False):
        return _CPU_PACKED_REASON
    return None


def nf4_from_bnb(param: torch.Tensor, quant_state=None, *, check_code: bool = True) -> NF4Weight:
    """NF4Weight sharing the tensors of a bitsandbytes NF4 weight (see `NF4Weight.from_bnb`).

    Args:
        param: a quantised Params4bit, or the packed tensor (any quant_storage dtype, viewed as bytes).
        quant_state: its QuantState; default `param.quant_state`.
        check_code: compare the state's code table with NF4's (one small device-to-host copy).
    Returns:
        NF4Weight.
    """
    if not isinstance(param, torch.Tensor):
        raise ValueError(
            f"param: expected a bitsandbytes Params4bit or a packed tensor, got {type(param).__name__}"
        )
    if quant_state is None:
        quant_state = getattr(param, "quant_state", None)
    if quant_state is None:
        raise ValueError(
            "quant_state: the weight is not quantised (bitsandbytes quantises a Params4bit on .to(device)); "
            "pass a quantised Params4bit, or the packed tensor and its QuantState"
        )
    reason = _quant_type_reason(quant_state)
    if reason is not None:
        raise ValueError(f"quant_state: {reason}")
    if check_code and quant_state.code is not None:
        code = quant_state.code.detach().float().cpu()
        if code.numel() != 16 or not torch.equal(code, nf4_code("cpu")):
            raise ValueError("quant_state: its code table is not the NF4 table (quant_type says nf4)")
    packed = param.detach()
    if packed.dtype != torch.uint8:
        # quant_storage other than uint8 (e.g. bf16 for FSDP) holds the same bytes
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.reshape(-1, 1)
    nested = {}
    if quant_state.nested:
        state2 = quant_state.state2
        offset = quant_state.offset
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), device=packed.device)
        nested = dict(
            nested_absmax=state2.absmax, nested_offset=offset, nested_code=state2.code.float(),
            nested_blocksize=int(state2.blocksize),
        )  # fmt: skip
    return NF4Weight(
        packed, quant_state.absmax, quant_state.shape, quant_state.dtype, int(quant_state.blocksize), **nested
    )


def nf4_to_bnb(nf4: NF4Weight):
    """(packed uint8 [(n+1)//2, 1], QuantState) for bitsandbytes' dequantize_4bit / matmul_4bit."""
    from bitsandbytes.functional import QuantState

    state2 = offset = None
    if nf4.double_quant:
        state2 = QuantState(
            absmax=nf4.nested_absmax,
            code=nf4.nested_code,
            blocksize=nf4.nested_blocksize,
            dtype=torch.float32,
        )
        offset = nf4.nested_offset
    state = QuantState(
        absmax=nf4.absmax, shape=nf4.shape, code=nf4_code(nf4.device), blocksize=nf4.blocksize,
        quant_type="nf4", dtype=nf4.dtype, offset=offset, state2=state2,
    )  # fmt: skip
    return nf4.packed, state
