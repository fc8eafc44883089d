"""One prepared command for a lent GPU machine: check the kernels there, then measure the goals.

    python3 benchmarks/gpu_check.py --out DIR [--budget SECONDS] [--wheels .whl]   # on the GPU machine
    python benchmarks/gpu_check.py --out DIR --dry-run                            # rehearsal on CPU

Made for the bare device machine (Python 3.12, torch 2.11, triton 3.6, no network): sails_fast and
sails_fast.kernels import from this working tree through a shim on PYTHONPATH (no install), and what the
machine lacks (bitsandbytes; sae-lens where it fits the 64 MiB carry) arrives as wheels in `--wheels`,
installed with `pip install --no-index --no-deps --target`. Parts run in order, each in its own process
with its own share of the budget, and write to DIR as they go, so a crash or a timeout in one part loses
nothing before it:

  env      versions, nvidia-smi                                        env.json, nvidia-smi.txt
  smoke    LoRA bf16 fwd + bwd (both strategies, with and without dropout: every gradient, the
           regenerated mask), NF4 dequantisation exactness and every QLoRA strategy, bf16 JumpReLU /
           TopK SAE statistics (both strategies; max and argmax exact on exact-grid data),
           deterministic mode twice, bitwise                            smoke.json
  tier     the gpu test tier, pytest -x                                 gpu_tier.xml, gpu_tier.txt
  bench    the goal benchmarks at the goal shapes (Gemma-2-9B q_proj, 8192 tokens; the Gemma-2-9B SAE,
           65536 tokens) for every provider and strategy (PEFT, PEFT + bitsandbytes and SAELens when
           importable, a stand-in otherwise), LoRA again with fp32 adapters (PEFT's default); rows
           appended after each case; the faster strategy per shape into the strategy table; the
           autotune picks                                              results/*.csv, strategy_table.json,
                                                                        autotune.json
  Every part that ran kernels also writes what triton compiled there (registers, spills, shared
  memory) beside the static audit's prediction for the same variant: compiled_<part>.csv.

`summary.json` says how each part ended. `--pack FILE.tar.gz` re-packs DIR into one archive after every
part (the device tool brings back at most 8 files), so even a run killed at its limit returns what
finished. `--dry-run` runs the same sequence on the CPU under the Triton
interpreter at tiny shapes (the default test tier does, tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
# each part's share of the budget (seconds at the default 480-second budget)
PARTS = {"env": 20, "smoke": 100, "tier": 150, "bench": 210}
FLOAT_POINTERS = ("*bf16", "*fp16", "*fp32")
DEFAULT_BUDGET = 480


# ------------------------------------------------------------------ the parent: shim, wheels, parts


def make_import_shim(root: Path, into: Path) -> Path:
    """A folder where `import sails_fast` finds this tree's sails_fast/ with kernels/ as its `kernels`
    subpackage (what the install's package_dir does), without installing anything."""
    package = into / "sails_fast"
    package.mkdir(parents=True, exist_ok=True)
    for entry in (root / "sails_fast").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "kernels").symlink_to(root / "kernels")
    return into


