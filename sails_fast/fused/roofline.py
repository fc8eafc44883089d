"""A roofline model of every op and provider: FLOP and byte counts written out launch by launch.

Each launch (a kernel, or one torch op of a baseline) takes at least max(tensor-core FLOP / peak, bytes /
bandwidth, other arithmetic / CUDA-core peak) on a device; an op takes at least the sum over its
launches, which run one after the other. The third term counts work outside the matrix units that a
fused kernel adds (NF4 dequantisation inside the GEMM, the statistics epilogue), at stated op counts.
Bytes count each compulsory DRAM access once (inputs read, outputs written); re-reads that a good tile
order keeps in L2 are not counted, launch overheads are not counted, and every GEMM is assumed to run at
the same fraction of peak whoever wrote it. So the model is a floor for each provider and a prediction of the
*ratio* between providers; benchmarks/roofline.py prints it beside measured rows where a GPU has run.

Shapes: LoRA x [M, K] -> [M, N], rank R; SAE x [T, d], F latents, C classes. Element sizes: `e` bytes
for the activation / weight dtype (2 for bf16), 4 for fp32 partials and statistics.

`sails_fast.fused.strategy` uses `best_strategy` for "auto" until a GPU benchmark has filled the strategy
table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """Peak dense 16-bit tensor-core throughput (fp32 accumulate) and DRAM bandwidth."""

    name: str
    arch: int
    flops: float  # FLOP/s, 16-bit tensor cores
    bandwidth: float  # bytes/s
    alu: float  # op/s, fp32 CUDA cores (non-tensor)
    source: str


DEVICES: dict[str, Device] = {
    "h100-sxm": Device(
        "H100 SXM", 90, 989.4e12, 3.35e12, 66.9e12,
        "NVIDIA H100 datasheet, SXM5: bf16 dense 989.4 TFLOP/s, 3.35 TB/s, fp32 66.9 TFLOP/s",
    ),
    "h200": Device(
        "H200", 90, 989.4e12, 4.8e12, 66.9e12,
        "NVIDIA H200 datasheet, SXM: bf16 dense 989 TFLOP/s, 4.8 TB/s, fp32 67 TFLOP/s",
    ),
    "a100-sxm": Device(
        "A100 SXM", 80, 312e12, 2.039e12, 19.5e12,
        "NVIDIA A100 datasheet, 80 GB SXM: bf16 dense 312 TFLOP/s, 2039 GB/s, fp32 19.5 TFLOP/s",
    ),
    "rtx-4090": Device(
        "RTX 4090", 89, 165.2e12, 1.008e12, 82.6e12,
        "NVIDIA Ada whitepaper: bf16 with fp32 accumulate 165.2 TFLOP/s, 1008 GB/s, fp32 82.6 TFLOP/s",
    ),
    "rtx-3090": Device(
        "RTX 3090", 86, 71e12, 936e9, 35.6e12,
        "NVIDIA Ampere GA102 whitepaper: fp16/bf16 with fp32 accumulate 71 TFLOP/s, 936 GB/s, fp32 35.6",
    ),
}  # fmt: skip


def device_for(arch: int, name: str = "") -> Device:
    """The table's device for a compute capability (H200 when the name says so), nearest arch otherwise."""
    if arch == 90 and "H200" in name.upper():
        return DEVICES["h200"]
    by_arch = {90: "h100-sxm", 89: "rtx-4090", 86: "rtx-3090", 80: "a100-sxm"}
    known = min(by_arch, key=lambda a: (abs(a - arch), -a))
    return DEVICES[by_arch[known]]


@dataclass(frozen=True)
class Launch:
    name: str
    flops: float
    bytes: float
    alu: float = 0.0

    def seconds(self, device: Device) -> float:
        return max(self.flops / device.flops, self.bytes / device.bandwidth, self.alu / device.alu)


def total_seconds(launches: list[Launch], device: Device) -> float:
    return sum(launch.seconds(device) for launch in launches)


def _gemm(name: str, m: int, n: int, k: int, e: int, extra_bytes: float = 0.0) -> Launch:
    """C[m, n] = A[m, k] @ B[k, n]: 2mnk FLOP; A and B read once, C written once."""
    return Launch(name, 2.0 * m * n * k, e * (m * k + k * n + m * n) + extra_bytes)


def _pass(name: str, read: float, write: float, flops: float = 0.0) -> Launch:
    """An elementwise / reduction pass: bytes read + written."""
    return Launch(name, flops, read + write)


# ---------------------------------------------------------------- LoRA (frozen base, fwd + bwd)

LORA_PROVIDERS = ("base", "peft", "fused", "cublas")


