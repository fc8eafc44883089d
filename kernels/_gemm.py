"""Tile configs and the program-to-tile map shared by the GEMM-shaped kernels (dense LoRA and NF4).

Configs are listed once per kernel family and pruned per launch by `_triton.gemm_pruner`: tiles much
larger than the problem go, and so do tiles whose pipelined operand buffers exceed the shared memory of
the GPU the launch is on (an RTX 3090/4090 allows 99 KB per block, an A100 163 KB, an H100 227 KB).
benchmarks/kernel_audit.py compiles every config each GPU keeps and records registers, spills, shared
memory, pipelining and wgmma use; its default-tier test fails when a kept bf16/fp16 config spills or
overflows.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton import gemm_pruner, pipeline_smem_bytes

# (rows, output width, reduction block, warps, stages) for a 16-bit GEMM with a rank-r epilogue. The
# first three need a data-centre part's shared memory (131-147 KB at bf16); the rest fit a consumer
# GPU's 99 KB.
_MATMUL_ROWS = [
    (128, 256, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 3),
]
# fp32 operands take full-precision FMA dots (no tensor cores): small tiles, few stages
_MATMUL_ROWS_FP32 = [(64, 64, 32, 4, 3), (64, 128, 32, 8, 3)]
INTERPRET_MATMUL_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 256, "GROUP_M": 8})


def config_key(config: triton.Config) -> tuple:
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def _build(rows, out_block: str, reduce_block: str) -> list[triton.Config]:
    return [
        triton.Config(
            {"BLOCK_M": bm, out_block: width, reduce_block: red, "GROUP_M": 8}, num_warps=w, num_stages=s
        )
        for bm, width, red, w, s in rows
    ]


def matmul_configs(out_block: str = "BLOCK_N", reduce_block: str = "BLOCK_K") -> list[triton.Config]:
    """Every config a dense GEMM kernel may tune over (16-bit list, then fp32 list); `matmul_pruner`
    keeps those right for a launch. The forward's output width is BLOCK_N and its reduction BLOCK_K; dx
    swaps the two roles, so the same rows give it the same tile shapes."""
    return _build(_MATMUL_ROWS, out_block, reduce_block) + _build(_MATMUL_ROWS_FP32, out_block, reduce_block)


# The fused NF4 GEMMs dequantise the weight tile in registers and store it to shared memory for the dot.
# A weight row's tile is a dense byte load with one scale when the tile's extent along K (the forward's
# reduction block, dx's output block) is at most the quantisation block (64 by default): listed first, and
# all that `nf4_matmul_pruner` keeps for such launches. The last rows gather per element (odd K).
_NF4_FWD_ROWS = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 3),
    (64, 128, 64, 8, 3),
    (64, 64, 64, 4, 3),
    (128, 128, 32, 8, 4),
    (64, 64, 32, 4, 2),
]
_NF4_DX_ROWS = [
    (128, 64, 128, 8, 3),
    (128, 64, 64, 8, 3),
    (64, 64, 128, 4, 3),
    (64, 64, 64, 4, 3),
    (128, 32, 128, 4, 3),
    (64, 64, 32, 4, 2),
]
_NF4_GATHER_ROW = (64, 64, 32, 4, 2)
# under the interpreter: a 64-wide weight-row tile, so the dense byte-tile path runs at the default
# quantisation block of 64 (wider tiles would leave only the gather path tested)
INTERPRET_NF4_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8})


def nf4_matmul_configs(out_block: str = "BLOCK_N", reduce_block: str = "BLOCK_K") -> list[triton.Config]:
    """The fused NF4 GEMMs' configs (16-bit, then fp32), in the roles of `matmul_configs`."""
    rows = _NF4_FWD_ROWS if out_block == "BLOCK_N" else _NF4_DX_ROWS
    return _build(rows, out_block, reduce_block) + _build(_MATMUL_ROWS_FP32, out_block, reduce_block)


_FP32_KEYS = {
    config_key(c)
    for roles in (("BLOCK_N", "BLOCK_K"), ("BLOCK_K", "BLOCK_N"))
    for c in _build(_MATMUL_ROWS_FP32, *roles)
}


