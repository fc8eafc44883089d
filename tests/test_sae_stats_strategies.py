"""SAE statistics: the "chunked" strategy (torch GEMM + Triton reduction) and the fused kernel's GPU
launch logic (token chunks with an input pass, TopK candidate groups, L2-grouped program order),
checked against SAELens under the interpreter.

The GPU grid depends on the device (SM count, L2 size); `simulate_target` makes the launchers plan for
a GPU, with a deliberately tiny L2 where the grouped order must wrap, so those paths run here too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_sae_stats import check_stats, make_labels, make_weights, sae_lens_oracle
from test_sae_weights import make_sae_lens, make_x

from sails_fast import FeatureStats, SAEWeights, sae_feature_stats
from sails_fast.kernels import _triton
from sails_fast.kernels import sae_stats as KS
from sails_fast.kernels import sae_stats_chunked as KC

ARCHS = ["standard", "jumprelu", "topk"]
C = 3


def _as_oracle(stats: FeatureStats) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in stats.tensors().items()}


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_matches_sae_lens_across_chunks(arch, deterministic):
    # 37 tokens in chunks of 5 (the fp32 [5, 600] buffer is 12000 bytes): maxima and their first
    # tokens must carry across chunk boundaries, and every chunk adds to the same accumulators
    d, F, T = 64, 600, 37
    sae_lens = make_sae_lens(arch, d, F, apply_b_dec=arch != "jumprelu", k=8)
    sae = SAEWeights.from_sae_lens(sae_lens)
    x, labels, w = make_x(T, d), make_labels(T, C), make_weights(T)
    x[30] = x[2]  # a tie across chunks: token 2 must win
    labels[30] = labels[2]
    stats = sae_feature_stats(
        x, sae, labels, token_weights=w, num_classes=C, backend="triton", strategy="chunked",
        max_chunk_bytes=4 * F * 5, deterministic=deterministic,
    )  # fmt: skip
    check_stats(stats, sae_lens_oracle(sae_lens, x, labels, w, C))


def test_chunked_never_holds_more_than_a_chunk(monkeypatch):
    """The chunked strategy's GEMM output is [T_c, F] with 4 * T_c * F <= max_chunk_bytes: memory
    O(chunk x F), never O(T x F)."""
    shapes = []
    encode = KC.encode_fp32
    monkeypatch.setattr(KC, "encode_fp32", lambda x, sae: shapes.append(tuple(x.shape)) or encode(x, sae))
    sae = SAEWeights.from_sae_lens(make_sae_lens("standard", 32, 100))
    limit = 4 * 100 * 7
    sae_feature_stats(
        make_x(50, 32), sae, make_labels(50, 2), backend="triton", strategy="chunked", max_chunk_bytes=limit
    )
    assert sum(t for t, _ in shapes) == 50 and len(shapes) == 8
    assert all(4 * t * 100 <= limit for t, _ in shapes)


@pytest.mark.parametrize("strategy", ["fused", "chunked"])
def test_strategies_agree_on_a_bf16_sae(strategy):
    sae = SAEWeights.from_sae_lens(make_sae_lens("jumprelu", 64, 300, k=8)).to(dtype=torch.bfloat16)
    x, labels, w = make_x(50, 64).to(torch.bfloat16), make_labels(50, C), make_weights(50)
    ours = sae_feature_stats(
        x, sae, labels, token_weights=w, num_classes=C, backend="triton", strategy=strategy
    )
    ref = sae_feature_stats(x, sae, labels, token_weights=w, num_classes=C, backend="torch")
    check_stats(ours, _as_oracle(ref))


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_input_pass_in_chunks(arch, monkeypatch):
    """fp32 activations into a bf16-exact SAE with b_dec subtracted: the input pass runs per chunk of
    whole deterministic splits (shrunk here to 64 tokens); argmax indices stay global."""
    monkeypatch.setattr(KS, "DETERMINISTIC_ROWS_PER_SPLIT", 64)
    monkeypatch.setattr(KS, "FUSED_INPUT_CHUNK_BYTES", 64 * 64 * 4)
    d, F, T = 64, 300, 150
    sae_lens = make_sae_lens(arch, d, F, apply_b_dec=True, k=8)
    sae = SAEWeights.from_sae_lens(sae_lens)
    x, labels, w = make_x(T, d), make_labels(T, C), make_weights(T)
    x[140], labels[140] = x[3], labels[3]
    for deterministic in (False, True):
        stats = sae_feature_stats(
            x, sae, labels, token_weights=w, num_classes=C, backend="triton", strategy="fused",
            deterministic=deterministic,
        )  # fmt: skip
        check_stats(stats, sae_lens_oracle(sae_lens, x, labels, w, C))


def test_input_pass_rounds_like_sae_lens():
    """x (fp32) -> SAE dtype -> minus b_dec in that dtype: the same bits as SAELens' process_sae_in."""
    g = torch.Generator().manual_seed(0)
    sae = SAEWeights(
        W_enc=torch.randn(64, 32, generator=g), b_enc=torch.zeros(32), W_dec=torch.randn(32, 64, generator=g),
        b_dec=torch.randn(64, generator=g),
    ).to(dtype=torch.bfloat16)  # fmt: skip
    x = torch.randn(37, 64, generator=g)
    ours = KS.sae_input(x, sae)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, x.to(torch.bfloat16) - sae.b_dec)
    gemma_style = dataclasses.replace(sae, apply_b_dec_to_input=False)
    same = x.to(torch.bfloat16)
    assert KS.sae_input(same, gemma_style) is same, "nothing to do: no copy"


