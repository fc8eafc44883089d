"""The built wheel maps kernels/ to sails_fast.kernels and never ships a top-level `kernels` module."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("sails_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.startswith("sails_fast-")}
    assert top_level == {"sails_fast"}, top_level
    needed = [
        "sails_fast/kernels/lora.py",
        "sails_fast/kernels/_triton.py",
        "sails_fast/data/harmless.json",
        "sails_fast/sails/pipeline.py",
        "sails_fast/pipeline/run.py",
        "sails_fast/study/theory.py",
        "sails_fast/fused/strategy_table.json",
        "sails_fast/integrations/peft.py",
    ]
    assert [n for n in needed if n not in names] == []
