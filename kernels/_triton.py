"""The one place for Triton interpreter and version shims.

Everything that differs between a real GPU launch and `TRITON_INTERPRET=1` on the CPU lives here:

- `INTERPRET`: read once, at import. The interpreter must be chosen before any `@triton.jit` runs, so
  tests set the variable in `tests/conftest.py` before a kernel module is imported.
- `autotune`: the full config list on a GPU; a single large-block config under the interpreter, where
  benchmarking is impossible (no driver) and small tiles are slow (the interpreter pays per program).
- `dot`: tl.dot with bf16 operands returns garbage under the interpreter; operands are upcast there.
- `empty`: the output allocation helper. Tests turn on poisoning so an element a kernel forgot to write
  shows up as NaN instead of stale memory.
- `target_of`: the GPU a launch is for (arch, SMs, shared memory, L2), read from the device, or the one
  `simulate_target` sets, so benchmarks/kernel_audit.py sees the configs a launcher keeps on a GPU it
  does not have.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

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


def token_bucket(m: int) -> int:
    """The autotune key for a token count: its next power of two in [16, 8192].

    Keying autotune on the exact M would re-tune every kernel for every new batch shape (seconds each
    time, a stall in variable-length training); the best tile changes only with M's order of magnitude.
    """
    return min(8192, max(16, next_power_of_2(m)))


@dataclass(frozen=True)
class Target:
    """What a launcher needs to know of the GPU it launches on (per-block and per-SM limits)."""

    name: str
    arch: int  # compute capability as 10 * major + minor; 0 for the interpreter
    sm_count: int
    smem_per_block: int  # bytes a block may opt into
    smem_per_sm: int
    l2_bytes: int
    max_threads_per_sm: int
    max_blocks_per_sm: int
    regs_per_sm: int = 65536


# published limits (CUDA C programming guide, "Technical Specifications per Compute Capability"; SM
# counts and L2 sizes of the named parts from their datasheets)
TARGETS: dict[int, Target] = {
    90: Target("H100 SXM", 90, 132, 227 * 1024, 228 * 1024, 50 * 2**20, 2048, 32),
    89: Target("RTX 4090", 89, 128, 99 * 1024, 100 * 1024, 72 * 2**20, 1536, 24),
    86: Target("RTX 3090", 86, 82, 99 * 1024, 100 * 1024, 6 * 2**20, 1536, 16),
    80: Target("A100 SXM", 80, 108, 163 * 1024, 164 * 1024, 40 * 2**20, 2048, 32),
}
# the interpreter: one "SM", no shared-memory limit that could prune a config
INTERPRETER_TARGET = Target("interpreter", 0, 1, 2**30, 2**30, 2**30, 2048, 32)

_simulated: Target | None = None


@contextlib.contextmanager
def simulate_target(target: Target) -> Iterator[Target]:
    """Launchers see `target` instead of the real device (the ahead-of-time audit, tests)."""
    global _simulated
    previous, _simulated = _simulated, target
    try:
        yield target
    finally:
        _simulated = previous


def target_of(device: torch.device | str) -> Target:
    """The GPU a launch on `device` runs on: simulated, the interpreter, or read from the CUDA device."""
    if _simulated is not None:
        return _simulated
    device = torch.device(device)
    if INTERPRET or device.type != "cuda":
        return INTERPRETER_TARGET
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


_cuda_targets: dict[int, Target] = {}


def _cuda_target(index: int) -> Target:
    if index not in _cuda_targets:
        props = torch.cuda.get_device_properties(index)
        arch = 10 * props.major + props.minor
        known = TARGETS.get(arch, TARGETS[80] if arch < 90 else TARGETS[90])
        _cuda_targets[index] = Target(
            name=props.name,
            arch=arch,
            sm_count=props.multi_processor_count,
            smem_per_block=getattr(props, "shared_memory_per_block_optin", known.smem_per_block),
            smem_per_sm=getattr(props, "shared_memory_per_multiprocessor", known.smem_per_sm),
            l2_bytes=getattr(props, "L2_cache_size", known.l2_bytes),
            max_threads_per_sm=getattr(props, "max_threads_per_multi_processor", known.max_threads_per_sm),
            max_blocks_per_sm=known.max_blocks_per_sm,
        )
    return _cuda_targets[index]


# `cache_results` (autotune timings kept in triton's cache dir across processes) exists from triton 3.4
_AUTOTUNE_CACHE = (
    {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
)


def autotune(
    configs: list[triton.Config],
    key: list[str],
    interpret_config: triton.Config,
    prune: Callable[[list[triton.Config], dict], list[triton.Config]] | None = None,
    reset_to_zero: list[str] | None = None,
) -> Callable:
    """`triton.autotune` on a GPU, one fixed config under the interpreter.

    `prune(configs, named_args)` drops configs that cannot run or cannot win on this launch (see
    `gemm_pruner`); it must keep at least one. Timings are cached on disk where triton supports it, so a
    new process does not re-tune. Under the interpreter multi-config autotuning fails (it benchmarks
    through a GPU driver), so the block sizes of `interpret_config` are injected with
    `triton.heuristics` instead.
    """
    if INTERPRET:
        fixed = dict(interpret_config.kwargs)
        return triton.heuristics({name: (lambda args, v=value: v) for name, value in fixed.items()})
    prune_configs_by = None
    if prune is not None:
        # triton passes positional arguments as named_args and the launch's keywords (constexpr blocks
        # set by the launcher) separately: the pruner sees both
        prune_configs_by = {
            "early_config_prune": lambda configs, named_args, **kw: prune(configs, {**named_args, **kw})
        }
    return triton.autotune(
        configs=configs,
        key=key,
        prune_configs_by=prune_configs_by,
        reset_to_zero=reset_to_zero,
        **_AUTOTUNE_CACHE,
    )


def pipeline_smem_bytes(
    config: triton.Config, tiles: Sequence[tuple[str, str, float]], launch_args: dict
) -> int:
    """Shared memory of a software-pipelined loop: num_stages buffers of each operand tile.

    `tiles` names the two block sizes of each operand and its bytes per element, e.g. (("BLOCK_M",
    "BLOCK_K", 2), ("BLOCK_K", "BLOCK_N", 2)); a block is looked up in the config, then in the launch's
    own arguments (a block the launcher sets, such as the rank block). The epilogue reuses the same
    allocation; benchmarks/kernel_audit.py checks the estimate against what the compiler allocates.
    """
    values = {**launch_args, **config.kwargs}
    per_stage = sum(values[a] * values[b] * elem for a, b, elem in tiles)
    return int(max(1, config.num_stages) * per_stage)


def gemm_pruner(
    size_args: dict[str, str], smem_bytes: Callable[[triton.Config, dict], int], operand_arg: str
) -> Callable[[list[triton.Config], dict], list[triton.Config]]:
    """Autotune pruning for a tiled kernel, per launch:

    - a config whose shared memory (`smem_bytes(config, launch_args)`) exceeds what the target GPU allows
      per block is dropped, so a consumer GPU never tries, and fails to launch, a tile sized for a
      data-centre part (the target is read from the device of the tensor argument `operand_arg`);
    - a block much larger than the problem is dropped: `size_args` maps a block name ("BLOCK_M") to the
      argument holding that size ("M_BUCKET"), and a block is kept up to the size's next power of two.
    """

    def prune(configs: list[triton.Config], named_args: dict) -> list[triton.Config]:
        target = target_of(named_args[operand_arg].device)
        fitting = [c for c in configs if smem_bytes(c, named_args) <= target.smem_per_block]
        if not fitting:
            raise ValueError(
                f"no tile config fits the {target.smem_per_block} bytes of shared memory of {target.name}"
            )
        kept = [
            c
            for c in fitting
            if all(
                c.kwargs.get(block, 0) <= max(16, next_power_of_2(named_args[size]))
                for block, size in size_args.items()
            )
        ]
        # the smallest fitting tile when every tile is larger than the problem
        smallest = min(fitting, key=lambda c: math.prod(c.kwargs.get(b, 1) for b in size_args))
        return kept or [smallest]

    return prune


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
def rank_dot(a, b, acc, UPCAST: tl.constexpr):
    """acc += a @ b for the rank-r products of LoRA. With fp32 operands (PEFT's default: fp32 adapters
    over a 16-bit base) they run as three TF32 products on the tensor cores ("tf32x3", within a few
    ulp of fp32) instead of the FMA units: the rank-r term is then computed in fp32 as PEFT does, at a
    tensor-core price. 16-bit operands: as `dot`."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
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
def load_tile(ptr, o_rows, o_cols, m_rows, m_cols, stride_row, stride_col):
    """The [len(o_rows), len(o_cols)] tile at `ptr`; masked lanes read 0, so they add nothing to a dot."""
    return tl.load(
        ptr + o_rows[:, None] * stride_row + o_cols[None, :] * stride_col,
        mask=m_rows[:, None] & m_cols[None, :],
        other=0.0,
    )