def install_wheels(wheels: Path, target: Path, log: Path) -> str:
    """Offline install of the carried wheels; the outcome as one line."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return f"no wheels in {wheels}"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, found)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    return (
        f"installed {len(found)} wheels"
        if done.returncode == 0
        else f"pip failed ({done.returncode}), see {log.name}"
    )


def run_parts(args) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sails_gpu_check_"))
    shim = make_import_shim(ROOT, work / "shim")
    site = work / "site"
    summary = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dry_run": args.dry_run}
    summary["wheels"] = install_wheels(args.wheels, site, out / "pip.txt") if not args.dry_run else "dry run"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(site), str(BENCH), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env["SAILS_FAST_RESULTS_DIR"] = str(out / "results")
    env.pop("TRITON_INTERPRET", None)
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    scale = args.budget / DEFAULT_BUDGET
    start = time.monotonic()
    failures = 0
    for part, share in PARTS.items():
        left = args.budget - (time.monotonic() - start)
        limit = max(5.0, min(share * scale, left))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--out", str(out)]
        if args.dry_run:
            cmd.append("--dry-run")
        t0 = time.monotonic()
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
            text = done.stdout + done.stderr
        except subprocess.TimeoutExpired as err:
            status = f"timed out after {limit:.0f} s"
            text = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        (out / f"{part}.log").write_text(text)
        failures += status != "ok"
        summary[part] = {"status": status, "seconds": round(time.monotonic() - t0, 1)}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"{part:6} {status} in {summary[part]['seconds']} s", flush=True)
        if args.pack:
            pack(out, args.pack)
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


def pack(folder: Path, archive: Path) -> None:
    """Write folder as a .tar.gz, atomically (a run killed mid-write keeps the previous archive)."""
    import tarfile

    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    tmp.replace(archive)


# ------------------------------------------------------------------ the parts (run in a child process)


def part_env(out: Path, dry_run: bool) -> None:
    import torch
    import triton

    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__}
    for name in ("transformers", "peft", "bitsandbytes", "sae_lens", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except Exception as err:  # a missing or broken package is a fact to record
            info[name] = f"not importable: {type(err).__name__}"
    info["cuda"] = torch.cuda.is_available()
    if info["cuda"]:
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        props = torch.cuda.get_device_properties(0)
        info["sm_count"], info["memory_gb"] = (
            props.multi_processor_count,
            round(props.total_memory / 2**30, 1),
        )
    import sails_fast

    info["sails_fast"] = str(Path(sails_fast.__file__).parent)
    (out / "env.json").write_text(json.dumps(info, indent=2))
    smi = shutil.which("nvidia-smi")
    text = subprocess.run([smi], capture_output=True, text=True).stdout if smi else "nvidia-smi: not found"
    (out / "nvidia-smi.txt").write_text(text)
    print(json.dumps(info, indent=2))


class Checks:
    """Named pass / fail records, written after every check."""

    def __init__(self, path: Path):
        self.path, self.records = path, []

    def run(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            detail = fn() or ""
            self.records.append({"check": name, "ok": True, "detail": detail})
        except Exception as err:  # every check runs and reports, whatever the one before did
            self.records.append({"check": name, "ok": False, "detail": f"{type(err).__name__}: {err}"[:2000]})
        self.records[-1]["seconds"] = round(time.perf_counter() - t0, 2)
        print(("ok   " if self.records[-1]["ok"] else "FAIL ") + name, self.records[-1]["detail"], flush=True)
        self.path.write_text(json.dumps(self.records, indent=2))

    @property
    def failed(self) -> int:
        return sum(not r["ok"] for r in self.records)


def _grid(shape, step: float, lo: float, hi: float, gen):
    """Random multiples of `step` in [lo, hi]: sums of products stay exact in fp32 in any order."""
    import torch

    n = round((hi - lo) / step)
    return torch.randint(0, n + 1, shape, generator=gen).float() * step + lo


def part_smoke(out: Path, dry_run: bool) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import assert_close

    from sails_fast import (
        SAEWeights,
        dequantize_nf4,
        lora_linear,
        qlora_linear,
        quantize_nf4,
        sae_feature_stats,
    )  # fmt: skip
    from sails_fast.kernels.lora import lora_dropout_mask
    from sails_fast.kernels.lora_ref import lora_linear_ref
    from sails_fast.kernels.nf4_ref import qlora_linear_ref

    device = "cpu" if dry_run else "cuda"
    bf16 = torch.bfloat16
    checks = Checks(out / "smoke.json")
    m, k, n, r = (37, 96, 80, 8) if dry_run else (1000, 2304, 2048, 16)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k**0.5
    a, b = torch.randn(r, k, generator=g) / k**0.5, torch.randn(n, r, generator=g) / r**0.5
    bias, dy = torch.randn(n, generator=g), torch.randn(m, n, generator=g)

    def lora_case(strategy: str, p: float):
        def run(fn, run_dtype, dev, **kw):
            xs, as_, bs = (t.to(dev, run_dtype).requires_grad_() for t in (x, a, b))
            y = fn(xs, w.to(dev, run_dtype), as_, bs, 2.0, bias.to(dev, run_dtype), p, **kw)
            return (y, *torch.autograd.grad(y, (xs, as_, bs), dy.to(dev, run_dtype)))

        mask = lora_dropout_mask((m, k), p, 7, torch.device(device)) if p else None
        ours = run(lora_linear, bf16, device, backend="triton", seed=7, strategy=strategy)
        ref32 = run(lora_linear_ref, torch.float32, device, dropout_mask=mask)
        ref_lo = run(lora_linear_ref, bf16, device, dropout_mask=mask)
        for name, o, r32, rlo in zip(("y", "dx", "dA", "dB"), ours, ref32, ref_lo, strict=True):
            assert_close(name, o, r32, rlo, bf16)

    for strategy in ("fused", "cublas"):
        for p in (0.0, 0.1):
            checks.run(
                f"lora bf16 {strategy} dropout={p}: y, dx, dA, dB", lambda s=strategy, p=p: lora_case(s, p)
            )

    nf4 = quantize_nf4(w.to(bf16), 64, True).to(device)

    def dequant_exact():
        for dtype in (torch.float32, bf16):
            got = dequantize_nf4(nf4, dtype, backend="triton")
            want = dequantize_nf4(nf4, dtype, backend="torch")
            assert torch.equal(got, want), f"{dtype}: {int((got != want).sum())} elements differ"

    checks.run("nf4 dequantisation exact (fp32, bf16)", dequant_exact)

    def qlora_case(strategy: str):
        def run(fn, run_dtype, **kw):
            xs, as_, bs = (t.to(device, run_dtype).requires_grad_() for t in (x, a, b))
            y = fn(xs, nf4, as_, bs, 2.0, bias.to(device, run_dtype), **kw)
            return (y, *torch.autograd.grad(y, (xs, as_, bs), dy.to(device, run_dtype)))

        ours = run(qlora_linear, bf16, backend="triton", strategy=strategy)
        ref32, ref_lo = run(qlora_linear_ref, torch.float32), run(qlora_linear_ref, bf16)
        for name, o, r32, rlo in zip(("y", "dx", "dA", "dB"), ours, ref32, ref_lo, strict=True):
            assert_close(name, o, r32, rlo, bf16)

    for strategy in ("fused", "dequant", "cublas"):
        checks.run(f"qlora bf16 {strategy}: y, dx, dA, dB", lambda s=strategy: qlora_case(s))

    d, F, T = (64, 600, 150) if dry_run else (2304, 16384, 4000)
    gs = torch.Generator().manual_seed(1)
    xs = _grid((T, d), 2**-6, -2.0, 2.0, gs).to(device, bf16)
    labels = torch.randint(-1, 2, (T,), generator=gs).to(device)
    weights = (torch.rand(T, generator=gs) + 0.05).to(device)

    def make_sae(activation: str) -> SAEWeights:
        extra = {"threshold": _grid((F,), 2**-8, 0.0, 0.25, gs)} if activation == "jumprelu" else {"k": 32}
        return SAEWeights(
            W_enc=_grid((d, F), 2**-10, -0.25, 0.25, gs), b_enc=_grid((F,), 2**-16, -0.5, 0.5, gs),
            W_dec=torch.randn(F, d, generator=gs), b_dec=_grid((d,), 2**-6, -0.5, 0.5, gs),
            activation=activation, apply_b_dec_to_input=activation == "topk", **extra,
        ).to(device=device, dtype=bf16)  # fmt: skip

    def sae_case(activation: str, strategy: str):
        sae = make_sae(activation)
        ours = sae_feature_stats(xs, sae, labels, token_weights=weights, backend="triton", strategy=strategy)
        ref = sae_feature_stats(xs, sae, labels, token_weights=weights, backend="torch")
        for name in ("token_count", "active_count", "act_max", "act_argmax"):
            got, want = getattr(ours, name), getattr(ref, name)
            assert torch.equal(got, want), f"{name}: {int((got != want).sum())} differ"
        for name in ("weight_sum", "act_sum", "act_sq_sum"):
            got, want = getattr(ours, name).double(), getattr(ref, name).double()
            rel = ((got - want).abs() / want.abs().clamp_min(1e-30)).max().item()
            assert rel < 1e-5, f"{name}: relative error {rel:.2e}"
        return f"{int(ref.active_count.sum())} activations"

    def deterministic_twice(strategy: str):
        sae = make_sae("jumprelu")
        runs = [
            sae_feature_stats(xs, sae, labels, token_weights=weights, backend="triton", deterministic=True,
                              strategy=strategy)
            for _ in range(2)
        ]  # fmt: skip
        for name, t in runs[0].tensors().items():
            assert torch.equal(t, runs[1].tensors()[name]), name

    for activation in ("jumprelu", "topk"):
        for strategy in ("fused", "chunked"):
            checks.run(f"sae stats bf16 {activation} {strategy}: exact counts, max, argmax",
                       lambda act=activation, s=strategy: sae_case(act, s))  # fmt: skip
    for strategy in ("fused", "chunked"):
        checks.run(
            f"sae stats deterministic {strategy}: two runs bitwise equal",
            lambda s=strategy: deterministic_twice(s),
        )
    write_compiled_kernels(out / "compiled_smoke.csv")
    if checks.failed:
        raise SystemExit(f"{checks.failed} smoke checks failed")


def part_tier(out: Path, dry_run: bool) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "gpu", "-p", "no:cacheprovider",
           f"--junitxml={out / 'gpu_tier.xml'}", str(ROOT / "tests")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (out / "gpu_tier.txt").write_text(done.stdout + done.stderr)
    print(done.stdout[-3000:])
    if done.returncode not in (0, 5):  # 5: nothing collected (no GPU in a dry run)
        raise SystemExit(f"gpu tier failed (pytest exit {done.returncode})")


# what fp32 adapters over the bf16 base (PEFT's default) cost each side, beside the roofline's prediction
FP32_ADAPTERS = ["--adapter-dtype", "float32", "--dtype", "bfloat16", "--providers", "base", "peft",
                 "sails_fast:fused", "sails_fast:cublas"]  # fmt: skip


def part_bench(out: Path, dry_run: bool) -> None:
    import bench_lora
    import bench_nf4
    import bench_sae_stats

    if dry_run:
        common = ["--quick", "--no-save"]
        bench_lora.main([*common, "--tokens", "64", "--projs", "q_proj"])
        bench_lora.main([*common, "--tokens", "64", "--projs", "q_proj", *FP32_ADAPTERS])
        bench_nf4.main([*common, "--tokens", "64", "--projs", "q_proj"])
        bench_sae_stats.main([*common, "--tokens", "256"])
    else:
        table = ["--write-strategy-table"]
        bench_lora.main(["--models", "gemma-2-9b", "--projs", "q_proj", *table])
        bench_lora.main(["--models", "gemma-2-9b", "--projs", "q_proj", *FP32_ADAPTERS])
        bench_nf4.main(["--models", "gemma-2-9b", "--projs", "q_proj", *table])
        bench_sae_stats.main(["--models", "gemma-2-9b", *table])
        from sails_fast.fused import strategy

        shutil.copy(strategy.TABLE_PATH, out / "strategy_table.json")
    write_autotune_picks(out / "autotune.json")
    write_compiled_kernels(out / "compiled_bench.csv")


# ------------------------------------------------------------------ what triton compiled, vs the audit


def _kernel_objects():
    """(name, JITFunction, autotuner or None) of every Triton kernel in sails_fast.kernels."""
    import importlib

    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    for module in ("lora", "lora_rank", "nf4", "sae_stats"):
        mod = importlib.import_module(f"sails_fast.kernels.{module}")
        for name, obj in vars(mod).items():
            tuner = obj if isinstance(obj, Autotuner) else None
            fn = obj
            while isinstance(fn, (Autotuner, Heuristics)):
                fn = fn.fn
            if isinstance(fn, JITFunction) and name.startswith("_") and name.endswith("_kernel"):
                yield name, fn, tuner


def write_autotune_picks(path: Path) -> None:
    picks = {}
    for name, _, tuner in _kernel_objects():
        if tuner is not None and getattr(tuner, "cache", None):
            picks[name] = {str(key): str(config) for key, config in tuner.cache.items()}
    path.write_text(json.dumps(picks, indent=2))


def read_audit() -> dict[tuple, dict]:
    """The static audit's rows by (kernel, arch, pointer operand types, constexpr flags, config)."""
    path = BENCH / "results" / "kernel_audit.csv"
    if not path.exists():
        return {}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    # variants that differ only in divisibility specialisation share a key: the worst case predicts
    worst: dict[tuple, dict] = {}
    for r in sorted(rows, key=lambda r: (int(r["registers"] or 0), int(r["spill_bytes"] or 0))):
        worst[(r["kernel"], r["arch"], r.get("operands", ""), r.get("flags", ""), r["config"])] = r
    return worst


