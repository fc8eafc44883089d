"""FeatureStats: merge equals one big batch, mean/var/frequency, save/load, all_reduce across 2 ranks."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from test_sae_weights import grid

from sails_fast import FeatureStats, SAEWeights, sae_feature_stats


def _setup(T=60, d=16, F=24, seed=0):
    # exact grids: pre-activations do not depend on how the GEMM splits the rows, so maxima compare exactly
    g = torch.Generator().manual_seed(seed)
    sae = SAEWeights(
        W_enc=grid((d, F), 2**-10, -0.25, 0.25, g),
        b_enc=grid((F,), 2**-16, -0.5, 0.5, g),
        W_dec=torch.randn(F, d, generator=g),
        b_dec=grid((d,), 2**-6, -0.5, 0.5, g),
    )
    x = grid((T, d), 2**-6, -2.0, 2.0, g)
    labels = torch.randint(-1, 2, (T,), generator=g)
    w = torch.rand(T, generator=g)
    return sae, x, labels, w


def _stats(sae, x, labels, w):
    return sae_feature_stats(x, sae, labels, token_weights=w, backend="torch")


def _assert_equal(a: FeatureStats, b: FeatureStats, exact_sums: bool = False):
    assert a.tokens_seen == b.tokens_seen
    for name, t in a.tensors().items():
        u = b.tensors()[name]
        if t.is_floating_point() and not exact_sums and name not in ("act_max",):
            torch.testing.assert_close(t, u, rtol=1e-6, atol=0.0, msg=name)
        else:
            assert torch.equal(t, u), name


def test_merge_equals_one_big_batch():
    sae, x, labels, w = _setup()
    whole = _stats(sae, x, labels, w)
    a = _stats(sae, x[:25], labels[:25], w[:25])
    b = _stats(sae, x[25:], labels[25:], w[25:])
    assert a.merge(b) is a
    _assert_equal(a, whole)
    # argmax indices of the second part were shifted by the first part's tokens
    assert (a.act_argmax >= 25).any()


def test_merge_tie_keeps_earlier_token():
    sae, x, labels, w = _setup()
    labels[:] = 0
    x2 = x.clone()
    a = _stats(sae, x, labels, w)
    b = _stats(sae, x2, labels, w)  # the same tokens again: every max ties
    a.merge(b)
    assert (a.act_argmax < 60).all()


def test_merge_rejects_other_shape():
    with pytest.raises(ValueError, match="other"):
        FeatureStats.empty(2, 5).merge(FeatureStats.empty(3, 5))


def test_mean_var_frequency():
    sae, x, labels, w = _setup()
    stats = _stats(sae, x, labels, w)
    acts = sae.encode(x)
    for c in range(2):
        m = labels == c
        wc, a = w[m], acts[m]
        mean = (wc[:, None] * a).sum(0) / wc.sum()
        var = (wc[:, None] * (a - mean) ** 2).sum(0) / wc.sum()
        torch.testing.assert_close(stats.mean()[c], mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.var()[c], var, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.frequency()[c], (a > 0).double().mean(0))


def test_empty_validation():
    with pytest.raises(ValueError, match="num_classes"):
        FeatureStats.empty(0, 4)
    with pytest.raises(ValueError, match="num_features"):
        FeatureStats.empty(2, 0)
    s = FeatureStats.empty(2, 4)
    with pytest.raises(ValueError, match="act_sum"):
        FeatureStats(**{**s.tensors(), "act_sum": torch.zeros(2, 4, dtype=torch.float64)})


def test_save_load_round_trip(tmp_path):
    sae, x, labels, w = _setup()
    stats = _stats(sae, x, labels, w)
    path = tmp_path / "stats.safetensors"
    stats.save(path, metadata={"layer": 15})
    back = FeatureStats.load(path)
    _assert_equal(back, stats, exact_sums=True)
    assert FeatureStats.read_metadata(path) == {"layer": 15}


def test_load_corrupted_file_raises(tmp_path):
    sae, x, labels, w = _setup()
    path = tmp_path / "stats.safetensors"
    _stats(sae, x, labels, w).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="path"):
        FeatureStats.load(path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="path"):
        FeatureStats.load(garbage)


def test_load_without_header_raises(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="no FeatureStats header"):
        FeatureStats.load(path)


def _rank_main(rank: int, world: int, init_file: str, result_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    sae, x, labels, w = _setup()
    lo, hi = (0, 25) if rank == 0 else (25, 60)
    stats = sae_feature_stats(x[lo:hi], sae, labels[lo:hi], token_weights=w[lo:hi], backend="torch")
    stats.all_reduce()
    stats.save(os.path.join(result_dir, f"rank{rank}.safetensors"))
    dist.destroy_process_group()


def test_all_reduce_two_gloo_ranks(tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_rank_main, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    sae, x, labels, w = _setup()
    whole = _stats(sae, x, labels, w)
    for rank in range(2):
        _assert_equal(FeatureStats.load(tmp_path / f"rank{rank}.safetensors"), whole)


def test_all_reduce_without_process_group_is_noop():
    s = FeatureStats.empty(2, 3)
    assert s.all_reduce() is s and s.tokens_seen == 0
