"""NF4 weights (bitsandbytes' format, bit for bit) and the QLoRA linear: public functions and nn.Modules
(the registered operator with its autograd is `sails_fast.ops`).

Kernels and launchers live in `sails_fast.kernels.nf4` (the LoRA pieces in `sails_fast.kernels.lora`); the
plain reference in `sails_fast.kernels.nf4_ref`, which is also the CPU backend. Format: docs/nf4.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from . import strategy as strategies
from ._backend import resolve_backend
from .kernels.nf4_ref import (
    NESTED_BLOCKSIZE,
    check_blocksize,
    dequantize_nf4_ref,
    dynamic_code,
    qlora_linear_ref,
    quantize_nf4_ref,
)
from .lora import Backend, autocast_cast, autocast_dtype, lora_scaling, validate_lora_args
from .ops import nf4_op_args, seed_tensor

QLoraStrategy = Literal["auto", "fused", "dequant", "cublas"]
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
        from .integrations.bnb import nf4_from_bnb

        return nf4_from_bnb(param, quant_state)

    def to_bnb(self):
        """(packed uint8 [(n+1)//2, 1], QuantState) that bitsandbytes' dequantize_4bit accepts."""
        from .integrations.bnb import nf4_to_bnb

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
    from .kernels import nf4 as NK

    return NK.dequantize(nf4, dtype)


def _resolve_strategy(strategy: str, path: str | None) -> str:
    """`path` is the old name of `strategy` (before the cuBLAS strategy); it still works, with a warning."""
    if path is not None:
        warnings.warn("qlora: `path` is now `strategy`", DeprecationWarning, stacklevel=3)
        if strategy != "auto":
            raise ValueError("path: give `strategy` only (`path` is its old name)")
        strategy = path
    strategies.check_strategy("qlora_linear", strategy)
    return strategy


def qlora_linear(
    x: torch.Tensor,
    nf4: NF4Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    backend: Backend = "auto",
    seed: int | None = None,
    strategy: QLoraStrategy = "auto",
    path: str | None = None,
) -> torch.Tensor:
    """QLoRA linear: PEFT's lora.bnb.Linear4bit math with the frozen base in NF4.

        y = x @ W^T + bias + scaling * (dropout(x) @ lora_A^T) @ lora_B^T,
        W = dequantize_nf4(nf4, nf4.dtype).to(x.dtype)

    Args:
        x: [..., in], fp32 / fp16 / bf16 (the compute dtype).
        nf4: NF4Weight of shape [out, in]. Never gets a gradient.
        lora_A: [r, in]; lora_B: [out, r]; any float dtype (read in x's dtype, gradients in their own).
        scaling: alpha / r (or alpha / sqrt(r) with rsLoRA).
        bias: [out] or None (a gradient only if it requires one).
        dropout_p: dropout on the adapter input, in [0, 1); the Triton path regenerates the mask from a
            seed in the backward.
        backend: "triton", "torch" (the reference) or "auto" (Triton for CUDA tensors or under
            TRITON_INTERPRET=1, else the reference).
        seed: dropout seed of the Triton path; drawn from torch's generator when None.
        strategy: "fused" (W dequantised tile by tile inside the Triton GEMMs), "dequant" (W dequantised
            once into a reused buffer, then the fused dense LoRA kernels), "cublas" (dequantised once,
            then torch's GEMM accumulating into the buffer a Triton kernel filled with the rank-r term)
            or "auto" (measured table, else the roofline model: `sails_fast.strategy`). All give the
            same W. `path` is the old name of this argument.
    Returns:
        [..., out] in x's dtype.

    Example:
        >>> nf4 = quantize_nf4(torch.randn(64, 32))
        >>> a = torch.randn(8, 32, requires_grad=True); b = torch.zeros(64, 8, requires_grad=True)
        >>> y = qlora_linear(torch.randn(4, 32), nf4, a, b, scaling=2.0)   # [4, 64]
    """
    _check_nf4(nf4)
    if len(nf4.shape) != 2:
        raise ValueError(f"nf4: expected a weight of shape [out, in], got {list(nf4.shape)}")
    out_features, in_features = nf4.shape
    # under autocast every matrix product of PEFT's layer runs in autocast's dtype: so does ours
    x, lora_A, lora_B, bias = autocast_cast(autocast_dtype(x.device.type), x, lora_A, lora_B, bias)
    tensors = {"x": x, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        tensors["bias"] = bias
    validate_lora_args(x, in_features, out_features, lora_A, lora_B, bias, dropout_p, tensors)
    _check_float_dtype("x", x.dtype)
    if nf4.device != x.device:
        raise ValueError(f"nf4: on {nf4.device}, but x is on {x.device}; move it with nf4.to(device)")
    strategy = _resolve_strategy(strategy, path)

    if resolve_backend(backend, x, nf4.packed) == "torch" or x.numel() == 0:
        return qlora_linear_ref(x, nf4, lora_A, lora_B, scaling, bias, dropout_p)

    x2d = x.reshape(-1, in_features)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    y, _ = torch.ops.sails_fast.qlora_linear(
        x2d, *nf4_op_args(nf4), lora_A, lora_B, bias, float(scaling), float(dropout_p),
        seed_tensor(seed, dropout_p), strategy,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], out_features)


_NF4_BUFFERS = ("packed", "absmax", "nested_absmax", "nested_offset", "nested_code")


class NF4LoraLinear(nn.Module):
    """A linear layer with a frozen NF4 base weight and (for r > 0) a trainable LoRA adapter.

    The NF4 tensors are buffers (`weight_packed`, `weight_absmax`, and with double quantisation
    `weight_nested_absmax`, `weight_nested_offset`, `weight_nested_code`), so `.to(device)` and the state
    dict carry them; `nf4` gives them back as an NF4Weight. With r = 0 the layer is a frozen 4-bit linear.

    Args:
        nf4: the quantised weight, shape [out, in].
        bias: [out] or None; frozen.
        r: adapter rank (0: no adapter). alpha: PEFT's lora_alpha (default r). dropout: adapter dropout
            (training mode only). use_rslora: scaling alpha / sqrt(r).
        backend, strategy: see `qlora_linear` (`path`: the old name of `strategy`).
        adapter_dtype: dtype of lora_A / lora_B (default: the weight's original dtype).

    Example:
        >>> layer = NF4LoraLinear.from_linear(nn.Linear(576, 1536), r=16, alpha=32)
        >>> y = layer(torch.randn(2, 7, 576))
    """

    def __init__(
        self,
        nf4: NF4Weight,
        bias: torch.Tensor | None = None,
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        backend: Backend = "auto",
        strategy: QLoraStrategy = "auto",
        adapter_dtype: torch.dtype | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__()
        _check_nf4(nf4)
        if len(nf4.shape) != 2:
            raise ValueError(f"nf4: expected a weight of shape [out, in], got {list(nf4.shape)}")
        if not isinstance(r, int) or r < 0:
            raise ValueError(f"r: expected a non-negative int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a float in [0, 1), got {dropout!r}")
        strategy = _resolve_strategy(strategy, path)
        self.out_features, self.in_features = nf4.shape
        self.weight_shape, self.weight_dtype = nf4.shape, nf4.dtype
        self.blocksize, self.nested_blocksize = nf4.blocksize, nf4.nested_blocksize
        for name in _NF4_BUFFERS:
            self.register_buffer(f"weight_{name}", getattr(nf4, name))
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias: expected shape [{self.out_features}], got {list(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.bias = None
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.scaling = lora_scaling(r, self.alpha, use_rslora) if r > 0 else 0.0
        self.dropout = float(dropout)
        self.backend, self.strategy = backend, strategy
        factory = {"device": nf4.device, "dtype": adapter_dtype or nf4.dtype}
        if r > 0:
            self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
            self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
            self.reset_lora_parameters()
        else:
            self.lora_A = self.lora_B = None

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) must move the NF4 tensors, never convert them: a bf16 absmax would no
        # longer be the bitsandbytes format
        kept = {n: b for n, b in self._buffers.items() if n.startswith("weight_") and b is not None}
        super()._apply(fn, recurse)
        for name, original in kept.items():
            self._buffers[name] = original.to(self._buffers[name].device)
        return self

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, r: int = 8, *, blocksize: int = 64, double_quant: bool = True, **kwargs
    ) -> NF4LoraLinear:
        """Quantise an nn.Linear's weight to NF4 and wrap it (other arguments as the constructor's)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        nf4 = quantize_nf4(linear.weight.detach(), blocksize, double_quant)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(nf4, bias, r, **kwargs)

    @property
    def nf4(self) -> NF4Weight:
        return NF4Weight(
            self.weight_packed, self.weight_absmax, self.weight_shape, self.weight_dtype, self.blocksize,
            self.weight_nested_absmax, self.weight_nested_offset, self.weight_nested_code,
            self.nested_blocksize,
        )  # fmt: skip

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A Kaiming-uniform (a = sqrt(5)), B = 0, so the layer starts as the base."""
        if self.r > 0:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = self.lora_A, self.lora_B
        if self.r == 0:
            # no adapter: an empty rank keeps one code path (the low-rank epilogue adds zero)
            lora_A = x.new_zeros(0, self.in_features)
            lora_B = x.new_zeros(self.out_features, 0)
        p = self.dropout if (self.training and self.r > 0) else 0.0
        return qlora_linear(
            x, self.nf4, lora_A, lora_B, self.scaling, self.bias, p,
            backend=self.backend, strategy=self.strategy,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, dropout={self.dropout}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, double_quant={self.weight_nested_absmax is not None}, "
            f"backend={self.backend!r}, strategy={self.strategy!r}"
        )


def _matches(name: str, targets: Iterable[str] | None, skip: Iterable[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if targets is None:
        return leaf not in set(skip)
    return any(name == t or name.endswith("." + t) for t in targets)


def quantize_model_nf4(
    model: nn.Module,
    target_modules: Iterable[str] | None = None,
    *,
    r: int = 0,
    alpha: float | None = None,
    dropout: float = 0.0,
    blocksize: int = 64,
    double_quant: bool = True,
    backend: Backend = "auto",
    strategy: QLoraStrategy = "auto",
    skip_modules: Iterable[str] = ("lm_head",),
) -> list[str]:
    """Swap nn.Linear layers of `model` for NF4LoraLinear in place (the 4-bit path without bitsandbytes).

    Args:
        model: any module.
        target_modules: module names or name suffixes ("q_proj", "layers.0.mlp.up_proj"); None: every
            nn.Linear except those whose last name is in `skip_modules` (the output head, by default).
        r, alpha, dropout: adapter of each new layer (r = 0: frozen 4-bit linears, no adapter).
        blocksize, double_quant: NF4 format, as in `quantize_nf4`.
        backend, strategy: see `qlora_linear`.
    Returns:
        The names of the swapped modules. With r > 0 every parameter but the new adapters is frozen
        afterwards, as `peft.get_peft_model` does (embeddings, norms and the head included).

    Raises:
        ValueError naming the targets that match no nn.Linear of the model.

    Example:
        >>> names = quantize_model_nf4(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=16, alpha=32)
    """
    if target_modules is not None:
        target_modules = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        unknown = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in linears)]
        if unknown:
            raise ValueError(
                f"target_modules: {unknown} match no nn.Linear of the model (its linear layers end in "
                f"{sorted({n.rsplit('.', 1)[-1] for n in linears})[:12]})"
            )
    strategies.check_strategy("qlora_linear", strategy)
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is not nn.Linear or not _matches(name, target_modules, skip_modules):
                continue
            layer = NF4LoraLinear.from_linear(
                child, r, blocksize=blocksize, double_quant=double_quant,
                alpha=alpha, dropout=dropout, backend=backend, strategy=strategy,
            )  # fmt: skip
            setattr(parent, child_name, layer)
            swapped.append(name)
    if r > 0:
        # only the adapters train, as get_peft_model leaves it
        for param_name, param in model.named_parameters():
            param.requires_grad_(param_name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"))
    return swapped