LORA_STRATEGIES = ("fused", "cublas")


def dy_partial_bytes(M: int, N: int, R: int, programs: int = 264) -> float:
    """fp32 partials of the one-pass dy kernel (g over column groups, dB over row splits), written and
    read back once: (J * M + S * N) * R * 4 * 2 with J * S = programs and J * M ~ S * N."""
    groups = max(1.0, math.sqrt(programs * N / M))
    splits = max(1.0, programs / groups)
    return (groups * M + splits * N) * R * 4 * 2


# 3xTF32 (the fused kernels' fp32-accurate dot for fp32 adapters): three TF32 MMAs, each at half the 16-bit
# tensor-core rate on every device in the table, so one rank-r FLOP costs six 16-bit FLOPs of time
TF32X3_COST = 6.0


def lora_launches(
    provider: str,
    M: int,
    K: int,
    N: int,
    R: int,
    e: int = 2,
    weight_bytes: float | None = None,
    a: int | None = None,
) -> list[Launch]:
    """Forward + backward of a LoRA linear with a frozen base: dx, dA, dB (no dW), dropout 0.

    `weight_bytes`: what reading W once costs (e * N * K dense; the packed codes when the fused QLoRA
    kernel dequantises tiles in registers). `a`: the adapters' element size (default e; 4 for fp32
    adapters over a 16-bit base, PEFT's default): the rank-r products then run in fp32 as PEFT's do.
    """
    w = e * N * K if weight_bytes is None else weight_bytes
    a = e if a is None else a
    if provider == "peft" and a != e:
        return _peft_fp32_adapter_launches(M, K, N, R, e, a)
    rank = TF32X3_COST if a > e else 1.0  # fp32 adapters over a 16-bit base: 3xTF32 rank-r dots
    rank_proj = Launch("xa = x A^T", rank * 2.0 * M * K * R, e * M * K + a * (R * K + M * R))
    dy_pass = Launch(
        "g = dy B, dB = dy^T xa",
        rank * 4.0 * M * N * R,
        e * M * N + a * (N * R + 2 * M * R) + dy_partial_bytes(M, N, R),
    )
    grad_a = Launch("dA = g^T x", rank * 2.0 * M * K * R, a * M * R + e * M * K + 4 * R * K)
    if provider == "base":
        return [_gemm("y = x W^T", M, N, K, e), _gemm("dx = dy W", M, K, N, e)]
    if provider == "fused":
        y_bytes = e * (M * K + M * N) + a * (M * R + N * R) + w
        dx_bytes = e * (M * N + M * K) + a * (M * R + R * K) + w
        return [
            rank_proj,
            Launch("y = x W^T + s xa B^T", 2.0 * M * N * (K + rank * R), y_bytes),
            dy_pass,
            Launch("dx = dy W + s g A", 2.0 * M * K * (N + rank * R), dx_bytes),
            grad_a,
        ]
    if provider == "cublas":
        return [
            rank_proj,
            Launch("fill y = s xa B^T", rank * 2.0 * M * N * R, a * (M * R + N * R) + e * M * N),
            _gemm("y += x W^T (cuBLAS, beta 1)", M, N, K, e, extra_bytes=e * M * N),
            dy_pass,
            Launch("fill dx = s g A", rank * 2.0 * M * K * R, a * (M * R + R * K) + e * M * K),
            _gemm("dx += dy W (cuBLAS, beta 1)", M, K, N, e, extra_bytes=e * M * K),
            grad_a,
        ]
    if provider == "peft":
        mn, mk = e * M * N, e * M * K
        return [
            _gemm("base y = x W^T", M, N, K, e),
            _gemm("lora_A x", M, R, K, e),
            _gemm("lora_B xa", M, N, R, e),
            _pass("* scaling", mn, mn),
            _pass("y + lora", 2 * mn, mn),
            _pass("grad * scaling", mn, mn),
            _gemm("lora_B grad input dy B", M, R, N, e),
            _gemm("lora_B grad weight dy^T xa", N, R, M, e),
            _gemm("lora_A grad input g A", M, K, R, e),
            _gemm("lora_A grad weight g^T x", R, K, M, e),
            _gemm("base dx = dy W", M, K, N, e),
            _pass("dx accumulate", 2 * mk, mk),
        ]
    raise ValueError(f"provider: expected one of {LORA_PROVIDERS}, got {provider!r}")


def _fp32_gemm(name: str, m: int, n: int, k: int) -> Launch:
    """An fp32 GEMM as torch runs it by default (allow_tf32 off): IEEE fp32 on the CUDA cores."""
    return Launch(name, 0.0, 4.0 * (m * k + k * n + m * n), 2.0 * m * n * k)


