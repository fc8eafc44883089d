"""How "auto" picks a strategy for an op: the measured table first, the roofline model otherwise.

`strategy_table.json` (in this package) maps "sm_<arch>/<op>/<shape bucket>" to the strategy that was
fastest when benchmarks/bench_*.py ran on such a GPU (written by `--write-strategy-table`). Until a GPU
has filled an entry, "auto" takes the strategy the roofline model (`sails_fast.roofline`) predicts to be
fastest for the device's class (H100 / H200, RTX 4090, RTX 3090, A100). Choices are cached per key, so
"auto" costs a dict lookup per call after the first.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from . import roofline

TABLE_PATH = Path(__file__).with_name("strategy_table.json")
TABLE_VERSION = 1

STRATEGIES: dict[str, tuple[str, ...]] = {
    "lora_linear": roofline.LORA_STRATEGIES,
    "qlora_linear": roofline.QLORA_STRATEGIES,
    "sae_feature_stats": roofline.SAE_STRATEGIES,
}


def check_strategy(op: str, strategy: str) -> None:
    """ValueError naming `strategy` unless it is "auto" or one of the op's strategies."""
    allowed = ("auto", *STRATEGIES[op])
    if strategy not in allowed:
        raise ValueError(f"strategy: expected one of {allowed}, got {strategy!r}")


def token_bucket(tokens: int) -> int:
    """Tokens rounded up to a power of two (at least 16): the table's granularity along tokens."""
    return max(16, 1 << max(0, int(tokens) - 1).bit_length())


def shape_key(op: str, **shape: int) -> str:
    """The table's shape bucket: the token count's power of two and the exact widths."""
    if op in ("lora_linear", "qlora_linear"):
        return f"M{token_bucket(shape['M'])}_K{shape['K']}_N{shape['N']}_R{shape['R']}"
    return f"T{token_bucket(shape['T'])}_d{shape['d']}_F{shape['F']}"


@functools.lru_cache(maxsize=1)
def load_table(path: str = str(TABLE_PATH)) -> dict[str, str]:
    """The measured choices, {"sm_90/lora_linear/M8192_K3584_N4096_R16": "fused", ...}; empty if absent."""
    file = Path(path)
    if not file.exists():
        return {}
    data = json.loads(file.read_text())
    if data.get("version") != TABLE_VERSION:
        raise ValueError(f"{path}: strategy table version {data.get('version')!r}, expected {TABLE_VERSION}")
    entries = data.get("entries", {})
    for key, choice in entries.items():
        op = key.split("/")[1] if key.count("/") == 2 else None
        if op not in STRATEGIES or choice not in STRATEGIES[op]:
            raise ValueError(f"{path}: entry {key!r} -> {choice!r} names no known op and strategy")
    return dict(entries)


def device_arch_and_name(device: torch.device) -> tuple[int, str]:
    """(compute capability as 10 * major + minor, device name); CPU and the interpreter count as an H100."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor, torch.cuda.get_device_name(device)
    return 90, "interpreter"


@functools.lru_cache(maxsize=4096)
def _choose(op: str, arch: int, name: str, key: str, shape: tuple[tuple[str, int], ...]) -> tuple[str, str]:
    table = load_table()
    measured = table.get(f"sm_{arch}/{op}/{key}")
    if measured is not None:
        return measured, "measured"
    return roofline.best_strategy(op, roofline.device_for(arch, name), **dict(shape)), "roofline"


def choose(op: str, device: torch.device, **shape: int) -> str:
    """The strategy "auto" runs for `op` at this shape on this device (see the module docstring)."""
    return explain(op, device, **shape)[0]


def explain(op: str, device: torch.device, **shape: int) -> tuple[str, str]:
    """(strategy, "measured" or "roofline"): what "auto" picks and where the choice came from."""
    arch, name = device_arch_and_name(torch.device(device))
    return _choose(op, arch, name, shape_key(op, **shape), tuple(sorted(shape.items())))
