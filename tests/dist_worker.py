"""Run under torchrun by tests/test_distributed.py: the sails-fast CLI with one fault injected, or checks of
`sails_fast.core.distributed` itself.

    dist_worker.py cli ARGS...                   sails-fast ARGS (the plain CLI)
    dist_worker.py kill-rank RANK STEP ARGS...   sails-fast ARGS; RANK is SIGKILLed after optimizer step STEP
    dist_worker.py kill-generate RANK CALL ARGS  sails-fast ARGS; RANK is SIGKILLed at its CALLth generate()
    dist_worker.py rank-config CFG0 CFG1 ARGS... sails-fast ARGS --config CFG<rank> (ranks disagree)
    dist_worker.py helpers                       the collective helpers, and a rank that hangs
    dist_worker.py cache-race DIR                rank 1 reads the completion caches after rank 0 writes
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _kill_after(rank: int, step: int) -> None:
    import sails_fast.training.loop as loop

    original = loop._optimizer_step
    done = [0]

    def optimizer_step(*args, **kwargs):
        record = original(*args, **kwargs)
        done[0] += 1
        if int(os.environ["RANK"]) == rank and done[0] == step:
            os.kill(os.getpid(), signal.SIGKILL)  # as an out-of-memory kill: no cleanup, no message
        return record

    loop._optimizer_step = optimizer_step


def _kill_at_generate(rank: int, call: int) -> None:
    from transformers.generation.utils import GenerationMixin

    original = GenerationMixin.generate
    calls = [0]

    def generate(self, *args, **kwargs):
        calls[0] += 1
        if int(os.environ["RANK"]) == rank and calls[0] == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    GenerationMixin.generate = generate


def _cache_race() -> int:
    """Rank 1 reads the completion caches only once rank 0 has appended to its own: both ranks must still
    split the same prompts and return every completion."""
    from pathlib import Path

    from tiny import tiny_llama, tiny_tokenizer  # tests/ is on sys.path: this script's folder

    import sails_fast.pairs.generation as generation
    from sails_fast.core import distributed
    from sails_fast.pairs.config import CollectConfig

    distributed.init_from_env()
    r, cache = distributed.rank(), Path(sys.argv[2]) / "unaligned.jsonl"
    if r == 1:
        list_files = generation.rank_cache_files

        def late_listing(*args, **kwargs):
            rank0_file = cache.with_name("unaligned.rank0.jsonl")
            deadline = time.monotonic() + 4  # with the fix rank 0 waits for rank 1 instead
            while time.monotonic() < deadline and not (rank0_file.exists() and rank0_file.stat().st_size):
                time.sleep(0.05)
            return list_files(*args, **kwargs)

        generation.rank_cache_files = late_listing
    tok = tiny_tokenizer(padding_side="left")
    prompts = [f"prompt number {i}" for i in range(8)]
    config = CollectConfig(batch_size=2, max_new_tokens=2, progress=False)
    try:
        texts = generation.generate_unaligned(tiny_llama(tokenizer=tok), tok, prompts, config, cache)
        same = distributed.gather(texts)
        print(
            f"cache race [{r}]: {len(texts)} completions, same on both ranks: {same[0] == same[1]}",
            flush=True,
        )
        distributed.barrier()
    finally:
        distributed.shutdown()  # a process group left alive aborts the interpreter's exit now and then
    return 0


def _helpers() -> int:
    import torch

    from sails_fast.core import distributed

    assert distributed.init_from_env() and distributed.world_size() == 2
    r = distributed.rank()
    items = list(range(5))
    assert distributed.gather_concat(distributed.shard(items)) == items
    assert distributed.broadcast(f"from {r}") == "from 0"
    assert distributed.all_sum(r + 1.0) == 3.0
    with distributed.local_only():
        assert (distributed.world_size(), distributed.shard(items)) == (1, items)
    try:
        distributed.check_same("settings", {"a": 1, "b": r})
    except distributed.DistributedError as err:
        print(f"check_same [{r}]: {err}", flush=True)
    try:
        distributed.on_main(lambda: int("not a number"))
    except ValueError as err:
        print(f"on_main [{r}]: {err}", flush=True)
    # statistics: both ranks' tokens, rank order = stream order
    from sails_fast.core.feature_stats import FeatureStats

    stats = FeatureStats.empty(2, 3)
    stats.act_max[0] = torch.tensor([1.0, 2.0, 2.0]) if r == 0 else torch.tensor([1.0, 3.0, 2.0])
    stats.act_argmax[0] = torch.tensor([4, 0, 1]) if r == 0 else torch.tensor([2, 1, 0])
    stats.tokens_seen = 5 if r == 0 else 7
    stats.all_reduce()
    print(f"argmax [{r}]: {stats.act_argmax[0].tolist()} seen {stats.tokens_seen}", flush=True)
    # a rank that hangs: the other's next collective fails after $SAILS_FAST_DIST_TIMEOUT seconds
    if r == 1:
        time.sleep(3 * float(os.environ["SAILS_FAST_DIST_TIMEOUT"]))
        return 0
    start = time.monotonic()
    try:
        distributed.barrier()
    except RuntimeError:
        print(f"timeout [{r}] after {time.monotonic() - start:.0f} s", flush=True)
        os._exit(0)  # the group cannot be torn down cleanly with a peer stuck
    return 1


def main() -> int:
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "helpers":
        return _helpers()
    if mode == "cache-race":
        return _cache_race()
    from sails_fast.cli import main as cli_main

    if mode == "kill-rank":
        _kill_after(int(rest[0]), int(rest[1]))
        rest = rest[2:]
    elif mode == "kill-generate":
        _kill_at_generate(int(rest[0]), int(rest[1]))
        rest = rest[2:]
    elif mode == "rank-config":
        rest = [*rest[2:], "--config", rest[int(os.environ["RANK"])]]
    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main())