def compiled_kernel_row(name: str, fn, kernel, audit: dict) -> dict:
    """One compiled kernel's registers, spills and shared memory beside the audit's prediction."""
    from _common import config_text, flags_text, operand_text

    meta = kernel.metadata
    consts = {fn.arg_names[path[0]]: v for path, v in kernel.src.constants.items()}
    config = config_text(consts, meta.num_warps, meta.num_stages)
    arch = f"sm_{meta.target.arch}"
    dtype = next((t[1:] for t in kernel.src.signature.values() if t in FLOAT_POINTERS), "")
    operands, flags = operand_text(kernel.src.signature), flags_text(fn, kernel.src.constants)
    predicted = audit.get((name, arch, operands, flags, config), {})
    return {
        "kernel": name, "arch": arch, "dtype": dtype, "operands": operands, "flags": flags, "config": config,
        # n_regs / n_spills exist once the kernel was loaded on a device
        "registers": getattr(kernel, "n_regs", ""), "spills": getattr(kernel, "n_spills", ""),
        "shared_bytes": meta.shared,
        "audit_registers": predicted.get("registers", "not in the audit"),
        "audit_spill_bytes": predicted.get("spill_bytes", ""),
        "audit_shared_bytes": predicted.get("shared_bytes", ""),
    }  # fmt: skip


