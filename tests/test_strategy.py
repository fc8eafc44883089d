"""How "auto" picks a strategy (measured table, else roofline), the roofline model's bookkeeping, the
autotune token bucket, and shared-memory pruning per target GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sails_fast import lora_linear
from sails_fast.fused import roofline, strategy
from sails_fast.kernels import _triton


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A private strategy table instead of the package's."""
    path = tmp_path / "strategy_table.json"
    monkeypatch.setattr(strategy, "TABLE_PATH", path)
    strategy.load_table.cache_clear()
    strategy._choose.cache_clear()
    yield path
    strategy.load_table.cache_clear()
    strategy._choose.cache_clear()


def test_the_shipped_table_is_valid_and_the_roofline_decides_until_a_gpu_fills_it():
    data = json.loads(strategy.TABLE_PATH.read_text())
    assert data["version"] == strategy.TABLE_VERSION
    strategy.load_table.cache_clear()
    assert strategy.load_table() == data["entries"]
    shape = {"M": 8192, "K": 3584, "N": 4096, "R": 16}
    choice, source = strategy.explain("lora_linear", torch.device("cpu"), **shape)
    if not data["entries"]:
        assert source == "roofline"
        assert choice == roofline.best_strategy("lora_linear", roofline.DEVICES["h100-sxm"], **shape)


def test_a_measured_entry_overrides_the_roofline(table):
    shape = {"M": 3000, "K": 64, "N": 48, "R": 4}
    assert strategy.explain("lora_linear", torch.device("cpu"), **shape) == ("fused", "roofline")
    key = strategy.table_key(90, "lora_linear", strategy.shape_key("lora_linear", **shape))
    assert key == "sm_90/lora_linear/M4096_K64_N48_R4"
    strategy.record({key: "cublas"})
    assert strategy.explain("lora_linear", torch.device("cpu"), **shape) == ("cublas", "measured")
    # same bucket, another token count
    assert strategy.choose("lora_linear", torch.device("cpu"), M=2049, K=64, N=48, R=4) == "cublas"
    # "auto" runs it: the cuBLAS strategy's output, bit for bit
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3000, 64, generator=g), torch.randn(48, 64, generator=g)
    a, b = torch.randn(4, 64, generator=g), torch.randn(48, 4, generator=g)
    auto = lora_linear(x, w, a, b, 2.0, backend="triton")
    assert torch.equal(auto, lora_linear(x, w, a, b, 2.0, backend="triton", strategy="cublas"))
    assert json.loads(table.read_text())["entries"] == {key: "cublas"}


@pytest.mark.parametrize(
    "entries",
    [{"sm_90/lora_linear/M16_K1_N1_R1": "chunked"}, {"sm_90/no_such_op/x": "fused"}, {"bad": "fused"}],
)
def test_bad_entries_are_refused_on_write_and_on_read(table, entries):
    with pytest.raises(ValueError, match="entr"):
        strategy.record(entries)
    table.write_text(json.dumps({"version": strategy.TABLE_VERSION, "entries": entries}))
    with pytest.raises(ValueError, match=str(table.name)):
        strategy.load_table()


def test_a_table_of_another_version_or_not_json_is_refused(table):
    table.write_text(json.dumps({"version": 99, "entries": {}}))
    with pytest.raises(ValueError, match="version"):
        strategy.load_table()
    table.write_text("{not json")
    strategy.load_table.cache_clear()
    with pytest.raises(ValueError, match="not a valid strategy table"):
        strategy.load_table()


def test_roofline_counts_and_choices():
    h100 = roofline.DEVICES["h100-sxm"]
    M, K, N, R = 8192, 3584, 4096, 16
    base = roofline.lora_launches("base", M, K, N, R)
    # two GEMMs of 2MNK FLOP, each reading both operands and writing its output once (bf16)
    assert [x.flops for x in base] == [2.0 * M * N * K] * 2
    assert base[0].bytes == 2 * (M * K + N * K + M * N)
    fused = roofline.total_seconds(roofline.lora_launches("fused", M, K, N, R), h100)
    cublas = roofline.total_seconds(roofline.lora_launches("cublas", M, K, N, R), h100)
    peft = roofline.total_seconds(roofline.lora_launches("peft", M, K, N, R), h100)
    assert roofline.total_seconds(base, h100) < fused < cublas < peft
    assert roofline.best_strategy("lora_linear", h100, M=M, K=K, N=N, R=R) == "fused"
    # a launch is bound by whichever of its three terms is slowest
    launch = roofline.Launch("x", flops=0.0, bytes=h100.bandwidth, alu=0.0)
    assert launch.seconds(h100) == pytest.approx(1.0)
    sae = {"T": 65536, "d": 3584, "F": 16384}
    assert roofline.best_strategy("sae_feature_stats", h100, **sae) in roofline.SAE_STRATEGIES
    assert roofline.chunk_tokens(16384) * 4 * 16384 <= roofline.DEFAULT_MAX_CHUNK_BYTES
    with pytest.raises(ValueError, match="provider"):
        roofline.lora_launches("nope", M, K, N, R)


def test_roofline_prices_fp32_adapters_for_both_sides():
    """fp32 adapters over a bf16 base: the fused rank-r dots cost 3xTF32 (six bf16 FLOPs of time each)
    and xa / g / A / B move as fp32; PEFT runs its adapter GEMMs in IEEE fp32 on the CUDA cores and
    adds fp32 [M, N] passes. Both get slower, PEFT far more."""
    h100 = roofline.DEVICES["h100-sxm"]
    M, K, N, R = 8192, 3584, 4096, 16
    xa16, xa32 = (
        roofline.lora_launches("fused", M, K, N, R)[0],
        roofline.lora_launches("fused", M, K, N, R, a=4)[0],
    )
    assert xa32.flops == roofline.TF32X3_COST * xa16.flops
    assert xa32.bytes - xa16.bytes == 2 * (R * K + M * R)
    peft32 = roofline.lora_launches("peft", M, K, N, R, a=4)
    assert sum(x.alu for x in peft32) == 2.0 * M * R * (K + N) * 3  # six fp32 GEMMs: fwd 2, bwd 4
    t = lambda provider, **a: roofline.total_seconds(roofline.lora_launches(provider, M, K, N, R, **a), h100)
    assert t("fused") < t("fused", a=4) < 1.1 * t("fused")
    assert t("peft", a=4) - t("peft") > 10 * (t("fused", a=4) - t("fused"))
    # the QLoRA providers carry the adapter size through
    q = lambda provider, **a: roofline.total_seconds(roofline.qlora_launches(provider, M, K, N, R, **a), h100)
    assert q("fused", a=4) > q("fused") and q("peft_bnb", a=4) > q("peft_bnb")


