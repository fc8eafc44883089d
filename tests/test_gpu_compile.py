"""Every Triton kernel compiles for NVIDIA GPUs (sm_90, sm_80), checked without a GPU.

tests/gpu_compile_check.py runs the real launchers with launches intercepted and compiles each captured
kernel variant down to a cubin with triton's bundled ptxas. It runs in a subprocess because the default
tier sets TRITON_INTERPRET=1, under which kernels cannot be compiled. Compiling is not running: numerics
on a device are the `gpu` tier's job.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("gpu_compile_check.py")


def run_check(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_check_refuses_a_kernel_only_the_interpreter_accepts():
    done = run_check("--self-test", "--arch", "90", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_kernel_compiles_for_hopper():
    done = run_check("--arch", "90", timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert " 0 failed" in done.stdout


@pytest.mark.slow
def test_every_autotune_config_compiles_for_hopper_and_ampere():
    done = run_check("--arch", "90", "80", "--all-configs", timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
