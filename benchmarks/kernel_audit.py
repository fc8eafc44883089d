"""Static performance audit of every Triton kernel, for GPUs this machine does not have.

    python benchmarks/kernel_audit.py                        # every op, sm_90/89/86/80, bf16/fp16/fp32
    python benchmarks/kernel_audit.py --arch 90 --dtype bf16 --op sae_stats
    python benchmarks/kernel_audit.py --subset               # the default tier's quick check
    python benchmarks/kernel_audit.py --self-test            # the check must be able to fail

The launchers run on CPU tensors at the named real-model shapes (benchmarks/shapes.py) with every launch
intercepted, under a simulated target GPU (`_triton.simulate_target`), so they pick the grid, the fixed
tiles and, for an autotuned kernel, the configs the pruner keeps on that GPU. Each captured launch is
bound the way triton binds a real one (the backend's own specialisation: 16-byte-aligned pointers and
sizes / strides divisible by 16 are marked `tt.divisibility`, unit strides become constants), compiled
with triton's bundled ptxas to a cubin, and read back:

  registers, spill_bytes   ptxas -v (stores + loads); 0 spills is the goal for 16-bit variants
  shared_bytes             what the kernel asks for at launch, against the GPU's per-block limit
  pipelined                the main loop's loads are asynchronous (cp.async, or TMA) in the PTX
  wgmma                    sm_90 tensor-core dots are warpgroup MMAs (Hopper), not Ampere mma.sync
  occupancy                resident warps / the SM's maximum, from registers, shared memory, threads

Rows go to benchmarks/results/kernel_audit.csv (one per distinct compiled variant, with the shapes that
launch it); `--readme` regenerates the README's summary table. Compile results are cached by triton;
ptxas reports by PTX hash under ~/.cache/sails_fast/kernel_audit. Nothing here runs a kernel: numbers
about time need a GPU (benchmarks/bench_*.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import csv
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config_text, flags_text, operand_text  # noqa: E402
from make_tables import update_readme_table  # noqa: E402
from shapes import GOAL_RANK, GOAL_TOKENS_LORA, GOAL_TOKENS_SAE, MODELS  # noqa: E402

from sails_fast.fused.roofline import DEFAULT_MAX_CHUNK_BYTES

ROOT = Path(__file__).resolve().parent.parent
CSV_PATH = ROOT / "benchmarks" / "results" / "kernel_audit.csv"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sails_fast" / "kernel_audit"
ARCHS = (90, 89, 86, 80)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPS = ("lora", "nf4", "sae_stats")
COLUMNS = [
    "op", "kernel", "arch", "dtype", "operands", "flags", "shape", "config", "registers", "spill_bytes",
    "shared_bytes", "smem_limit", "pipelined", "wgmma", "occupancy", "num_warps", "num_stages", "main_loop",
    "status",
]  # fmt: skip

# kernels whose work is a loop of tensor-core dots over a reduction: their loads must be pipelined
MAIN_LOOP_KERNELS = {
    "_lora_fwd_kernel", "_lora_bwd_dx_kernel", "_rank_projection_kernel", "_dy_projection_kernel",
    "_weight_grad_kernel", "_qlora_fwd_kernel", "_qlora_bwd_dx_kernel", "_sae_stats_kernel",
    "_topk_candidates_kernel",
}  # fmt: skip
_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")


@dataclass
class Launch:
    """One captured launch: the kernel, its arguments, and the config that chose its blocks."""

    fn: JITFunction
    args: tuple
    kwargs: dict


@dataclass
class Variant:
    """A distinct compiled kernel: what is compiled, and for whom."""

    op: str
    kernel: str
    arch: int
    dtype: str
    config: str
    num_warps: int
    num_stages: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    fn: JITFunction
    shapes: set[str] = field(default_factory=set)


_captured: list[Launch] = []


def _capture_jit(self, *args, grid=None, warmup=False, **kwargs):
    _captured.append(Launch(self, args, kwargs))


def _capture_autotuned(self, *args, **kwargs):
    """Every config the pruner keeps for this launch on the simulated GPU becomes a launch of its own."""
    named = dict(zip(self.arg_names, args, strict=False))
    configs = self.configs
    if self.early_config_prune:
        configs = self.early_config_prune(self.configs, named, **kwargs)
    for config in configs:
        extra = {k: v for k, v in config.all_kwargs().items() if v is not None and k != "ir_override"}
        self.fn.run(*args, **kwargs, **extra)


@contextlib.contextmanager
def intercepted_launches():
    """Launches are recorded, not run; yields the list they are recorded into."""
    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = _capture_jit, _capture_autotuned
    _captured.clear()
    try:
        yield _captured
    finally:
        JITFunction.run, Autotuner.run = saved


# ------------------------------------------------------------------ what the launchers are asked to do


def _t(*shape, dtype=torch.bfloat16):
    # uninitialised: nothing runs, only pointers, shapes and strides matter
    return torch.empty(*shape, dtype=dtype)


# the default tier's subset: one projection, the two SAE activations with the most code
SUBSET_PROJECTIONS = ("q_proj",)
SUBSET_ACTIVATIONS = ("jumprelu", "topk")


def _projections(model: str, subset: bool):
    return [(p, kn) for p, kn in MODELS[model].projections().items() if not subset or p in SUBSET_PROJECTIONS]


def _adapter_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The adapter dtypes a base in `dtype` meets: its own, and fp32 (PEFT's default over a 16-bit base)."""
    return (dtype,) if dtype == torch.float32 else (dtype, torch.float32)