def _peft_fp32_adapter_launches(M: int, K: int, N: int, R: int, e: int, a: int) -> list[Launch]:
    """PEFT's layer with fp32 adapters over an e-byte base: x cast to fp32, the adapter GEMMs in fp32,
    the base output promoted to fp32 for the sum and cast back; autograd retraces each cast."""
    mn, mk = M * N, M * K
    return [
        _gemm("base y = x W^T", M, N, K, e),
        _pass("x.to(fp32)", e * mk, a * mk),
        _fp32_gemm("lora_A x (fp32)", M, R, K),
        _fp32_gemm("lora_B xa (fp32)", M, N, R),
        _pass("* scaling (fp32)", a * mn, a * mn),
        _pass("y + lora (promoted to fp32)", (e + a) * mn, a * mn),
        _pass("result.to(bf16)", a * mn, e * mn),
        _pass("grad to fp32", e * mn, a * mn),
        _pass("grad * scaling (fp32)", a * mn, a * mn),
        _pass("grad of the base output to bf16", a * mn, e * mn),
        _fp32_gemm("lora_B grad input dy B (fp32)", M, R, N),
        _fp32_gemm("lora_B grad weight dy^T xa (fp32)", N, R, M),
        _fp32_gemm("lora_A grad input g A (fp32)", M, K, R),
        _fp32_gemm("lora_A grad weight g^T x (fp32)", R, K, M),
        _pass("grad of x.to(fp32) to bf16", a * mk, e * mk),
        _gemm("base dx = dy W", M, K, N, e),
        _pass("dx accumulate", 2 * e * mk, e * mk),
    ]


# ---------------------------------------------------------------- QLoRA (NF4 base, fwd + bwd)

QLORA_PROVIDERS = ("lora_bf16", "peft_bnb", "fused", "dequant", "cublas")


QLORA_STRATEGIES = ("fused", "dequant", "cublas")


# CUDA-core ops to dequantise one NF4 element in registers (nibble select, table gather, absmax multiply,
# two roundings), and the row tile of the fused QLoRA GEMM: every row tile dequantises all of W
DEQUANT_OPS_PER_ELEMENT = 8


FUSED_NF4_BLOCK_M = 128


# CUDA-core ops of the statistics epilogue per pre-activation and class (select, multiply, add, compare,
# max, count), plus the activation itself
STATS_OPS_PER_ELEMENT_PER_CLASS = 6


ACTIVATION_OPS_PER_ELEMENT = 4


def nf4_weight_bytes(N: int, K: int, blocksize: int = 64) -> float:
    """Packed codes (4 bits) plus double-quantised absmax (1 byte per block + fp32 per 256 blocks)."""
    blocks = N * K / blocksize
    return N * K / 2 + blocks + 4 * blocks / 256


def dequant_launch(N: int, K: int, e: int = 2) -> Launch:
    return _pass("dequantise W", nf4_weight_bytes(N, K), e * N * K)


def qlora_launches(
    provider: str, M: int, K: int, N: int, R: int, e: int = 2, a: int | None = None
) -> list[Launch]:
    """Forward + backward of a QLoRA linear (NF4 base, frozen): the forward and the dx GEMM each need W.
    `a`: the adapters' element size, as in `lora_launches`."""
    if provider == "lora_bf16":
        return lora_launches("fused", M, K, N, R, e, a=a)
    if provider == "fused":
        # W read as 4-bit codes inside the GEMM (once from DRAM per pass; re-reads stay in L2), and every
        # row-tile of the output dequantises all of W again in registers
        launches = lora_launches("fused", M, K, N, R, e, weight_bytes=nf4_weight_bytes(N, K), a=a)
        redo = DEQUANT_OPS_PER_ELEMENT * math.ceil(M / FUSED_NF4_BLOCK_M) * N * K
        return [Launch(x.name, x.flops, x.bytes, redo) if i in (1, 3) else x for i, x in enumerate(launches)]
    if provider == "dequant":
        # W dequantised into a buffer before each of the fused kernels' GEMMs (forward, dx)
        xa, y, dy_pass, dx, grad_a = lora_launches("fused", M, K, N, R, e, a=a)
        return [xa, dequant_launch(N, K, e), y, dy_pass, dequant_launch(N, K, e), dx, grad_a]
    if provider == "cublas":
        xa, fill_y, y, dy_pass, fill_dx, dx, grad_a = lora_launches("cublas", M, K, N, R, e, a=a)
        return [xa, fill_y, dequant_launch(N, K, e), y, dy_pass, fill_dx, dequant_launch(N, K, e), dx, grad_a]
    if provider == "peft_bnb":
        # bitsandbytes dequantises for the forward and again for dx, then cuBLAS; PEFT's adapter as dense
        peft = lora_launches("peft", M, K, N, R, e, a=a)
        return [dequant_launch(N, K, e), *peft[:-2], dequant_launch(N, K, e), *peft[-2:]]
    raise ValueError(f"provider: expected one of {QLORA_PROVIDERS}, got {provider!r}")


