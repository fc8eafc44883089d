"""Feature selection on hand-made FeatureStats with answers worked out by hand."""

import pytest
import torch

from sails_fast.core.feature_stats import ALIGNED, UNALIGNED, FeatureStats
from sails_fast.selection.config import SelectConfig
from sails_fast.selection.select import FeatureSelection, feature_scores, select_features

# five features, five examples per class (weight 1 per example), so for Welch's t
# s2 / n = var * n / (n - 1) / n = var / 4 and se = sqrt(var_a + var_u) / 2
MEAN_A = [0.5, 0.0, 2.0, 1.0, 0.3]
MEAN_U = [0.0, 1.0, 1.0, 1.0, 0.0]
VAR_A = [0.25, 0.0, 2.0, 0.5, 0.0036]
VAR_U = [0.0, 0.16, 2.0, 0.5, 0.0]
# D = [0.5, -1, 1, 0, 0.3]; se = [0.25, 0.2, 1, 0.5, 0.03]; t = [2, -5, 1, 0, 10]
ACTIVE = [[2, 0, 5, 5, 1], [0, 4, 5, 5, 0]]
TOKENS = [10, 20]


def _stats(mean_a=MEAN_A, mean_u=MEAN_U, var_a=VAR_A, var_u=VAR_U, weights=(5.0, 5.0)) -> FeatureStats:
    st = FeatureStats.empty(num_classes=2, num_features=len(mean_a))
    mean = torch.tensor([mean_a, mean_u], dtype=torch.float64)
    var = torch.tensor([var_a, var_u], dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)[:, None]
    st.weight_sum.copy_(w[:, 0])
    st.token_count.copy_(torch.tensor(TOKENS))
    st.act_sum.copy_(mean * w)
    st.act_sq_sum.copy_((var + mean**2) * w)
    st.active_count[:, :5] = torch.tensor(ACTIVE)
    st.act_max.copy_(mean * 3)
    st.act_argmax.zero_()
    return st


@pytest.mark.parametrize(
    "score, direction, k, ids, scores",
    [
        # |D| = [.5, 1, 1, 0, .3]: the 1-1 tie between features 1 and 2 goes to the lower id
        ("mean_diff", "both", 3, [1, 2, 0], [-1.0, 1.0, 0.5]),
        ("mean_diff", "aligned", 3, [2, 0, 4], [1.0, 0.5, 0.3]),
        ("mean_diff", "unaligned", 2, [1, 3], [-1.0, 0.0]),
        ("abs_diff", "both", 3, [1, 2, 0], [1.0, 1.0, 0.5]),
        # rho = D / max(E_u, eps) with eps = 1e-3: [500, -1, 1, 0, 300]
        ("relative", "both", 3, [0, 4, 1], [500.0, 300.0, -1.0]),
        ("relative", "unaligned", 1, [1], [-1.0]),
        # t = [2, -5, 1, 0, 10]
        ("t_stat", "both", 3, [4, 1, 0], [10.0, -5.0, 2.0]),
        ("t_stat", "aligned", 3, [4, 0, 2], [10.0, 2.0, 1.0]),
        ("t_stat", "unaligned", 1, [1], [-5.0]),
    ],
)
def test_hand_computed(score, direction, k, ids, scores):
    cfg = SelectConfig(score=score, direction=direction, top_k=k, eps=1e-3)
    sel = select_features({3: _stats()}, cfg)
    got = sel.layers[3]
    assert got.ids.tolist() == ids
    torch.testing.assert_close(got.scores, torch.tensor(scores), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.class_means[ALIGNED], torch.tensor(MEAN_A)[ids])
    torch.testing.assert_close(got.class_means[UNALIGNED], torch.tensor(MEAN_U)[ids])
    freq = torch.tensor(ACTIVE, dtype=torch.float32) / torch.tensor(TOKENS, dtype=torch.float32)[:, None]
    torch.testing.assert_close(got.frequencies, freq[:, ids])
    assert got.num_features == 5 and sel.config == cfg


def test_t_stat_depends_on_counts():
    # the same means and variances with 4x the examples: t doubles (se ~ 1 / sqrt(n) up to Bessel)
    small = feature_scores(_stats(weights=(5.0, 5.0)), SelectConfig(score="t_stat"))
    big = feature_scores(_stats(weights=(20.0, 20.0)), SelectConfig(score="t_stat"))
    ratio = (big / small)[[0, 1, 2, 4]]
    expected = torch.tensor(((20 / 19) / (5 / 4)) ** -0.5 * 2).float()
    torch.testing.assert_close(ratio, expected.expand(4), rtol=1e-4, atol=0)


def test_relative_eps_floor():
    # E_u = 0 for features 0 and 4: rho = D / eps
    s = feature_scores(_stats(), SelectConfig(score="relative", eps=0.01))
    torch.testing.assert_close(s, torch.tensor([50.0, -1.0, 1.0, 0.0, 30.0]))


def test_several_layers_and_widths():
    st8 = _stats(MEAN_A + [0.0] * 3, MEAN_U + [4.0] * 3, VAR_A + [0.0] * 3, VAR_U + [0.0] * 3)
    sel = select_features({7: st8, 2: _stats()}, SelectConfig(top_k=2))
    assert list(sel.layers) == [2, 7]
    assert sel.layers[2].ids.tolist() == [1, 2]
    assert sel.layers[7].ids.tolist() == [5, 6] and sel.layers[7].num_features == 8


def test_save_load(tmp_path):
    sel = select_features({3: _stats(), 9: _stats()}, SelectConfig(score="t_stat", top_k=4))
    sel.save(tmp_path / "selection")
    back = FeatureSelection.load(tmp_path / "selection")
    assert back.config == sel.config and list(back.layers) == [3, 9]
    for layer in (3, 9):
        for name in ("ids", "scores", "class_means", "frequencies"):
            assert torch.equal(getattr(back.layers[layer], name), getattr(sel.layers[layer], name))
        assert back.layers[layer].num_features == 5


def test_load_wrong_kind(tmp_path):
    from sails_fast.core.artifacts import save_artifact

    save_artifact(tmp_path / "other", "sails_fast.Subspace", {"x": torch.zeros(1)}, config={})
    with pytest.raises(ValueError, match=r"other\.json.*expected 'sails_fast\.FeatureSelection'"):
        FeatureSelection.load(tmp_path / "other")


def test_bad_input():
    cfg = SelectConfig(top_k=2)
    with pytest.raises(ValueError, match="stats: expected a non-empty dict"):
        select_features({}, cfg)
    with pytest.raises(ValueError, match="layer keys"):
        select_features({"3": _stats()}, cfg)
    with pytest.raises(ValueError, match="config: expected a SelectConfig"):
        select_features({3: _stats()}, {"top_k": 2})
    with pytest.raises(ValueError, match=r"stats\[3\]: expected a FeatureStats"):
        select_features({3: torch.zeros(2, 5)}, cfg)
    with pytest.raises(ValueError, match=r"stats\[3\]: class 1 \(unaligned\) has no tokens"):
        select_features({3: _stats(weights=(5.0, 0.0))}, cfg)
    with pytest.raises(ValueError, match=r"stats\[3\]: class 0 \(aligned\) has no tokens"):
        select_features({3: _stats(weights=(0.0, 5.0))}, cfg)
    with pytest.raises(ValueError, match=r"stats\[3\]: class 0 \(aligned\).*t_stat"):
        select_features({3: _stats(weights=(1.0, 5.0))}, SelectConfig(score="t_stat"))
    with pytest.raises(ValueError, match="top_k: 6 is more than the 5 features at layer 3"):
        select_features({3: _stats()}, SelectConfig(top_k=6))
    with pytest.raises(ValueError, match=r"stats\[3\]: expected 2 classes"):
        select_features({3: FeatureStats.empty(3, 5)}, cfg)