def lora_cases(dtype: torch.dtype, models: list[str], subset: bool = False):
    """(shape name, thunk) for every launcher of the dense LoRA op at each named projection, with
    adapters in the base's dtype and in fp32."""
    from sails_fast.kernels import lora as K
    from sails_fast.kernels import lora_rank as KR

    for model in models:
        for proj, (k, n) in _projections(model, subset):
            m, r = GOAL_TOKENS_LORA, GOAL_RANK

            def thunk(m=m, k=k, n=n, r=r):
                x, w, dy = _t(m, k, dtype=dtype), _t(n, k, dtype=dtype), _t(m, n, dtype=dtype)
                for adapter in _adapter_dtypes(dtype):
                    a, b = _t(r, k, dtype=adapter), _t(n, r, dtype=adapter)
                    xa, g = _t(m, r, dtype=adapter), _t(m, r, dtype=adapter)
                    for p in (0.0, 0.1):
                        KR.rank_projection(x, a, p, 1)
                        K.lora_backward_dx(dy, w, g, a, 2.0, p, 1)
                        KR.lora_weight_grad(g, x, 2.0, p, 1)
                        KR.low_rank_fill(g, a, 2.0, None, dtype, p, 1)
                    for bias in (None, _t(n, dtype=dtype)):
                        K.lora_forward(x, w, xa, b, 2.0, bias)
                        KR.low_rank_fill(xa, b.t(), 2.0, bias, dtype)
                    KR.dy_projections(dy, b, xa, 2.0)

            yield f"{model}/{proj}", thunk