# ---------------------------------------------------------------- SAE feature statistics

SAE_PROVIDERS = ("gemm", "sae_lens", "fused", "chunked")


SAE_STRATEGIES = ("fused", "chunked")


# the default chunk: the [T_c, F] fp32 pre-activation buffer of the chunked strategy is at most this
DEFAULT_MAX_CHUNK_BYTES = 256 * 2**20


def chunk_tokens(F: int, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> int:
    """Tokens per chunk of the chunked strategy: the fp32 [T_c, F] buffer fits `max_chunk_bytes`."""
    return max(1, max_chunk_bytes // (4 * F))


def sae_stats_launches(
    provider: str, T: int, d: int, F: int, C: int = 2, e: int = 2, labelled: float = 2 / 3, topk: bool = False
) -> list[Launch]:
    """Encode + per-class statistics (sum, sum of squares, count, max/argmax) of T tokens.

    `labelled`: fraction of tokens in some class (the benchmark's labels are uniform over {-1, 0, 1}).
    SAELens' baseline is the benchmark's: sae.encode (JumpReLU: x - 0 * b_dec, GEMM, + b_enc, relu,
    compare, cast, multiply), activations to fp32, then per class a gather and five reductions.
    """
    stats_out = 4 * C * F * 5
    epilogue = (ACTIVATION_OPS_PER_ELEMENT + STATS_OPS_PER_ELEMENT_PER_CLASS * C) * T * F
    if provider == "gemm":
        return [_gemm("pre = x W_enc + b_enc", T, F, d, e)]
    if provider == "fused":
        passes = 2 if topk else 1
        return [
            Launch(f"encode + stats ({'TopK: 2 passes' if topk else 'one pass'})", passes * 2.0 * T * d * F,
                   passes * e * (T * d + d * F) + stats_out, epilogue)
        ]  # fmt: skip
    if provider == "chunked":
        t_c = max(1, min(T, chunk_tokens(F)))
        chunks = math.ceil(T / t_c)
        launches = []
        for _ in range(chunks):
            launches.append(
                Launch(
                    "pre chunk = x W_enc (fp32 out)", 2.0 * t_c * d * F, e * (t_c * d + d * F) + 4 * t_c * F
                )
            )
            if topk:
                launches.append(_pass("torch.topk of the chunk", 4 * t_c * F, 4 * t_c))
            launches.append(
                Launch("reduce chunk per class", 0.0, 4 * t_c * F + 12 * t_c + stats_out, epilogue * t_c / T)
            )
        return launches
    if provider == "sae_lens":
        tf = T * F
        tc = labelled * tf
        return [
            _pass("x - 0 * b_dec", e * T * d, e * T * d),
            _gemm("sae_in @ W_enc", T, F, d, e),
            _pass("+ b_enc", e * tf, e * tf),
            _pass("relu", e * tf, e * tf),
            _pass("pre > threshold", e * tf, tf),
            _pass("mask to dtype", tf, e * tf),
            _pass("relu * mask", 2 * e * tf, e * tf),
            _pass("acts.float()", e * tf, 4 * tf),
            _pass("gather class rows", 4 * tc, 4 * tc),
            _pass("w @ a", 4 * tc, 0),
            _pass("a * a", 4 * tc, 4 * tc),
            _pass("w @ a^2", 4 * tc, 0),
            _pass("a > 0", 4 * tc, tc),
            _pass("count", tc, 0),
            _pass("max / argmax", 4 * tc, 0),
        ]
    raise ValueError(f"provider: expected one of {SAE_PROVIDERS}, got {provider!r}")


def best_strategy(op: str, device: Device, **shape) -> str:
    """The strategy with the smallest predicted time (ties: the first listed, i.e. the fused kernel)."""
    launches, strategies = {
        "lora_linear": (lora_launches, LORA_STRATEGIES),
        "qlora_linear": (qlora_launches, QLORA_STRATEGIES),
        "sae_feature_stats": (sae_stats_launches, SAE_STRATEGIES),
    }[op]
    return min(strategies, key=lambda s: total_seconds(launches(s, **shape), device))
