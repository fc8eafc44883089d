"""Shared benchmark plumbing: timing, the correctness gate, environment capture, CSV rows.

Every benchmark checks a provider's output against the fp32 reference before timing it, and refuses to
time (and so to report a speed-up for) a provider that fails. CPU rows are labelled with the CPU's name
and never compared with GPU rows.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# where rows go: the committed results, or (benchmarks/gpu_check.py on a lent GPU) a folder of that run
RESULTS_DIR = Path(os.environ.get("SAILS_FAST_RESULTS_DIR") or Path(__file__).resolve().parent / "results")

# the same rule as tests/helpers.py: twice the low-precision reference's own error, plus a floor
ATOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def environment(device: torch.device | str) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
    }


def time_fn(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, reps: int = 10) -> Timing:
    """Median / p20 / p80 in ms. CUDA: triton.testing.do_bench; CPU: wall clock around each call."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=10) if len(samples) >= 2 else samples * 9
    return Timing(statistics.median(samples), q[1], q[7])


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak CUDA memory above what was allocated before the call; None on CPU (not tracked by torch)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def check_close(
    name: str, out: torch.Tensor, ref32: torch.Tensor, ref_lowp: torch.Tensor, dtype: torch.dtype
) -> float:
    """Raise if `out` breaks the 2x-reference-error rule; return its max abs error against fp32."""
    out32, r32 = out.detach().float().cpu(), ref32.detach().float().cpu()
    err = (out32 - r32).abs().max().item()
    ref_err = (ref_lowp.detach().float().cpu() - r32).abs().max().item()
    bound = 2 * ref_err + ATOL[dtype] * max(1.0, r32.abs().max().item())
    if not err <= bound:  # also catches NaN
        raise AssertionError(f"{name}: max abs error {err:.3e} exceeds {bound:.3e}; not timing it")
    return err


@dataclass
class Row:
    op: str
    model: str
    shape: str
    dims: str
    dtype: str
    provider: str
    mode: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    tflops: float | None = None
    gbps: float | None = None
    peak_mem_mb: float | None = None
    max_abs_err: float | None = None
    note: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def flat(self) -> dict[str, object]:
        d = asdict(self)
        env = d.pop("env")
        return {**env, **{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in d.items()}}


def append_rows(csv_name: str, rows: list[Row]) -> Path:
    """Append rows to benchmarks/results/<csv_name>, writing the header for a new file."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / csv_name
    flat = [r.flat() for r in rows]
    if not flat:
        return path
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        if new:
            writer.writeheader()
        writer.writerows(flat)
    return path


def print_rows(rows: list[Row]) -> None:
    if not rows:
        return
    env = rows[0].env
    print(f"device: {env.get('device')}  torch {env.get('torch')}  triton {env.get('triton')}")
    width = max(9, *(len(r.dtype) for r in rows))
    header = f"{'model':14} {'shape':10} {'dtype':{width}} {'mode':8} {'provider':11} {'median ms':>10}"
    header += f" {'p20':>8} {'p80':>8}"
    print(header + f" {'TFLOP/s':>8} {'max err':>9}")
    for r in rows:
        tf = "" if r.tflops is None else f"{r.tflops:.2f}"
        err = "" if r.max_abs_err is None else f"{r.max_abs_err:.1e}"
        print(
            f"{r.model:14} {r.shape:10} {r.dtype:{width}} {r.mode:8} {r.provider:11} {r.median_ms:10.3f} "
            f"{r.p20_ms:8.3f} {r.p80_ms:8.3f} {tf:>8} {err:>9}"
        )


def set_cpu_threads() -> None:
    # a benchmark on a shared CPU uses the cores it was given, and says how many in its device name
    threads = int(os.environ.get("SAILS_FAST_BENCH_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)


def fastest_strategies(rows: list[Row], prefix: str, mode: str = "fwd+bwd") -> dict[tuple, str]:
    """{(model, shape, dims, dtype): strategy} for the providers named "<prefix><strategy>", the fastest
    median of one run per case."""
    best: dict[tuple, tuple[float, str]] = {}
    for r in rows:
        if r.mode != mode or not r.provider.startswith(prefix):
            continue
        case = (r.model, r.shape, r.dims, r.dtype)
        strategy = r.provider.removeprefix(prefix)
        if case not in best or r.median_ms < best[case][0]:
            best[case] = (r.median_ms, strategy)
    return {case: strategy for case, (_, strategy) in best.items()}


def write_strategy_table(op: str, choices: dict[str, str], device: str) -> None:
    """Record measured choices {shape bucket: strategy} for this GPU in sails_fast/fused/strategy_table.json,
    the table "auto" reads before the roofline model. CUDA runs only: a CPU timing says nothing about it."""
    from sails_fast.fused import strategy

    device = torch.device(device)
    if device.type != "cuda":
        raise SystemExit("--write-strategy-table: the table holds GPU measurements; this run is on CPU")
    arch, _ = strategy.device_arch_and_name(device)
    entries = {strategy.table_key(arch, op, key): choice for key, choice in choices.items()}
    path = strategy.record(entries)
    for key, choice in sorted(entries.items()):
        print(f"strategy table: {key} -> {choice}")
    print(f"wrote {len(entries)} entries to {path}")


def operand_text(signature: dict[str, str]) -> str:
    """The element types of a compiled kernel's pointer arguments, in order ("bf16 bf16 fp32 fp32 bf16"):
    what tells a launch with fp32 adapters from one with 16-bit adapters at the same config."""
    return " ".join(t[1:] for t in signature.values() if isinstance(t, str) and t.startswith("*"))


def _is_block(name: str) -> bool:
    return name.startswith("BLOCK_") or name == "GROUP_M"


def flags_text(fn, constexprs: dict[tuple, object]) -> str:
    """A compiled kernel's declared constexpr flags, "HAS_BIAS=False HAS_DROPOUT=True" (`constexprs` keyed
    by argument path, as triton binds them); arguments triton merely specialised (a stride or a seed
    equal to 1) are left out, so a launch finds the audit's row whatever its seed. With config_text and
    operand_text: what names one compiled variant, up to divisibility specialisation."""
    named = {fn.params[path[0]]: v for path, v in constexprs.items()}
    return " ".join(
        f"{p.name}={v}" for p, v in sorted(named.items(), key=lambda i: i[0].name)
        if p.is_constexpr and not _is_block(p.name)
    )  # fmt: skip


def config_text(constexprs: dict[str, object], num_warps: int, num_stages: int) -> str:
    """How benchmarks/kernel_audit.py and gpu_check.py name a compiled kernel's config: its block
    constexprs, warps and stages ("K=64 M=128 N=256 R=16 GROUP_M=8 w8 s3")."""
    blocks = {k: v for k, v in constexprs.items() if _is_block(k)}
    text = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in sorted(blocks.items()))
    return f"{text} w{num_warps} s{num_stages}"