def _pruner(reduce_block: str, operand_arg: str, out_block: str, smem_bytes):
    out_size = "N" if out_block == "BLOCK_N" else "K"
    by_size_and_smem = gemm_pruner({"BLOCK_M": "M_BUCKET", out_block: out_size}, smem_bytes, operand_arg)

    def prune(configs, named_args):
        wide = named_args[operand_arg].element_size() == 4
        pool = [c for c in configs if (config_key(c) in _FP32_KEYS) == wide]
        if _rank_operand(named_args).element_size() == 4:
            # fp32 adapters: the rank-r term's fp32-accurate product (and its dropout mask in dx) adds to
            # the accumulator's registers; at most 64 accumulator elements per thread stay clear of spills
            pool = [c for c in pool if _accumulator_per_thread(c, out_block) <= 64] or pool
        return by_size_and_smem(pool or configs, named_args)

    return prune


def _accumulator_per_thread(config: triton.Config, out_block: str) -> int:
    return config.kwargs["BLOCK_M"] * config.kwargs[out_block] // (32 * config.num_warps)


def _rank_operand(args: dict):
    """xa in the forward kernels, g in dx: the tensor whose dtype is the adapter's."""
    return args["xa_ptr"] if "xa_ptr" in args else args["g_ptr"]


def matmul_pruner(reduce_block: str, operand_arg: str, out_block: str = "BLOCK_N"):
    """Pruning for the dense fused GEMM kernels: by the launch's dtype (16-bit or fp32 config list), by
    size (M bucket, and the output width `out_block` against N or K), and by the target's shared memory
    (num_stages buffers of the activation and weight tiles). `reduce_block` is the block of the reduction
    dimension (BLOCK_K in the forward, BLOCK_N in dx)."""

    def smem(config, args):
        e = args[operand_arg].element_size()
        tiles = (("BLOCK_M", reduce_block, e), (reduce_block, out_block, e))
        return pipeline_smem_bytes(config, tiles, args) + _rank_operand_bytes(config, args, out_block)

    return _pruner(reduce_block, operand_arg, out_block, smem)


def _rank_operand_bytes(config: triton.Config, args: dict, out_block: str) -> int:
    """The rank-r term's two operand tiles ([BLOCK_M, R] and [R, width]), staged once in shared memory
    in the adapter's dtype (xa in the forward, g in dx: fp32 with PEFT's default fp32 adapters)."""
    k = config.kwargs
    return (k["BLOCK_M"] + k[out_block]) * args["BLOCK_R"] * _rank_operand(args).element_size()


def nf4_matmul_pruner(reduce_block: str, operand_arg: str, out_block: str = "BLOCK_N"):
    """`matmul_pruner` for the fused NF4 GEMMs. Shared memory: per stage the activation tile and the
    packed codes (half a byte per weight), plus the dequantised weight tile, once, in the activation
    dtype. Row-aligned launches keep only tiles that take the dense byte-tile path; the others only the
    small gather tile."""
    row_block = reduce_block if out_block == "BLOCK_N" else out_block

    def smem(config, args):
        e = args[operand_arg].element_size()
        tiles = (("BLOCK_M", reduce_block, e), (reduce_block, out_block, 0.5))
        dequantised = config.kwargs[reduce_block] * config.kwargs[out_block] * e
        return (
            pipeline_smem_bytes(config, tiles, args)
            + dequantised
            + _rank_operand_bytes(config, args, out_block)
        )

    gather_key = config_key(_build([_NF4_GATHER_ROW], out_block, reduce_block)[0])
    by_dtype_size_smem = _pruner(reduce_block, operand_arg, out_block, smem)

    def prune(configs, args):
        if args["ROW_ALIGNED"]:
            dense = [c for c in configs if c.kwargs[row_block] <= args["BLOCKSIZE"]]
            configs = dense or configs
        else:
            configs = [c for c in configs if config_key(c) == gather_key] or configs
        return by_dtype_size_smem(configs, args)

    return prune


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map the 1-D program id to an (m, n) tile, walking GROUP_M row-tiles at a time for L2 reuse."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    i_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    i_n = (pid % num_pid_in_group) // group_size_m
    return i_m.to(tl.int64), i_n.to(tl.int64)