def _tiny_l2_gpu(slices: int) -> _triton.Target:
    """An H100 whose L2 holds `slices` W_enc slices in half of it (so the grouped order wraps)."""
    cfg = KS.fused_config(64, torch.float32)
    slice_bytes = cfg["BLOCK_F"] * 64 * 4
    return dataclasses.replace(_triton.TARGETS[90], l2_bytes=2 * slices * slice_bytes)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_grid_planned_for_a_gpu(arch):
    """The launch a 132-SM GPU gets: several token splits, latent slices in groups of 2 over 9 slices
    (the last group partial), and for TopK several candidate groups per row, merged by torch.topk."""
    d, F, T = 64, 9 * 256, 600
    sae_lens = make_sae_lens(arch, d, F, apply_b_dec=arch != "jumprelu", k=8)
    sae = SAEWeights.from_sae_lens(sae_lens)
    x, labels, w = make_x(T, d), make_labels(T, C), make_weights(T)
    with _triton.simulate_target(_tiny_l2_gpu(slices=2)):
        cfg = KS.fused_config(T, sae.dtype, 8)
        tiles_f = -(-F // cfg["BLOCK_F"])
        _, n_splits = KS._splits(T, tiles_f, cfg["BLOCK_T"], x.device, False, None)
        assert tiles_f == 9 and n_splits >= 1
        stats = sae_feature_stats(
            x, sae, labels, token_weights=w, num_classes=C, backend="triton", strategy="fused"
        )
    check_stats(stats, sae_lens_oracle(sae_lens, x, labels, w, C))


def test_topk_candidates_from_several_latent_groups():
    """The k-th largest pre-activation from per-group candidates equals torch.topk over whole rows."""
    d, F, T, k = 64, 8 * 256, 40, 16
    sae = SAEWeights.from_sae_lens(make_sae_lens("topk", d, F, k=k))
    x = KS.sae_input(make_x(T, d), sae)
    with _triton.simulate_target(_triton.TARGETS[90]):
        cfg = KS.fused_config(T, sae.dtype, k)
        kth = KS.topk_thresholds(x, sae, cfg)
    pre = x @ sae.W_enc + sae.b_enc
    assert torch.equal(kth, torch.topk(pre, k, dim=1).values[:, -1])


@pytest.mark.parametrize(
    ("change", "name"), [({"strategy": "cublas"}, "strategy"), ({"max_chunk_bytes": 0}, "max_chunk_bytes")]
)
def test_bad_strategy_arguments_name_the_argument(change, name):
    sae = SAEWeights.from_sae_lens(make_sae_lens("standard", 32, 40))
    with pytest.raises(ValueError, match=f"^{name}:"):
        sae_feature_stats(make_x(10, 32), sae, make_labels(10, 2), **change)


def test_auto_runs_the_strategy_the_table_or_roofline_picks():
    from sails_fast.fused import strategy

    sae = SAEWeights.from_sae_lens(make_sae_lens("standard", 64, 300))
    x, labels = make_x(20, 64), make_labels(20, 2)
    chosen = strategy.choose("sae_feature_stats", x.device, T=20, d=64, F=300)
    auto = sae_feature_stats(x, sae, labels, backend="triton")
    explicit = sae_feature_stats(x, sae, labels, backend="triton", strategy=chosen)
    check_stats(auto, _as_oracle(explicit), rtol=0.0)