def test_device_for_maps_capabilities_to_the_table():
    assert roofline.device_for(90, "NVIDIA H200").name == "H200"
    assert roofline.device_for(90, "NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert roofline.device_for(89).name == "RTX 4090"
    assert roofline.device_for(86).name == "RTX 3090"
    assert roofline.device_for(80).name == "A100 SXM"


def test_token_bucket_keys_autotuning_by_power_of_two():
    assert [_triton.token_bucket(m) for m in (1, 16, 17, 3000, 4096, 4097, 10**6)] == [
        16, 16, 32, 4096, 4096, 8192, 8192,
    ]  # fmt: skip


def test_gpu_autotuners_key_on_the_bucket_and_cache_timings():
    """Outside the interpreter the GEMM kernels are autotuners keyed on M_BUCKET (never M), with the
    disk cache on: a new batch length in the same bucket re-uses the tuning, across processes too."""
    script = (
        "import triton\n"
        "from sails_fast.kernels import lora, lora_rank, nf4\n"
        "for k in (lora._lora_fwd_kernel, lora._lora_bwd_dx_kernel, lora_rank._rank_projection_kernel,\n"
        "          lora_rank._weight_grad_kernel, nf4._qlora_fwd_kernel, nf4._qlora_bwd_dx_kernel):\n"
        "    assert type(k).__name__ == 'Autotuner', type(k)\n"
        "    assert 'M_BUCKET' in k.keys and 'M' not in k.keys, k.keys\n"
        "    assert k.cache_results, 'autotune disk cache off'\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("arch", [90, 89, 86, 80])
def test_gemm_configs_are_pruned_to_the_gpus_shared_memory(arch):
    """Per target GPU the launcher keeps only tiles whose pipelined buffers fit its per-block shared
    memory (the audit checks the compiled kernels against the same limits)."""
    from sails_fast.kernels import _gemm

    configs = _gemm.matmul_configs()
    prune = _gemm.matmul_pruner("BLOCK_K", "x_ptr")
    bf16 = torch.empty(1, dtype=torch.bfloat16)
    args = {"x_ptr": bf16, "xa_ptr": bf16, "M_BUCKET": 8192, "N": 4096, "BLOCK_R": 16}
    target = _triton.TARGETS[arch]
    with _triton.simulate_target(target):
        kept = prune(configs, args)
    assert kept
    for c in kept:
        k = c.kwargs
        smem = (
            c.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * 2
            + (k["BLOCK_M"] + k["BLOCK_N"]) * 16 * 2
        )
        assert smem <= target.smem_per_block, (arch, k, smem)
    widest = [c for c in kept if c.kwargs["BLOCK_N"] == 256]
    assert bool(widest) == (target.smem_per_block >= 160 * 1024), "the 147 KB 128x256 tile is for A100/H100"
    # fp32 operands get the small FMA-dot tiles, whatever the GPU
    fp32 = torch.empty(1, dtype=torch.float32)
    with _triton.simulate_target(target):
        assert all(c.kwargs["BLOCK_K"] == 32 for c in prune(configs, {**args, "x_ptr": fp32, "xa_ptr": fp32}))
        # fp32 adapters over a bf16 base: at most 64 accumulator elements per thread
        for c in prune(configs, {**args, "xa_ptr": fp32}):
            assert c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps, c


@pytest.mark.parametrize("arch", [90, 89, 86, 80])
def test_weight_grad_keeps_small_per_thread_tiles_for_fp32_adapters(arch):
    """dA = g^T x with g in fp32 (fp32 adapters): the x tile, dropout-scaled and split for 3xTF32, spilled
    at 32 x 128 over 4 warps on sm_89 (kernel audit); the pruner keeps at most 16 of its elements per
    thread, and leaves the 16-bit configs alone."""
    from sails_fast.kernels import lora_rank

    prune = lora_rank._weight_grad_pruner()
    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1, dtype=torch.float32)
    args = {"l_ptr": bf16, "r_ptr": bf16, "M_BUCKET": 8192, "BLOCK_P": 16, "BLOCK_Q": 128}
    with _triton.simulate_target(_triton.TARGETS[arch]):
        sixteen_bit = prune(lora_rank._WGRAD_CONFIGS, args)
        fp32_adapter = prune(lora_rank._WGRAD_CONFIGS, {**args, "l_ptr": fp32})
    assert len(sixteen_bit) > len(fp32_adapter) >= 1
    for c in fp32_adapter:
        assert c.kwargs["BLOCK_M"] * 128 <= 16 * 32 * c.num_warps, c


def test_benchmarks_turn_their_rows_into_table_entries():
    """The GPU benchmarks' --write-strategy-table: the faster strategy per case, keyed like "auto" looks
    it up; refused on a CPU run (a CPU timing says nothing about a GPU)."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_lora
    from _common import Row, write_strategy_table

    def row(provider, ms, mode="fwd+bwd"):
        return Row("lora_linear", "gemma-2-9b", "q_proj", "M=8192 K=3584 N=4096 r=16", "bfloat16",
                   provider, mode, ms, ms, ms)  # fmt: skip

    rows = [row("base", 1.0), row("sails_fast:fused", 1.2), row("sails_fast:cublas", 1.1),
            row("sails_fast:fused", 0.1, mode="fwd")]  # fmt: skip
    assert bench_lora.strategy_choices(rows, 16) == {"M8192_K3584_N4096_R16": "cublas"}
    with pytest.raises(SystemExit, match="CPU"):
        write_strategy_table("lora_linear", {"M8192_K3584_N4096_R16": "cublas"}, "cpu")
