"""How "auto" picks a strategy for an op: the measured table first, the roofline model otherwise.

`strategy_table.json` (in this package) maps "sm_<arch>/<op>/<shape bucket>" to the strategy that was
fastest when benchmarks/bench_*.py ran on such a GPU (written by `--write-strategy-table`). Until a GPU
has filled an entry, "auto" takes the strategy the roofline model (`sails_fast.fused.roofline`) predicts to be
fastest for the device's class (H100 / H200, RTX 4090, RTX 3090, A100). Choices are cached per key, so
"auto" costs a dict lookup per call after the first.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import torch

from sails_fast.fused import roofline

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


def table_key(arch: int, op: str, key: str) -> str:
    return f"sm_{arch}/{op}/{key}"


def _read_table(path: Path) -> dict:
    if not path.exists():
        return {"version": TABLE_VERSION, "entries": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a valid strategy table ({err})") from err
    if data.get("version") != TABLE_VERSION:
        raise ValueError(f"{path}: strategy table version {data.get('version')!r}, expected {TABLE_VERSION}")
    for key, choice in data.get("entries", {}).items():
        _check_entry(str(path), key, choice)
    return data


@functools.lru_cache(maxsize=1)
def load_table() -> dict[str, str]:
    """The measured choices, {"sm_90/lora_linear/M8192_K3584_N4096_R16": "fused", ...}; empty if none."""
    return dict(_read_table(TABLE_PATH)["entries"])


def _check_entry(where: str, key: str, choice: str) -> None:
    op = key.split("/")[1] if key.count("/") == 2 else None
    if op not in STRATEGIES or choice not in STRATEGIES[op]:
        raise ValueError(f"{where}: entry {key!r} -> {choice!r} names no known op and strategy")


def record(entries: dict[str, str], path: Path | None = None) -> Path:
    """Merge measured choices ({table_key(...): strategy}) into the table, written atomically (the GPU
    benchmarks call this with --write-strategy-table). Later calls of "auto" in this process see them."""
    path = Path(path or TABLE_PATH)
    for key, choice in entries.items():
        _check_entry("entries", key, choice)
    data = _read_table(path)
    data["entries"] = dict(sorted({**data.get("entries", {}), **entries}.items()))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    load_table.cache_clear()
    _choose.cache_clear()
    return path


def device_arch_and_name(device: torch.device) -> tuple[int, str]:
    """(compute capability as 10 * major + minor, device name); CPU and the interpreter count as an H100."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor, torch.cuda.get_device_name(device)
    return 90, "interpreter"


@functools.lru_cache(maxsize=4096)
def _choose(op: str, arch: int, name: str, key: str, shape: tuple[tuple[str, int], ...]) -> tuple[str, str]:
    measured = load_table().get(table_key(arch, op, key))
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
