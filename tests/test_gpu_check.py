"""benchmarks/gpu_check.py, the one prepared command for a lent GPU: its rehearsal on CPU.

The dry run is the same sequence of parts as on a GPU (env, smoke, gpu tier, goal benchmarks) under the
Triton interpreter at tiny shapes; a part that runs out of its budget is recorded and the next one still
runs; what triton compiled is joined to the static audit's rows by kernel, arch, dtype and config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_dry_run_runs_every_part_and_writes_its_results(tmp_path):
    out = tmp_path / "out"
    done = run("--out", str(out), "--dry-run", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr + "".join(p.read_text() for p in out.glob("*.log"))
    summary = json.loads((out / "summary.json").read_text())
    assert [summary[p]["status"] for p in ("env", "smoke", "tier", "bench")] == ["ok"] * 4
    env = json.loads((out / "env.json").read_text())
    # sails_fast came from this tree through the shim, kernels and all
    assert "shim" in env["sails_fast"]
    smoke = json.loads((out / "smoke.json").read_text())
    assert len(smoke) == 14 and all(check["ok"] for check in smoke), smoke
    assert {"compiled_smoke.csv", "compiled_bench.csv", "autotune.json", "gpu_tier.xml"} <= {
        p.name for p in out.iterdir()
    }


def test_a_part_out_of_budget_is_recorded_and_the_next_still_runs(tmp_path):
    out, archive = tmp_path / "out", tmp_path / "gpu_check.tar.gz"
    done = run("--out", str(out), "--dry-run", "--budget", "6", "--pack", str(archive), timeout=300)
    assert done.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    assert all(part in summary for part in ("env", "smoke", "tier", "bench")), summary
    assert any(summary[p]["status"].startswith("timed out") for p in ("env", "smoke", "tier", "bench"))
    # the archive the device tool brings back holds the same summary
    import tarfile

    with tarfile.open(archive) as tar:
        packed = json.load(tar.extractfile("out/summary.json"))
    assert packed == summary


def test_compiled_kernels_are_joined_to_the_static_audit():
    """Compile a kernel for sm_90 as a launch binds it (benchmarks/kernel_audit.py), then read it the way
    the GPU run reads triton's cache: its config text must find the audit's row."""
    script = """
import sys, torch, triton
sys.path.insert(0, "benchmarks")
import kernel_audit as KA, gpu_check as GC
from sails_fast.kernels import _triton, lora_rank as KR
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
with _triton.simulate_target(_triton.TARGETS[90]), KA.intercepted_launches() as launches:
    g, a = torch.empty(8192, 16, dtype=torch.bfloat16), torch.empty(16, 3584, dtype=torch.bfloat16)
    KR.low_rank_fill(g, a, 2.0, None, torch.bfloat16)
launch = launches[0]
sig, consts, attrs, opts = KA.bind(launch, 90)
source = ASTSource(launch.fn, sig, consts, attrs)
kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=opts.__dict__)
row = GC.compiled_kernel_row(launch.fn.__name__, launch.fn, kernel, GC.read_audit())
assert row["arch"] == "sm_90" and row["dtype"] == "bf16", row
assert row["audit_registers"] != "not in the audit", row
assert int(row["audit_shared_bytes"]) == row["shared_bytes"], row
# the key tells fp32 adapters from 16-bit ones and a bias from none
assert row["operands"] == "bf16 bf16 bf16 bf16" and "HAS_BIAS=False" in row["flags"], row
print("ok", row["config"])
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