@triton.jit
def low_rank_tile(
    left_ptr, right_ptr, o_rows, o_cols, o_r, m_rows, m_cols, m_r,
    stride_left_row, stride_left_r, stride_right_r, stride_right_col,
    COMPUTE_DTYPE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    """The rank-r term of a LoRA epilogue: left[rows, :r] @ right[:r, cols], fp32 accumulation.

    Both operands are rounded to COMPUTE_DTYPE first, the adapter's dtype (PEFT casts the adapter's
    input to lora_A's dtype and runs both adapter GEMMs in it); r is padded to the rank block (>= 16
    for tl.dot on a GPU) by the masks.
    """
    # [BLOCK_ROWS, BLOCK_R] and [BLOCK_R, BLOCK_COLS]
    b_left = load_tile(left_ptr, o_rows, o_r, m_rows, m_r, stride_left_row, stride_left_r)
    b_right = load_tile(right_ptr, o_r, o_cols, m_r, m_cols, stride_right_r, stride_right_col)
    b_left = round_to(b_left.to(tl.float32), COMPUTE_DTYPE, UPCAST)
    b_right = round_to(b_right.to(tl.float32), COMPUTE_DTYPE, UPCAST)
    return rank_dot(b_left, b_right, tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32), UPCAST)


@triton.jit
def keep_mask(seed, o_m, o_k, K, dropout_p):
    """Dropout keep-mask for the [len(o_m), len(o_k)] tile of an [M, K] tensor, from Philox."""
    o_flat = (o_m[:, None] * K + o_k[None, :]).to(tl.int32)
    return tl.rand(seed, o_flat) >= dropout_p


