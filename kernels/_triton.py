"""The one place for Triton interpreter and version shims.

Everything that differs between a real GPU launch and `TRITON_INTERPRET=1` on the CPU lives here:

- `INTERPRET`: read once, at import. The interpreter must be chosen before any `@triton.jit` runs, so
  tests set the variable in `tests/conftest.py` before a kernel module is imported.
- `autotune`: the full config list on a GPU; a single large-block config under the interpreter, where
  benchmarking is impossible (no driver) and small tiles are slow (the interpreter pays per program).
- `dot`: tl.dot with bf16 operands returns garbage under the interpreter; operands are upcast there.
- `empty`: the output allocation helper. Tests turn on poisoning so an element a kernel forgot to write
  shows up as NaN instead of stale memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

# largest tl.arange extent we allow anywhere; keeps register tiles sane on a GPU
MAX_BLOCK = 1024

_poison_outputs: bool = os.environ.get("SAILS_FAST_POISON_OUTPUTS", "0") == "1"


def set_poison_outputs(enabled: bool) -> None:
    """Fill every kernel output with NaN (floats) or a sentinel (ints) before launch (tests only)."""
    global _poison_outputs
    _poison_outputs = bool(enabled)


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Allocate a kernel output. Poisoned when tests ask for it, so unwritten elements are visible."""
    if not _poison_outputs:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.full(tuple(shape), torch.iinfo(dtype).min, dtype=dtype, device=device)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def autotune(
    configs: list[triton.Config],
    key: list[str],
    interpret_config: triton.Config,
    prune_configs_by: dict | None = None,
    reset_to_zero: list[str] | None = None,
) -> Callable:
    """`triton.autotune` on a GPU, one fixed config under the interpreter.

    Under the interpreter multi-config autotuning fails (it benchmarks through a GPU driver), so the
    block sizes of `interpret_config` are injected with `triton.heuristics` instead.
    """
    if INTERPRET:
        fixed = dict(interpret_config.kwargs)
        return triton.heuristics({name: (lambda args, v=value: v) for name, value in fixed.items()})
    return triton.autotune(
        configs=configs, key=key, prune_configs_by=prune_configs_by, reset_to_zero=reset_to_zero
    )


def prune_by_size(size_args: dict[str, str]) -> dict:
    """Autotune pruning: drop configs whose block is much larger than the problem along a dimension.

    `size_args` maps a block name (e.g. "BLOCK_M") to the kernel argument holding that size ("M").
    A block is kept when it is at most the next power of two of the size (but at least 16).
    """

    def prune(configs, named_args, **kwargs):
        kept = []
        for config in configs:
            fits = True
            for block_name, size_name in size_args.items():
                limit = max(16, next_power_of_2(named_args[size_name]))
                if config.kwargs.get(block_name, 0) > limit:
                    fits = False
            if fits:
                kept.append(config)
        return kept or configs[:1]

    return {"early_config_prune": prune}


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr):
    """acc += a @ b with fp32 accumulation; operands upcast to fp32 when UPCAST (the interpreter).

    fp32 operands use full IEEE precision on a GPU, as torch's default matmul does; tl.dot's default
    there is TF32, whose 10-bit mantissa would break the fp32 tolerances and differ from the reference.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def to_bf16_rne(v):
    """Round fp32 to the nearest bf16 (ties to even), returned as fp32; casting it to bf16 is then exact.

    The interpreter's fp32 -> bf16 cast truncates, where a GPU rounds to nearest: kernels round by hand
    when interpreting so both give the same bits.
    """
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to(v, dtype: tl.constexpr, manual_bf16: tl.constexpr):
    """Cast fp32 `v` to `dtype` with round-to-nearest-even (by hand for bf16 when `manual_bf16`)."""
    if dtype == tl.bfloat16 and manual_bf16:
        v = to_bf16_rne(v)
    return v.to(dtype)


@triton.jit
def low_rank_tile(
    left_ptr, right_ptr, o_rows, o_cols, o_r, m_rows, m_cols, m_r,
    stride_left_row, stride_left_r, stride_right_r, stride_right_col,
    COMPUTE_DTYPE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    """The rank-r term of a LoRA epilogue: left[rows, :r] @ right[:r, cols], fp32 accumulation.

    Both operands are rounded to the activation dtype first, as PEFT's adapter runs in it; r is padded
    to the rank block (>= 16 for tl.dot on a GPU) by the masks.
    """
    b_left = tl.load(
        left_ptr + o_rows[:, None] * stride_left_row + o_r[None, :] * stride_left_r,
        mask=m_rows[:, None] & m_r[None, :],
        other=0.0,
    )  # [BLOCK_ROWS, BLOCK_R]
    b_right = tl.load(
        right_ptr + o_r[:, None] * stride_right_r + o_cols[None, :] * stride_right_col,
        mask=m_r[:, None] & m_cols[None, :],
        other=0.0,
    )  # [BLOCK_R, BLOCK_COLS]
    b_left = round_to(b_left.to(tl.float32), COMPUTE_DTYPE, UPCAST)
    b_right = round_to(b_right.to(tl.float32), COMPUTE_DTYPE, UPCAST)
    return dot(b_left, b_right, tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32), UPCAST)


def check_gpu_dot_width(name: str, size: int) -> None:
    """tl.dot needs an inner dimension of at least 16 on a GPU (the interpreter accepts less)."""
    if size < 16:
        raise ValueError(f"{name}: tl.dot needs an inner block of at least 16 on a GPU, got {size}")
