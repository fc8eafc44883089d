"""Subspace from decoder rows: orthonormal, equal to hand-computed projectors, threshold, padding, pooling."""

from types import SimpleNamespace

import pytest
import torch

from sails_fast.selection.config import SelectConfig
from sails_fast.selection.select import FeatureSelection, LayerSelection
from sails_fast.subspace.config import SubspaceConfig
from sails_fast.subspace.subspace import POOLED, Subspace, build_subspace, orthonormal_complement


def _selection(ids_per_layer: dict[int, list[int]], num_features: int) -> FeatureSelection:
    layers = {}
    for layer, ids in ids_per_layer.items():
        k = len(ids)
        layers[layer] = LayerSelection(
            ids=torch.tensor(ids, dtype=torch.int64),
            scores=torch.arange(k, 0, -1, dtype=torch.float32),
            class_means=torch.zeros(2, k),
            frequencies=torch.zeros(2, k),
            num_features=num_features,
        )
    return FeatureSelection(
        layers=layers, config=SelectConfig(top_k=max(len(i) for i in ids_per_layer.values()))
    )


def _e(i: int, d: int) -> torch.Tensor:
    v = torch.zeros(d)
    v[i] = 1.0
    return v


def _assert_orthonormal(U: torch.Tensor) -> None:
    torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1]), atol=1e-5, rtol=0)


def _hand_sae(d: int = 6):
    # rows 0, 1: e0 with different norms; row 2: 3 * e1; row 3: e2; row 4: e0 + e1 (never selected)
    W_dec = torch.stack([3 * _e(0, d), 0.5 * _e(0, d), 3 * _e(1, d), _e(2, d), _e(0, d) + _e(1, d)])
    return SimpleNamespace(W_dec=W_dec)


def test_hand_computed_projector():
    # unit rows e0, e0, e1: M^T M = diag(2, 1, 0, ...), explained = [2/3, 1/3]
    sae = _hand_sae()
    sel = _selection({4: [0, 1, 2]}, num_features=5)
    sub = build_subspace({4: sae}, sel, SubspaceConfig(variance_threshold=0.8, rank=2))
    b = sub.bases[4]
    assert b.n_components == 2 and b.n_kept == 2 and b.U.shape == (6, 2)
    P = torch.diag(torch.tensor([1.0, 1.0, 0, 0, 0, 0]))
    torch.testing.assert_close(b.U @ b.U.T, P, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.singular_values[:2], torch.tensor([2**0.5, 1.0]))
    torch.testing.assert_close(b.explained[:2], torch.tensor([2 / 3, 1 / 3]))
    assert b.explained_kept == pytest.approx(1.0, abs=1e-6)
    # each column traces back to the features that built it: e0 <- latents 0 and 1, e1 <- latent 2
    torch.testing.assert_close(
        b.loadings.abs(), torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), atol=1e-6, rtol=0
    )
    assert [(layer, i) for layer, i, _ in b.top_features(0, n=2)] == [(4, 0), (4, 1)]
    assert [(layer, i) for layer, i, _ in b.top_features(1, n=1)] == [(4, 2)]
    with pytest.raises(ValueError, match="column"):
        b.top_features(2)
    # unnormalised rows (norms 3, 0.5, 3) would give explained [0.947, 0.053] and r_S = 1 at tau = 0.8
    # one component: the top direction is e0, sign fixed positive
    one = build_subspace({4: sae}, sel, SubspaceConfig(variance_threshold=0.6, rank=1)).bases[4]
    assert one.n_components == 1
    torch.testing.assert_close(one.U[:, 0], _e(0, 6), atol=1e-6, rtol=0)


@pytest.mark.parametrize("tau, r_S", [(0.5, 1), (0.66, 1), (0.67, 2), (0.999, 2), (1.0, 2)])
def test_threshold(tau, r_S):
    sub = build_subspace(
        {4: _hand_sae()}, _selection({4: [0, 1, 2]}, 5), SubspaceConfig(variance_threshold=tau, rank=3)
    )
    b = sub.bases[4]
    assert b.n_components == r_S and b.n_kept == r_S
    _assert_orthonormal(b.U)


