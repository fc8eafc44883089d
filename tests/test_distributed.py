"""The pipeline under torchrun (issue 18): 2 CPU processes on gloo, the tiny Llama and SAEs of
test_sails_pipeline, against a single-process run of the same config.

Each rank gets the test process's thread count (torchrun would set OMP_NUM_THREADS=1): CPU matmuls round
differently with another thread count, and "exactly" is meant for the same arithmetic.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_sails_pipeline import tiny_config, write_tiny_assets

from sails_fast.core import distributed
from sails_fast.pipeline.config import RunConfig
from sails_fast.pipeline.run import run_pipeline

WORKER = Path(__file__).with_name("dist_worker.py")
ADAPTER = "train/adapter/adapter_model.safetensors"
# the trained adapter of 2 ranks vs 1 process: same global batch, the loss summed in another order
ADAPTER_ATOL = 1e-6


def torchrun(
    *args, nproc: int = 2, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N tests/dist_worker.py ARGS` (its output captured)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    for _attempt in range(2):
        proc = subprocess.run(
            [*cmd, str(WORKER), *map(str, args)], capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})},
        )  # fmt: skip
        # the launcher's free port can be taken between its probe and its bind: launch again, once
        if "address already in use" not in proc.stderr.lower():
            break
    return proc


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    return sorted(line for line in proc.stderr.splitlines() if line.startswith("sails-fast: error:"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny assets, a config file, and the single-process run of it."""
    root = tmp_path_factory.mktemp("dist")
    config = tiny_config(*write_tiny_assets(root))
    config.save(root / "config.json")
    run_pipeline(config, root / "single")
    return root


@pytest.fixture(scope="module")
def two_ranks(setup):
    """`torchrun --nproc-per-node 2 sails-fast run` of the same config."""
    proc = torchrun("cli", "run", "--config", setup / "config.json", "--out", setup / "ranks")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return setup / "ranks", proc


def test_statistics_equal_the_single_process_run(setup, two_ranks):
    out, _ = two_ranks
    for layer in (0, 1):
        one = load_file(str(setup / "single" / "stats" / f"layer_{layer}.safetensors"))
        two = load_file(str(out / "stats" / f"layer_{layer}.safetensors"))
        for name in ("token_count", "active_count", "act_max", "act_argmax"):
            assert torch.equal(one[name], two[name]), name
        for name in ("weight_sum", "act_sum", "act_sq_sum"):
            torch.testing.assert_close(two[name], one[name], rtol=1e-6, atol=1e-5)
    # each example seen once: the pairs and retain answers are the single run's, in order
    for name in ("pairs.jsonl", "retain.jsonl"):
        assert (out / name).read_text() == (setup / "single" / name).read_text()
    # each rank generated into its own file, and there is no other cache file
    caches = sorted(p.name for p in out.glob("unaligned_cache.*"))
    assert [name.rsplit(".", 2)[1] for name in caches] == ["rank0", "rank1"], caches


def test_select_subspace_and_init_are_the_single_process_ones(setup, two_ranks):
    out, _ = two_ranks
    for name in ("selection.safetensors", "subspace.safetensors"):
        one, two = load_file(str(setup / "single" / name)), load_file(str(out / name))
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)
    assert json.loads((out / "init.json").read_text()) == json.loads(
        (setup / "single" / "init.json").read_text()
    )


def test_the_trained_adapter_equals_the_single_process_run(setup, two_ranks):
    out, _ = two_ranks
    one, two = load_file(str(setup / "single" / ADAPTER)), load_file(str(out / ADAPTER))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=ADAPTER_ATOL)
    logs = [[json.loads(x) for x in (d / "train" / "train_log.jsonl").read_text().splitlines()]
            for d in (setup / "single", out)]  # fmt: skip
    assert [r["tokens"] for r in logs[0]] == [r["tokens"] for r in logs[1]]  # the same global batches
    for a, b in zip(*logs, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)


def test_evaluation_is_gathered_and_artifacts_record_the_world_size(setup, two_ranks):
    out, proc = two_ranks
    for name in ("eval_before.json", "eval_after.json"):
        one, two = (json.loads((d / name).read_text()) for d in (setup / "single", out))
        for s in one["sets"]:
            assert [r["prompt"] for r in two["sets"][s]["records"]] == [
                r["prompt"] for r in one["sets"][s]["records"]
            ]
            assert [r["response"] for r in two["sets"][s]["records"]] == [
                r["response"] for r in one["sets"][s]["records"]
            ]
    state = json.loads((out / "run_state.json").read_text())["steps"]
    assert {step: rec["world_size"] for step, rec in state.items()} == dict.fromkeys(state, 2)
    assert json.loads((setup / "single" / "run_state.json").read_text())["steps"]["stats"]["world_size"] == 1
    header = json.loads(_header(out / "stats" / "layer_0.safetensors"))
    assert header["metadata"]["world_size"] == 2
    assert proc.stdout.count("run directory:") == 1  # rank 0 prints the summary, once
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".tmp-*"))


