"""Predicted vs measured peak memory of each pipeline step, on the machine at hand.

Runs each step's real code path once on a model (default: the embedded SmolLM2-135M) at a given batch and
sequence length and measures its peak memory: on CUDA `torch.cuda.max_memory_allocated`, on CPU the
allocations the PyTorch profiler records (every tensor allocation and free, in time order), each on top
of the bytes of the tensors already resident (weights, SAEs) counted one by one. Beside each measured row
it prints the planner's prediction (`sails_fast.pipeline.memory.plan_memory`) for the same settings and
their ratio; `--check` exits 1 when a ratio leaves [0.8, 1.2].

    python benchmarks/memory_check.py                    # SmolLM2-135M, CPU, fp32
    python benchmarks/memory_check.py --model PATH --batch 4 --seq 512 --check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch


def tensor_bytes(*modules) -> int:
    """Bytes of the distinct storages of the modules' parameters and buffers."""
    seen, total = set(), 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            s = t.untyped_storage()
            key = (s.device.type, s.data_ptr())
            if key not in seen:
                seen.add(key)
                total += s.nbytes()
    return total


def measure_peak(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while fn() runs, above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    # each op's own net allocation (children excluded), frees as [memory] events, in time order
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak
