"""Every Triton kernel compiles for NVIDIA GPUs the way a launch specialises it, checked without a GPU.

benchmarks/kernel_audit.py runs the real launchers at real-model shapes with launches intercepted,
under a simulated target GPU, binds each launch as triton would (alignment and divisibility hints) and
compiles it to a cubin with triton's bundled ptxas. The default tier audits a subset (bf16, Hopper and
an RTX 3090, one model, one projection / two SAE activations) and fails on a compile error, a spill, a
tile over the GPU's shared memory, an unpipelined main loop or, on Hopper, a tensor-core dot that is not
a warpgroup MMA. The `slow` tier audits every kept config on every target and dtype. It runs in a
subprocess because the default tier sets TRITON_INTERPRET=1, under which nothing compiles for a GPU.
Compiling is not running: numerics and speed on a device are the `gpu` tier's and the benchmarks' job.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_audit.py"


def run_audit(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_audit_refuses_what_only_the_interpreter_accepts():
    done = run_audit("--self-test", "--arch", "90", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_kernels_compile_clean_for_hopper_and_a_consumer_gpu():
    done = run_audit("--subset", timeout=1500)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "distinct kernel variants" in done.stdout and "PROBLEM" not in done.stdout


@pytest.mark.slow
def test_every_kept_config_on_every_gpu_and_dtype(tmp_path):
    done = run_audit("--out", str(tmp_path / "audit.csv"), timeout=5400)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