def _header(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()["header"]


def test_a_rerun_of_a_finished_distributed_run_reuses_every_step(two_ranks):
    out, _ = two_ranks
    # the reused run reads what 2 ranks wrote, in one process
    result = run_pipeline(RunConfig.load(out / "config.json"), out)
    assert result.steps_run == []


def accelerate_launch(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 tests/dist_worker.py ARGS` (torchrun underneath;
    on a machine without a GPU the ranks use gloo)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd = [*launch, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(WORKER)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def test_killed_ranks_then_reruns_resume_to_the_single_process_results(setup, two_ranks):
    """Rank 0 killed mid-generation, then (relaunched with accelerate) rank 1 killed mid-training; each
    rerun continues where the killed one stopped, and the results are those of uninterrupted runs."""
    out, config = setup / "killed", setup / "config.json"
    # rank 0 dies as its second batch of completions starts: its first batch is in its own cache file
    proc = torchrun("kill-generate", 0, 2, "run", "--config", config, "--out", out)
    assert proc.returncode != 0 and not (out / "pairs.jsonl").exists(), proc.stderr[-3000:]
    (rank0_cache,) = out.glob("unaligned_cache.*.rank0.jsonl")
    assert len(rank0_cache.read_text().splitlines()) == 4  # collect.batch_size

    # accelerate launch resumes; rank 1 dies like an out-of-memory kill after optimizer step 3 (checkpoint 2)
    proc = accelerate_launch("kill-rank", 1, 3, "run", "--config", config, "--out", out)
    assert proc.returncode != 0
    assert (out / "train" / "checkpoints" / "step-00000002").is_dir(), proc.stderr[-3000:]
    assert not (out / "train" / "adapter").exists()
    for name in ("pairs.jsonl", "retain.jsonl"):  # each prompt completed once, over both launches
        assert (out / name).read_text() == (setup / "single" / name).read_text()
    cached = [
        json.loads(x)["hash"] for f in out.glob("unaligned_cache.*.jsonl") for x in f.read_text().splitlines()
    ]
    assert len(cached) == len(set(cached)) == 12
    state = json.loads((out / "run_state.json").read_text())["steps"]
    assert state["stats"]["world_size"] == 2
    for layer in (0, 1):
        one = load_file(str(setup / "single" / "stats" / f"layer_{layer}.safetensors"))
        two = load_file(str(out / "stats" / f"layer_{layer}.safetensors"))
        assert torch.equal(one["act_argmax"], two["act_argmax"]) and torch.equal(
            one["act_max"], two["act_max"]
        )

    # the world size is not part of the run: one process resumes what 2 ranks left, to the same adapter
    shutil.copytree(out, setup / "killed_then_one_process")
    resumed = run_pipeline(RunConfig.load(config), setup / "killed_then_one_process")
    assert resumed.train.resumed_from == 2 and "train" in resumed.steps_run
    one = load_file(str(setup / "killed_then_one_process" / ADAPTER))
    # and the same torchrun command again finishes the run
    proc = torchrun("cli", "run", "--config", config, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reused: data, pairs, saes, stats, select, subspace, init" in proc.stdout
    log = [json.loads(x) for x in (out / "train" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    reference = load_file(str(two_ranks[0] / ADAPTER))
    two = load_file(str(out / ADAPTER))
    for key in reference:
        torch.testing.assert_close(two[key], reference[key], rtol=0, atol=ADAPTER_ATOL)
        torch.testing.assert_close(one[key], reference[key], rtol=0, atol=ADAPTER_ATOL)


def test_ranks_with_different_configs_fail_fast_on_every_rank(setup, tmp_path):
    other = json.loads((setup / "config.json").read_text())
    other["sails"]["select"]["top_k"] = 5
    (tmp_path / "other.json").write_text(json.dumps(other))
    proc = torchrun(
        "rank-config", setup / "config.json", tmp_path / "other.json", "run", "--out", tmp_path / "run"
    )
    assert proc.returncode != 0
    lines = errors(proc)
    assert len(lines) == 2, proc.stderr[-3000:]
    for r, line in enumerate(lines):
        assert line.startswith(f"sails-fast: error: [rank {r}/2] the run's config differs between ranks")
        assert "sails.select.top_k: rank 0 has 8, rank 1 has 5" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_more_ranks_than_training_prompts_is_an_error_on_every_rank(setup, tmp_path):
    config = json.loads((setup / "config.json").read_text())
    config["data"]["train_prompts"] = 1
    (tmp_path / "one.json").write_text(json.dumps(config))
    proc = torchrun("cli", "run", "--config", tmp_path / "one.json", "--out", tmp_path / "run")
    lines = errors(proc)
    assert len(lines) == 2, proc.stderr[-3000:]
    for r, line in enumerate(lines):
        assert re.match(rf"sails-fast: error: \[rank {r}/2\] data: 1 training prompts for 2 ranks", line), (
            line
        )


def test_the_collective_helpers_and_a_hung_rank_timing_out():
    proc = torchrun("helpers", env={distributed.TIMEOUT_ENV: "2"}, timeout=120)
    out = proc.stdout
    for r in (0, 1):
        assert f"check_same [{r}]: settings differs between ranks; every rank must get the same " \
               "(b: rank 0 has 0, rank 1 has 1)" in out  # fmt: skip
        assert f"argmax [{r}]: [4, 6, 1] seen 12" in out
    assert "on_main [0]: invalid literal for int()" in out
    assert "on_main [1]: rank 0 failed: invalid literal for int()" in out
    assert re.search(r"timeout \[0\] after [2-5] s", out), out + proc.stderr[-2000:]


def test_a_rank_reading_the_caches_late_splits_the_same_prompts(tmp_path):
    """Rank 0 appends completions to its cache before rank 1 has read the caches: rank 0's list of prompts
    to do holds for both (rank 1 used to split fewer prompts and fail with a KeyError)."""
    proc = torchrun("cache-race", tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        assert f"cache race [{r}]: 8 completions, same on both ranks: True" in proc.stdout


def test_the_single_process_helpers_are_the_identity():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.shard([1, 2, 3]) == [1, 2, 3] and distributed.gather("x") == ["x"]
    assert distributed.on_main(lambda: 7) == 7 and distributed.describe() == ""
    bounds = [distributed.shard_bounds(7, r, 3) for r in range(3)]
    assert bounds == [(0, 3), (3, 5), (5, 7)]


def test_compare_deals_its_method_seed_cells_to_the_ranks(setup, tmp_path):
    run = json.loads((setup / "config.json").read_text())
    run["model"]["quantize"] = "none"
    run["sails"]["train"].update(max_steps=1, save_every=0)
    methods = [{"name": "sails", "kind": "sails"}, {"name": "lora", "kind": "lora"}]
    probe = {"probe_every": 1, "probe_prompts": 2, "probe_max_new_tokens": 2, "ppl_prompts": 2}
    config = {"run": run, "methods": methods, "seeds": [0], **probe, "progress": False}
    (tmp_path / "compare.json").write_text(json.dumps(config))
    proc = torchrun("cli", "compare", "--config", tmp_path / "compare.json", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = re.findall(r"\[rank (\d)/2\] compare: (\w+) seed (\d)", proc.stdout)
    # the cells in order (seeds outermost) dealt in turn: each ran once, on one rank
    assert sorted(done) == [("0", "sails", "0"), ("1", "lora", "0")]
    for method in ("sails", "lora"):
        assert (tmp_path / "out" / "runs" / method / "seed0" / "result.json").is_file()
    # rank 0 writes the tables and plots and prints the summary, once
    wrote = re.findall(r"^wrote \S+/(\S+)$", proc.stdout, re.M)
    assert sorted(wrote) == sorted(
        p.name for p in (tmp_path / "out").glob("compare*.*") if p.name != "compare_config.json"
    )
    assert len(wrote) == len(set(wrote)) >= 5 and proc.stdout.count("| method |") == 1


def test_a_damaged_artifact_is_an_error_on_every_rank(two_ranks, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_ranks[0], out)
    path = out / "data.json"
    path.write_text(path.read_text() + "]")
    proc = torchrun("cli", "select", "--config", out / "config.json", "--out", out)
    lines = errors(proc)
    assert len(lines) == 2, proc.stderr[-3000:]
    assert lines[0].startswith(f"sails-fast: error: [rank 0/2] {path}: does not match the checksum")
    assert lines[1].startswith(
        f"sails-fast: error: [rank 1/2] rank 0 failed: {path}: does not match the checksum"
    )


def test_each_rank_takes_an_equal_share_of_the_global_batch(monkeypatch):
    from sails_fast.training.data_parallel import rank_share

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert rank_share([5, 3, 8, 1, 0, 9], batch_size=3, grad_accum_steps=2) == [1, 0, 9]
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    with pytest.raises(
        ValueError, match=r"batch_size \* train.grad_accum_steps = 6 examples .* over 4 ranks"
    ):
        rank_share(list(range(6)), batch_size=3, grad_accum_steps=2)


def test_one_process_reuses_the_completions_ranks_cached(tmp_path):
    from tiny import tiny_llama, tiny_tokenizer

    from sails_fast.pairs.config import CollectConfig
    from sails_fast.pairs.generation import (
        CACHE_FORMAT,
        _generation_settings,
        generate_unaligned,
        prompt_hash,
    )

    model, tok = tiny_llama(), tiny_tokenizer(padding_side="left")
    config = CollectConfig(max_new_tokens=3, progress=False)
    prompts = ["first prompt", "second prompt", "third prompt"]
    settings = _generation_settings(model, config)
    cache = tmp_path / "unaligned_cache.key.jsonl"
    for r, part in enumerate((prompts[:2], prompts[2:])):  # what 2 ranks wrote before a kill
        records = [
            {"format": CACHE_FORMAT, "hash": prompt_hash(p), "response": f"cached {p}", "settings": settings}
            for p in part
        ]
        cache.with_name(f"unaligned_cache.key.rank{r}.jsonl").write_text(
            "".join(json.dumps(x) + "\n" for x in records)
        )
    model.generate = None  # nothing may be generated again
    assert generate_unaligned(model, tok, prompts, config, cache) == [f"cached {p}" for p in prompts]


def test_fsdp_training_with_a_killed_rank_resumes_to_the_single_process_adapter(setup, tmp_path):
    """train.parallel "fsdp": the 4-bit base sharded over the ranks (with gradient checkpointing); rank 1
    killed after optimizer step 3, then the same command resumes from checkpoint 2 and finishes."""
    out = tmp_path / "fsdp"
    shutil.copytree(setup / "single", out)  # the steps up to init are reused; train and eval run again
    config = json.loads((setup / "config.json").read_text())
    config["sails"]["train"].update(parallel="fsdp", gradient_checkpointing=True)
    (tmp_path / "fsdp.json").write_text(json.dumps(config))
    args = ("run", "--config", tmp_path / "fsdp.json", "--out", out)
    # --force: gradient_checkpointing is in the train fingerprint (parallel is not: it changes no number)
    proc = torchrun("kill-rank", 1, 3, *args, "--force")
    assert proc.returncode != 0
    assert (out / "train" / "checkpoints" / "step-00000002").is_dir(), proc.stderr[-3000:]
    assert not (out / "train" / "adapter").exists()
    kept = out / "train" / "checkpoints" / "step-00000002"
    written = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [kept, *kept.iterdir()]}

    proc = torchrun("cli", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reused: data, pairs, saes, stats, select, subspace, init" in proc.stdout
    # resumed from checkpoint 2: a restart would have written it again (a new folder, renamed into place)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [kept, *kept.iterdir()]} == written
    log = [json.loads(x) for x in (out / "train" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    # each rank held about half the frozen base (the embedding, norms and 4-bit weights, split by rows)
    sharding = json.loads((out / "train" / "sharding.json").read_text())
    assert sharding["world_size"] == 2
    for rank in sharding["ranks"]:
        assert 0.4 < rank["frozen_bytes"] / rank["frozen_bytes_whole"] <= 0.6, sharding
    one, two = load_file(str(setup / "single" / ADAPTER)), load_file(str(out / ADAPTER))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=ADAPTER_ATOL)
    # evaluation ran the whole model with the trained adapter on every rank, as the single process did
    one, two = (json.loads((d / "eval_after.json").read_text()) for d in (setup / "single", out))
    for s in one["sets"]:
        assert [r["response"] for r in two["sets"][s]["records"]] == [
            r["response"] for r in one["sets"][s]["records"]
        ]


def test_lora_gradients_are_summed_and_an_unused_one_stays_none(tmp_path):
    """all_reduce_gradients in a one-process gloo group: the gradients keep their values and dtypes, and a
    parameter without a gradient keeps none (AdamW then skips it, as in one process)."""
    import torch.distributed as dist

    from sails_fast.training.fully_sharded import all_reduce_gradients

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        used, unused = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4))
        half = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
        used.grad, half.grad = torch.arange(6.0).view(2, 3), torch.full((3,), 0.5, dtype=torch.bfloat16)
        all_reduce_gradients([used, unused, half])
        assert torch.equal(used.grad, torch.arange(6.0).view(2, 3)) and unused.grad is None
        assert half.grad.dtype == torch.bfloat16 and torch.equal(half.grad, torch.full((3,), 0.5).bfloat16())
    finally:
        dist.destroy_process_group()
    assert not distributed.active()