COMPILED_FIELDS = ["kernel", "arch", "dtype", "operands", "flags", "config", "registers", "spills",
                   "shared_bytes", "audit_registers", "audit_spill_bytes", "audit_shared_bytes"]  # fmt: skip


def write_compiled_kernels(path: Path) -> None:
    """Registers, spills and shared memory of every kernel triton compiled in this process, beside the
    static audit's row for the same kernel, arch and config (benchmarks/results/kernel_audit.csv)."""
    audit, rows = read_audit(), []
    for name, fn, _ in _kernel_objects():
        for cache in getattr(fn, "device_caches", {}).values():
            for kernel in cache[0].values():
                try:
                    rows.append(compiled_kernel_row(name, fn, kernel, audit))
                except Exception as err:  # another triton's internals: record, do not lose the part
                    rows.append({"kernel": name, "config": f"unreadable: {type(err).__name__}: {err}"[:300]})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COMPILED_FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} compiled kernels -> {path.name}")


PART_FUNCTIONS = {"env": part_env, "smoke": part_smoke, "tier": part_tier, "bench": part_bench}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for every result (created)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for all parts")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="carried wheels to install")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument(
        "--pack", type=Path, default=None, help="re-pack DIR into this .tar.gz after each part"
    )
    parser.add_argument("--part", choices=list(PART_FUNCTIONS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        PART_FUNCTIONS[args.part](args.out, args.dry_run)
        return 0
    return run_parts(args)


if __name__ == "__main__":
    sys.exit(main())