def test_padding_is_orthogonal_and_seeded():
    sae = _hand_sae()
    sel = _selection({4: [0, 1, 2]}, 5)
    cfg = SubspaceConfig(variance_threshold=0.8, rank=5, seed=1)
    b = build_subspace({4: sae}, sel, cfg).bases[4]
    assert b.n_components == 2 and b.n_kept == 2 and b.U.shape == (6, 5)
    _assert_orthonormal(b.U)
    # the padding is orthogonal to the kept span(e0, e1): zero in coordinates 0 and 1
    assert b.U[:2, 2:].abs().max() < 1e-6
    torch.testing.assert_close(
        b.U[:, :2] @ b.U[:, :2].T, torch.diag(torch.tensor([1.0, 1, 0, 0, 0, 0])), atol=1e-6, rtol=0
    )
    again = build_subspace({4: sae}, sel, cfg).bases[4]
    assert torch.equal(again.U, b.U)
    other = build_subspace({4: sae}, sel, SubspaceConfig(variance_threshold=0.8, rank=5, seed=2)).bases[4]
    assert torch.equal(other.U[:, :2], b.U[:, :2]) and not torch.allclose(other.U[:, 2:], b.U[:, 2:])


def test_truncation_keeps_top_components():
    g = torch.Generator().manual_seed(0)
    d, F = 40, 300
    W_dec = torch.randn(F, d, generator=g)
    sel = _selection({1: list(range(0, 200, 3))}, F)
    full = build_subspace({1: W_dec}, sel, SubspaceConfig(variance_threshold=0.95, rank=40)).bases[1]
    cut = build_subspace({1: W_dec}, sel, SubspaceConfig(variance_threshold=0.95, rank=8)).bases[1]
    assert full.n_components > 8 and cut.n_components == full.n_components and cut.n_kept == 8
    _assert_orthonormal(cut.U)
    torch.testing.assert_close(cut.U, full.U[:, :8], atol=1e-5, rtol=0)
    # against an independent computation: the top-8 right singular subspace of the normalised rows
    M = W_dec[sel.layers[1].ids].double()
    M = M / M.norm(dim=1, keepdim=True)
    V = torch.linalg.svd(M, full_matrices=False).Vh[:8].T
    torch.testing.assert_close((cut.U @ cut.U.T).double(), V @ V.T, atol=1e-5, rtol=0)
    cum = torch.cumsum(torch.linalg.svdvals(M) ** 2, 0) / (M**2).sum()
    assert int((cum < 0.95).sum()) + 1 == full.n_components
    assert cut.explained_kept == pytest.approx(float(cum[7]), abs=1e-5)


def test_pooled_and_per_layer():
    d = 6
    W_a = torch.stack([_e(0, d), _e(1, d), _e(0, d) + _e(1, d), _e(5, d)])
    W_b = torch.stack([_e(2, d), _e(3, d), _e(2, d), _e(4, d)])
    sel = _selection({2: [0, 1], 7: [0, 1, 2]}, 4)
    per = build_subspace({2: W_a, 7: W_b}, sel, SubspaceConfig(variance_threshold=1.0, rank=3))
    assert sorted(per.bases) == [2, 7] and not per.pooled and per.sae_layers == [2, 7]
    P2 = per.bases[2].U[:, : per.bases[2].n_kept]
    torch.testing.assert_close(P2 @ P2.T, torch.diag(torch.tensor([1.0, 1, 0, 0, 0, 0])), atol=1e-6, rtol=0)
    assert per.bases[7].feature_ids.keys() == {7}
    pooled = build_subspace(
        {2: W_a, 7: W_b}, sel, SubspaceConfig(variance_threshold=1.0, rank=5, pooled=True)
    )
    assert list(pooled.bases) == [POOLED] and pooled.pooled and pooled.sae_layers == [2, 7]
    b = pooled.bases[POOLED]
    assert b.n_components == 4 and b.n_kept == 4
    _assert_orthonormal(b.U)
    Pk = b.U[:, :4]
    torch.testing.assert_close(Pk @ Pk.T, torch.diag(torch.tensor([1.0, 1, 1, 1, 0, 0])), atol=1e-6, rtol=0)
    assert b.feature_ids[2].tolist() == [0, 1] and b.feature_ids[7].tolist() == [0, 1, 2]
    # loadings rows follow the layers in order: layer 2's two features, then layer 7's three
    assert b.loadings.shape == (5, 5)
    M = torch.stack([_e(0, d), _e(1, d), _e(2, d), _e(3, d), _e(2, d)])
    torch.testing.assert_close(b.loadings, M @ b.U, atol=1e-6, rtol=0)
    top = {(layer, i) for layer, i, _ in b.top_features(0, n=2)}
    assert top == {(7, 0), (7, 2)}  # the strongest direction is e2, which two layer-7 features share


