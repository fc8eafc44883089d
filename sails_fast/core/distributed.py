"""Running under torch.distributed (torchrun, `accelerate launch`): which rank this process is, how work is
split between ranks, and the few collectives the pipeline needs.

Without a process group (or inside `local_only()`) every helper is the single-process case: rank 0 of 1,
`shard` returns everything, gathers return a one-element list. `init_from_env` starts the group from the
variables torchrun and accelerate set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL when
there is a GPU, else gloo, with a timeout on every collective so a rank that dies or hangs turns into an
error on the others instead of a hang.

Work is split in contiguous shards in rank order (rank 0 takes the first items), so "rank order = stream
order": gathering in rank order gives back the single-process order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# seconds a collective may wait before it fails (a dead or stuck rank); the environment variable overrides
TIMEOUT_ENV = "SAILS_FAST_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0

_local_depth = 0


class DistributedError(RuntimeError):
    """A setup that cannot run across these ranks; raised with the same message on every rank."""


@contextmanager
def local_only() -> Iterator[None]:
    """Inside this block the helpers act as one process (rank 0 of 1), whatever the process group: for work
    a rank does on its own, such as one (method, seed) cell of `sails-fast compare`."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def active() -> bool:
    """Whether work is split over more than one rank here."""
    return _local_depth == 0 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (the only rank of a single-process run): the rank that writes artifacts."""
    return rank() == 0


def group_size() -> int:
    """The process group's world size, inside `local_only` too (1 without one): what artifacts record."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def describe() -> str:
    """The process group's "rank r/N" (inside `local_only` too), else ""; prefixed to errors and logs."""
    return f"rank {dist.get_rank()}/{group_size()}" if group_size() > 1 else ""


def timeout_seconds() -> float:
    """The collective timeout: $SAILS_FAST_DIST_TIMEOUT seconds, else DEFAULT_TIMEOUT_S."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV}: expected a positive number of seconds, got {raw!r}")
    return value


def launched_distributed() -> bool:
    """Whether the launcher asked for more than one process (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env() -> bool:
    """Start the process group from the launcher's environment when WORLD_SIZE > 1; whether one is active.

    The device of a GPU rank is cuda:LOCAL_RANK (set as the current device, so "cuda" means it)."""
    if not dist.is_available() or not launched_distributed():
        return False
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_seconds())
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise DistributedError(
                    f"LOCAL_RANK {local}: this node has {torch.cuda.device_count()} GPU(s); start at most "
                    "one process per GPU (--nproc-per-node)"
                )
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return active()


def shutdown() -> None:
    """Destroy the process group (if this module's caller started one)."""
    global _long_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _long_group = None


def shard_bounds(n: int, of_rank: int | None = None, of_world: int | None = None) -> tuple[int, int]:
    """[start, stop) of a rank's contiguous share of n items (default: this rank of this world); the first
    n % world ranks take one more."""
    r = rank() if of_rank is None else of_rank
    base, extra = divmod(n, world_size() if of_world is None else of_world)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous share of `items` (all of them in a single process)."""
    start, stop = shard_bounds(len(items))
    return items[start:stop]


def gather(obj: Any) -> list[Any]:
    """[rank 0's obj, rank 1's obj, ...] (any picklable object); [obj] in a single process."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_concat(items: Sequence[T]) -> list[T]:
    """Every rank's list, concatenated in rank order (undoes `shard`)."""
    return [x for part in gather(list(items)) for x in part]


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# a wait for work of unbounded length (a comparison's training runs) has its own group, without a timeout
_LONG_WAIT = timedelta(days=7)
_long_group = None


def barrier(long: bool = False) -> None:
    """Wait for every rank. `long`: the others may be busy for hours (no collective timeout applies)."""
    global _long_group
    if not active():
        return
    if not long:
        dist.barrier()
        return
    if _long_group is None:
        _long_group = dist.new_group(backend="gloo", timeout=_LONG_WAIT)
    dist.barrier(group=_long_group)


def all_sum(value: float) -> float:
    """The sum of `value` over the ranks (fp64)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


def check_same(what: str, values: dict[str, Any]) -> None:
    """Raise DistributedError on every rank when `values` (flat key -> JSON-like value) differ between ranks,
    naming the keys; ranks launched with different configs must not run on."""
    everyone = gather(values)
    reference = everyone[0]
    lines = []
    for r, other in enumerate(everyone[1:], start=1):
        keys = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
        for k in keys[:5]:
            lines.append(f"{k}: rank 0 has {reference.get(k)!r}, rank {r} has {other.get(k)!r}")
        if len(keys) > 5:
            lines.append(f"... and {len(keys) - 5} more keys differ on rank {r}")
    if lines:
        raise DistributedError(
            f"{what} differs between ranks; every rank must get the same ({'; '.join(lines)})"
        )


def on_main(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 only, as a single process (`local_only`); every rank returns when it is done (rank
    0's value there, None elsewhere).

    If `fn` raises on rank 0, every other rank raises too (same kind for ValueError / OSError), so a failed
    step is an error everywhere instead of the others waiting on a rank that stopped."""
    result, error = None, None
    if is_main():
        try:
            with local_only():  # rank 0 alone: no collective inside may wait for the others
                result = fn()
        except Exception as err:  # re-raised below on rank 0, reported to the others first
            error = err
    message = broadcast(None if error is None else (type(error).__name__, str(error)))
    if error is not None:
        raise error
    if message is not None:
        kind, text = message
        raise (ValueError if kind == "ValueError" else OSError if kind == "OSError" else DistributedError)(
            f"rank 0 failed: {text}"
        )
    return result