def nf4_cases(dtype: torch.dtype, models: list[str], subset: bool = False):
    from sails_fast import NF4Weight
    from sails_fast.kernels import nf4 as NK

    for model in models:
        for proj, (k, n) in _projections(model, subset):
            m, r = GOAL_TOKENS_LORA, GOAL_RANK

            def thunk(m=m, k=k, n=n, r=r):
                blocks = n * k // 64
                nf4 = NF4Weight(
                    torch.empty((n * k + 1) // 2, dtype=torch.uint8), torch.empty(blocks, dtype=torch.uint8),
                    (n, k), dtype, 64, torch.empty(-(-blocks // 256)), torch.tensor(0.0),
                )  # fmt: skip
                x, dy = _t(m, k, dtype=dtype), _t(m, n, dtype=dtype)
                absmax = _t(blocks, dtype=torch.float32)
                NK.dequantize(nf4, dtype, round_dtype=dtype)
                NK.absmax_fp32(nf4)
                for adapter in _adapter_dtypes(dtype):
                    xa, g = _t(m, r, dtype=adapter), _t(m, r, dtype=adapter)
                    a, b = _t(r, k, dtype=adapter), _t(n, r, dtype=adapter)
                    NK.qlora_forward_fused(x, nf4, absmax, xa, b, 2.0, None)
                    for p in (0.0, 0.1):
                        NK.qlora_backward_dx_fused(dy, nf4, absmax, g, a, 2.0, p, 1)

            yield f"{model}/{proj}", thunk


def sae_stats_cases(dtype: torch.dtype, models: list[str], subset: bool = False):
    from sails_fast import FeatureStats, SAEWeights
    from sails_fast.kernels import sae_stats as KS
    from sails_fast.kernels import sae_stats_chunked as KC

    for model in models:
        d, F = MODELS[model].hidden, MODELS[model].sae_width
        for activation in SUBSET_ACTIVATIONS if subset else ("relu", "jumprelu", "topk"):
            extra = {"threshold": _t(F, dtype=dtype)} if activation == "jumprelu" else {}
            if activation == "topk":
                extra = {"k": 64}
            sae = SAEWeights(
                W_enc=_t(d, F, dtype=dtype), b_enc=_t(F, dtype=dtype), W_dec=_t(F, d, dtype=dtype),
                b_dec=_t(d, dtype=dtype), activation=activation,
                apply_b_dec_to_input=activation != "jumprelu", **extra,
            )  # fmt: skip

            def thunk(sae=sae, d=d, F=F):
                x = _t(GOAL_TOKENS_SAE, d, dtype=dtype)
                labels = torch.zeros(GOAL_TOKENS_SAE, dtype=torch.int64)
                weights = _t(GOAL_TOKENS_SAE, dtype=torch.float32)
                chunk = KC.chunk_tokens(F, DEFAULT_MAX_CHUNK_BYTES)
                # the chunked strategy's GEMM is torch's; its reduction kernel gets one chunk's fp32 [T_c, F]
                pre = _t(chunk, F, dtype=torch.float32)
                for deterministic in (False, True):
                    out = FeatureStats.empty(2, F)
                    KS.sae_stats_accumulate(x, sae, labels, weights, out, deterministic=deterministic)
                    accumulators = KS._Accumulators(FeatureStats.empty(2, F), deterministic)
                    KC.chunk_statistics(
                        pre, sae, labels[:chunk], weights[:chunk], accumulators, 0, deterministic
                    )

            yield f"{model}/sae-{activation}", thunk


CASES = {"lora": lora_cases, "nf4": nf4_cases, "sae_stats": sae_stats_cases}


# ------------------------------------------------------------------ binding and compiling like a launch


def bind(launch: Launch, arch: int):
    """(signature, constexprs, attrs, options) exactly as triton's launcher would build them."""
    backend = CUDABackend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.fn._pack_args(
        backend, launch.kwargs, bound, specialization, options
    )
    return signature, constexprs, attrs, options


def collect_variants(op: str, arch: int, dtype: str, models: list[str], subset: bool = False) -> dict:
    """Run the op's launchers on the simulated GPU and keep one Variant per distinct compile."""
    from sails_fast.kernels import _triton

    variants: dict[tuple, Variant] = {}
    with _triton.simulate_target(_triton.TARGETS[arch]), intercepted_launches() as launches:
        for shape_name, thunk in CASES[op](DTYPES[dtype], models, subset):
            launches.clear()
            thunk()
            for launch in launches:
                signature, constexprs, attrs, options = bind(launch, arch)
                kept_options = {k: v for k, v in options.__dict__.items() if k in _OPTION_KEYS}
                parts = (signature, sorted(constexprs.items()), sorted(attrs.items()), kept_options)
                key = (launch.fn.__name__, repr(parts))
                if key not in variants:
                    names = {launch.fn.params[p[0]].name: v for p, v in constexprs.items()}
                    config = config_text(names, options.num_warps, options.num_stages)
                    variants[key] = Variant(
                        op, launch.fn.__name__, arch, dtype, config,
                        options.num_warps, options.num_stages, signature, constexprs, attrs,
                        kept_options, launch.fn,
                    )  # fmt: skip
                variants[key].shapes.add(shape_name)
    return variants


def _ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers, spill bytes and static shared memory from `ptxas -v`, cached by PTX hash."""
    digest = hashlib.sha256(f"{arch}\n{ptx}".encode()).hexdigest()[:32]
    cached = CACHE_DIR / f"{digest}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run(
            [ptxas, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(src) + ".o"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    log = done.stderr + done.stdout
    number = lambda pattern: sum(int(v) for v in re.findall(pattern, log))
    report = {
        "registers": max((int(v) for v in re.findall(r"Used (\d+) registers", log)), default=0),
        "spill_bytes": number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
        "static_smem": number(r"(\d+) bytes smem"),
    }
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(report))
    return report


def occupancy(arch: int, registers: int, num_warps: int, shared_bytes: int) -> float:
    """Resident warps per SM over the SM's maximum (CUDA occupancy rules: registers are allocated per
    warp in units of 256, shared memory per block plus 1 KB reserved)."""
    from sails_fast.kernels._triton import TARGETS

    target = TARGETS[arch]
    max_warps = target.max_threads_per_sm // 32
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = (target.regs_per_sm // regs_per_warp) // num_warps
    by_smem = target.smem_per_sm // (shared_bytes + 1024) if shared_bytes else target.max_blocks_per_sm
    by_threads = max_warps // num_warps
    blocks = min(by_regs, by_smem, by_threads, target.max_blocks_per_sm)
    return blocks * num_warps / max_warps


def compact_shapes(shapes: set[str]) -> str:
    """'model/*' where every named shape of that model launches the variant, else the names."""
    by_model: dict[str, set[str]] = {}
    for shape in shapes:
        model, name = shape.split("/", 1)
        by_model.setdefault(model, set()).add(name)
    everything = set().union(*by_model.values())
    parts = []
    for model, names in sorted(by_model.items()):
        parts.append(f"{model}/*" if names == everything and len(by_model) > 1 else
                     ";".join(f"{model}/{n}" for n in sorted(names)))  # fmt: skip
    return ";".join(parts)


def compile_variant(variant: Variant) -> dict:
    """Compile one variant for its arch and read registers, spills, shared memory, pipelining, wgmma."""
    from sails_fast.kernels._triton import TARGETS

    row = {
        "op": variant.op, "kernel": variant.kernel, "arch": f"sm_{variant.arch}", "dtype": variant.dtype,
        "operands": operand_text(variant.signature), "flags": flags_text(variant.fn, variant.constexprs),
        "shape": compact_shapes(variant.shapes),
        "config": variant.config,
        "num_warps": variant.num_warps, "num_stages": variant.num_stages,
        "main_loop": variant.kernel in MAIN_LOOP_KERNELS,
        "smem_limit": TARGETS[variant.arch].smem_per_block,
    }  # fmt: skip
    try:
        src = ASTSource(variant.fn, variant.signature, variant.constexprs, variant.attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", variant.arch, 32), options=variant.options)
    except Exception as err:  # a compile failure is a row, not a crash
        return {**row, "status": f"compile error: {type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    ptx = kernel.asm["ptx"]
    report = _ptxas_report(ptx, variant.arch)
    shared = int(kernel.metadata.shared) + report["static_smem"]
    pipelined = "cp.async" in ptx
    wgmma = "wgmma.mma_async" in ptx
    status = "ok"
    if shared > TARGETS[variant.arch].smem_per_block:
        status = "shared memory over the limit"
    return {
        **row,
        "registers": report["registers"],
        "spill_bytes": report["spill_bytes"],
        "shared_bytes": shared,
        "pipelined": pipelined,
        "wgmma": wgmma,
        "occupancy": round(occupancy(variant.arch, report["registers"], variant.num_warps, shared), 3),
        "status": status,
    }


def problems(row: dict) -> list[str]:
    """What the default tier refuses in a kept config (16-bit variants; fp32 IEEE dots are not the
    performance path and are only recorded)."""
    found = []
    if not str(row["status"]).startswith("ok"):
        found.append(row["status"])
    if row["status"] == "ok" and row["dtype"] in ("bf16", "fp16"):
        if int(row["spill_bytes"]) > 0:
            found.append(f"spills {row['spill_bytes']} bytes")
        if row["main_loop"] in (True, "True") and row["pipelined"] in (False, "False"):
            found.append("main loop not pipelined (no cp.async)")
        if row["main_loop"] in (True, "True") and row["arch"] == "sm_90" and row["wgmma"] in (False, "False"):
            found.append("sm_90 dots are not wgmma")
    return found


def audit(ops, archs, dtypes, models, jobs: int, subset: bool = False) -> list[dict]:
    variants: list[Variant] = []
    for op in ops:
        for arch in archs:
            for dtype in dtypes:
                variants += collect_variants(op, arch, dtype, models, subset).values()
    print(f"{len(variants)} distinct kernel variants to compile", flush=True)
    start = time.perf_counter()
    rows: list[dict] = []
    if jobs > 1:
        # forked workers inherit the captured variants (kernels are module-level JIT functions)
        global _VARIANTS
        _VARIANTS = variants
        ctx = __import__("multiprocessing").get_context("fork")
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            for row in pool.map(_compile_index, range(len(variants))):
                rows.append(row)
                _progress(row, len(rows), len(variants), start)
    else:
        for i, variant in enumerate(variants):
            rows.append(compile_variant(variant))
            _progress(rows[-1], i + 1, len(variants), start)
    return rows


_VARIANTS: list[Variant] = []


def _compile_index(i: int) -> dict:
    return compile_variant(_VARIANTS[i])


def _progress(row: dict, done: int, total: int, start: float) -> None:
    bad = problems(row)
    flag = "  <-- " + "; ".join(bad) if bad else ""
    print(
        f"[{done}/{total} {time.perf_counter() - start:5.0f}s] {row['arch']} {row['dtype']} {row['kernel']} "
        f"{row['config']}: regs {row.get('registers')} spill {row.get('spill_bytes')} "
        f"smem {row.get('shared_bytes')} pipelined {row.get('pipelined')} wgmma {row.get('wgmma')}{flag}",
        flush=True,
    )


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    order = lambda r: (r["op"], r["kernel"], r["arch"], r["dtype"], r["operands"], r["flags"], r["config"])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in sorted(rows, key=order):
            writer.writerow(row)


def summary_table(rows: list[dict]) -> str:
    """One line per op x arch: the worst of each column over its kept 16-bit variants."""
    lines = [
        "| op | arch | 16-bit variants | max registers | spills | max shared / limit (KB) "
        "| pipelined main loops | wgmma (sm_90) | min occupancy | problems |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["dtype"] in ("bf16", "fp16"):
            groups.setdefault((row["op"], row["arch"]), []).append(row)
    for (op, arch), group in sorted(groups.items()):
        ok = [r for r in group if r["status"] == "ok"]
        loops = [r for r in ok if str(r["main_loop"]) == "True"]
        piped = sum(str(r["pipelined"]) == "True" for r in loops)
        wg = sum(str(r["wgmma"]) == "True" for r in loops)
        n_bad = sum(bool(problems(r)) for r in group)
        lines.append(
            f"| {op} | {arch} | {len(group)} | {max(int(r['registers']) for r in ok) if ok else '-'} "
            f"| {sum(int(r['spill_bytes']) for r in ok)} B "
            f"| {max(int(r['shared_bytes']) for r in ok) // 1024 if ok else '-'} "
            f"/ {int(group[0]['smem_limit']) // 1024} "
            f"| {piped}/{len(loops)} | {f'{wg}/{len(loops)}' if arch == 'sm_90' else 'n/a'} "
            f"| {min(float(r['occupancy']) for r in ok):.2f} | {n_bad} |"
        )
    return "\n".join(lines)


@triton.jit
def _invalid_on_gpu_kernel(a_ptr, b_ptr, c_ptr):
    # tl.dot with an inner dimension of 8: the interpreter accepts it, a GPU compile must not
    o = triton.language.arange(0, 8)
    a = triton.language.load(a_ptr + o[:, None] * 8 + o[None, :])
    b = triton.language.load(b_ptr + o[:, None] * 8 + o[None, :])
    triton.language.store(c_ptr + o[:, None] * 8 + o[None, :], triton.language.dot(a, b))


def self_test(archs) -> int:
    """The audit must be able to fail: a kernel only the interpreter accepts, and a tile that overflows."""
    sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32"}
    for arch in archs:
        try:
            triton.compile(ASTSource(_invalid_on_gpu_kernel, sig), target=GPUTarget("cuda", arch, 32))
        except Exception as err:
            print(f"sm_{arch}: tl.dot with K=8 refused as expected ({type(err).__name__})")
        else:
            print(f"sm_{arch}: a tl.dot with K=8 compiled: the audit cannot catch GPU-only errors")
            return 1
    overflow = {"status": "shared memory over the limit", "dtype": "bf16"}
    spilled = {"status": "ok", "dtype": "bf16", "spill_bytes": 8, "main_loop": False, "arch": "sm_90"}
    if not problems(overflow) or not problems(spilled):
        print("problems() accepts an overflowing or spilling row")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="*", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--dtype", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--op", nargs="*", default=list(OPS), choices=OPS)
    parser.add_argument("--model", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--out", type=Path, default=None, help=f"CSV to write (default {CSV_PATH} for a full run)"
    )
    parser.add_argument("--subset", action="store_true", help="the default tier's audit (see SUBSET_*)")
    parser.add_argument(
        "--readme", action="store_true", help=f"only regenerate the README summary from {CSV_PATH.name}"
    )
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args(argv)
    if args.self_test:
        return self_test(args.arch)
    if args.readme:
        with open(CSV_PATH) as f:
            update_readme_table("kernel_audit", summary_table(list(csv.DictReader(f))))
        print(f"README.md summary regenerated from {CSV_PATH}")
        return 0
    if args.subset:
        args.arch, args.dtype, args.model = [90, 86], ["bf16"], ["gemma-2-9b"]
    rows = audit(args.op, args.arch, args.dtype, args.model, args.jobs, args.subset)
    chosen = zip((args.arch, args.dtype, args.op, args.model), (ARCHS, DTYPES, OPS, MODELS), strict=True)
    full = not args.subset and all(set(picked) == set(every) for picked, every in chosen)
    out = args.out or (CSV_PATH if full else None)
    if out:
        write_csv(rows, out)
        print(f"wrote {len(rows)} rows to {out}")
    print(summary_table(rows))
    bad = [(r, p) for r in rows for p in problems(r)]
    for row, problem in bad:
        print(f"PROBLEM {row['arch']} {row['dtype']} {row['kernel']} {row['config']}: {problem}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