def test_save_load(tmp_path):
    g = torch.Generator().manual_seed(0)
    saes = {1: torch.randn(50, 16, generator=g), 3: torch.randn(50, 16, generator=g)}
    sel = _selection({1: [3, 9, 4, 8], 3: [0, 2, 1]}, 50)
    for pooled in (False, True):
        sub = build_subspace(saes, sel, SubspaceConfig(rank=6, pooled=pooled))
        sub.save(tmp_path / "subspace")
        back = Subspace.load(tmp_path / "subspace")
        assert back.config == sub.config and back.d_model == 16 and back.bases.keys() == sub.bases.keys()
        for key, b in sub.bases.items():
            c = back.bases[key]
            assert torch.equal(c.U, b.U) and torch.equal(c.singular_values, b.singular_values)
            assert torch.equal(c.explained, b.explained) and torch.equal(c.loadings, b.loadings)
            assert (c.n_components, c.n_kept) == (b.n_components, b.n_kept)
            assert {k: v.tolist() for k, v in c.feature_ids.items()} == {
                k: v.tolist() for k, v in b.feature_ids.items()
            }


def test_complement():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64, generator=g))
    C = orthonormal_complement(U, 7, torch.Generator().manual_seed(1))
    full = torch.cat([U, C], dim=1)
    torch.testing.assert_close(full.T @ full, torch.eye(10, dtype=torch.float64), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="n: 3 \\+ 8"):
        orthonormal_complement(U, 8, g)


def test_bad_input():
    sae = _hand_sae()
    sel = _selection({4: [0, 1, 2]}, 5)
    cfg = SubspaceConfig(rank=2)
    with pytest.raises(ValueError, match=r"saes: no SAE for selected layer 4"):
        build_subspace({3: sae}, sel, cfg)
    with pytest.raises(ValueError, match=r"saes\[4\]: W_dec has 6 latents but the selection was made over 5"):
        build_subspace({4: torch.randn(6, 6)}, sel, cfg)
    with pytest.raises(ValueError, match=r"saes\[4\]: expected an SAEWeights"):
        build_subspace({4: "sae"}, sel, cfg)
    with pytest.raises(ValueError, match=r"config.rank: 7 exceeds the residual width d = 6"):
        build_subspace({4: sae}, sel, SubspaceConfig(rank=7))
    W = sae.W_dec.clone()
    W[2] = 0
    with pytest.raises(ValueError, match=r"saes\[4\]: selected latents \[2\] have an all-zero decoder row"):
        build_subspace({4: W}, sel, cfg)
    two = _selection({4: [0], 5: [1]}, 5)
    with pytest.raises(ValueError, match=r"saes\[5\]: W_dec width d = 7 differs"):
        build_subspace({4: sae, 5: torch.randn(5, 7)}, two, cfg)
    with pytest.raises(ValueError, match="config: expected a SubspaceConfig"):
        build_subspace({4: sae}, sel, {"rank": 2})