@triton.jit
def low_rank_term(
    left_ptr, right_ptr, bias_ptr, o_rows, o_cols, o_r, m_rows, m_cols, m_r,
    stride_left_row, stride_left_r, stride_right_r, stride_right_col,
    scaling, seed, dropout_p, dropout_scale, N_COLS,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):  # fmt: skip
    """scaling * dropout'(left @ right) + bias for one [BLOCK_ROWS, BLOCK_COLS] tile, fp32.

    The GEMM kernels start their accumulator from this tile and run the main loop on top of it, so the
    rank-r term never needs a second [BLOCK_ROWS, BLOCK_COLS] register tile (which spilled the large
    tiles). The dropout keep-mask is that of an [rows, N_COLS] input (dx of the backward).
    """
    b_term = low_rank_tile(left_ptr, right_ptr, o_rows, o_cols, o_r, m_rows, m_cols, m_r,
                           stride_left_row, stride_left_r, stride_right_r, stride_right_col,
                           COMPUTE_DTYPE, UPCAST, BLOCK_ROWS, BLOCK_COLS)  # fmt: skip
    if HAS_DROPOUT:
        b_term = tl.where(keep_mask(seed, o_rows, o_cols, N_COLS, dropout_p), b_term * dropout_scale, 0.0)
    b_term = scaling * b_term
    if HAS_BIAS:
        b_term += tl.load(bias_ptr + o_cols, mask=m_cols, other=0.0).to(tl.float32)[None, :]
    return b_term


def check_gpu_dot_width(name: str, size: int) -> None:
    """tl.dot needs an inner dimension of at least 16 on a GPU (the interpreter accepts less)."""
    if size < 16:
        raise ValueError(f"{name}: tl.dot needs an inner block of at least 16 on a GPU, got {size}")
