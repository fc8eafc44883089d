"""Training checkpoints written atomically (adapter, optimizer, scheduler, RNG states, step, data order) and
restored on resume; everything loads with `weights_only=True`."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from sails_fast.core import distributed

CHECKPOINT_FORMAT = "sails_fast.train_checkpoint/1"


_STEP_DIR = re.compile(r"^step-(\d{8})$")


# fields that do not change the numbers a run produces: may differ between a run and its resumption
# config keys a resumed run may change: bookkeeping, and the loss chunk (summation order only)
_RESUME_FREE = (
    "progress", "keep_checkpoints", "log_every", "save_every", "resume", "loss_chunk_tokens", "parallel",
)  # fmt: skip


# ----- checkpoints


def _fsync_dir(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict:
    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place, so complete by construction), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "state.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _save_checkpoint(model, optimizer, scheduler, ckpt_root: Path, step: int, state: dict, keep: int) -> Path:
    """Written by rank 0 (every rank calls it: each one's RNG state is kept, rng_rank<r>.pt for r >= 1)."""
    final = ckpt_root / f"step-{step:08d}"
    rng_states = distributed.gather(_rng_state())
    if not distributed.is_main():
        return final
    tmp = ckpt_root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_states[0], tmp / "rng.pt")
    for r, rng in enumerate(rng_states[1:], start=1):
        torch.save(rng, tmp / f"rng_rank{r}.pt")
    torch.save(state, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(
        json.dumps({k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}, indent=2) + "\n"
    )
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    # a directory rename is atomic: a reader sees the whole checkpoint or none
    os.replace(tmp, final)
    for _, old in _checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load(path: Path, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several error types for a damaged file
        raise ValueError(f"out_dir: checkpoint file {path} is unreadable ({what}: {err})") from err


def _restore(model, optimizer, scheduler, ckpt: Path) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = ckpt / "adapter_model.safetensors"
    try:
        adapter = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"out_dir: checkpoint file {weights} is unreadable ({err})") from err
    result = set_peft_model_state_dict(model, adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(
            f"out_dir: checkpoint {ckpt} holds adapter weights this model lacks: {unexpected[:3]}"
        )
    optimizer.load_state_dict(_load(ckpt / "optimizer.pt", "optimizer"))
    scheduler.load_state_dict(_load(ckpt / "scheduler.pt", "scheduler"))
    # a rank restores its own RNG state when the checkpoint has one (same world size), else rank 0's
    own = ckpt / f"rng_rank{distributed.rank()}.pt"
    _set_rng_state(_load(own if distributed.rank() and own.is_file() else ckpt / "rng.pt", "rng"))
    return _load(ckpt / "state.pt", "state")


def _trim_log(log_path: Path, step: int) -> None:
    """Drop log lines past the resumed step (a killed run may have logged steps it never saved)."""
    if not log_path.exists():
        return
    keep = []
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= step:
            keep.append(line)
    tmp = log_path.with_name(log_path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(log_path)
