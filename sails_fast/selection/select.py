"""Step 4: score SAE features by how differently they fire on aligned and unaligned data; keep the top k.

Scores (METHOD.md step 3), per feature i, with E_c the class-c weighted mean activation from FeatureStats
(row ALIGNED = 0, row UNALIGNED = 1):

    mean_diff  D_i   = E_aligned[a_i] - E_unaligned[a_i]
    relative   rho_i = D_i / max(E_unaligned[|a_i|], eps)       (paper v1; a >= 0, so E|a| = E a)
    abs_diff   |D_i|
    t_stat     t_i   = D_i / max(sqrt(s2_aligned / n_aligned + s2_unaligned / n_unaligned), eps)   (Welch)

For t_stat, n_c is the class's total token weight (`FeatureStats.weight_sum`): the number of examples
under per-example mean pooling (token weight 1 / len(response)), the number of tokens under weight 1.
s2_c = var_c * n_c / (n_c - 1) is the Bessel-corrected weighted variance (needs n_c > 1). Under per-example
pooling var_c is the token-level variance (examples weighted equally), which by the law of total variance
is at least the variance of the per-example means: the t here is conservative (never larger in magnitude
than a t over per-example means would be), and it ranks features, it is not a calibrated test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sails_fast.core.artifacts import load_artifact, save_artifact
from sails_fast.core.feature_stats import ALIGNED, CLASS_NAMES, NUM_CLASSES, UNALIGNED, FeatureStats
from sails_fast.selection.config import SelectConfig

KIND = "sails_fast.FeatureSelection"


@dataclass
class LayerSelection:
    """The features kept at one SAE layer, best first (k kept out of `num_features`).

    Attributes:
        ids [k] int64: SAE latent indices.
        scores [k] fp32: the signed score (as defined by `SelectConfig.score`).
        class_means [2, k] fp32: E_c[a] per class (row ALIGNED, row UNALIGNED).
        frequencies [2, k] fp32: share of the class's tokens where the feature is active.
        num_features: the SAE's width F.
    """

    ids: torch.Tensor
    scores: torch.Tensor
    class_means: torch.Tensor
    frequencies: torch.Tensor
    num_features: int

    def __post_init__(self) -> None:
        k = self.ids.shape[0] if self.ids.dim() == 1 else -1
        expected = {
            "ids": ((k,), torch.int64),
            "scores": ((k,), torch.float32),
            "class_means": ((NUM_CLASSES, k), torch.float32),
            "frequencies": ((NUM_CLASSES, k), torch.float32),
        }
        for name, (shape, dtype) in expected.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{name}: expected {list(shape)} {dtype}, got {list(t.shape)} {t.dtype}")
        if k > 0 and (int(self.ids.min()) < 0 or int(self.ids.max()) >= self.num_features):
            raise ValueError(
                f"ids: expected latent indices in [0, {self.num_features}), got {self.ids.tolist()}"
            )


@dataclass
class FeatureSelection:
    """Selected SAE features per layer, with the config that chose them.

    Attributes:
        layers: SAE layer index -> LayerSelection.
        config: the SelectConfig used.

    Example:
        >>> sel = select_features({10: stats10}, SelectConfig(top_k=64))
        >>> sel.layers[10].ids[:5], sel.layers[10].scores[:5]
        >>> sel.save("out/selection"); FeatureSelection.load("out/selection")
    """

    layers: dict[int, LayerSelection]
    config: SelectConfig

    def save(self, path: str | Path, config: dict | None = None) -> None:
        """Write as an artifact (see `sails_fast.core.artifacts`). `config` is the reuse key; by default
        {"select": self.config.to_dict()} (the pipeline passes the upstream sections too)."""
        tensors = {}
        for layer, sel in self.layers.items():
            for name in ("ids", "scores", "class_means", "frequencies"):
                tensors[f"layer{layer}.{name}"] = getattr(sel, name)
        meta = {
            "select": self.config.to_dict(),
            "num_features": {str(layer): sel.num_features for layer, sel in self.layers.items()},
        }
        save_artifact(path, KIND, tensors, config=config or {"select": self.config.to_dict()}, meta=meta)

    @classmethod
    def load(cls, path: str | Path) -> FeatureSelection:
        """Read a selection written by `save`; a damaged file or another kind raises ValueError naming it."""
        art = load_artifact(path, KIND)
        try:
            config = SelectConfig.from_dict(art.meta["select"])
            layers = {}
            for key, width in art.meta["num_features"].items():
                layers[int(key)] = LayerSelection(
                    **{
                        n: art.tensors[f"layer{key}.{n}"]
                        for n in ("ids", "scores", "class_means", "frequencies")
                    },
                    num_features=int(width),
                )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"path: {path} is not a consistent FeatureSelection artifact ({err})") from err
        return cls(layers=layers, config=config)


def _check_stats(layer: int, stats: FeatureStats, config: SelectConfig) -> None:
    where = f"stats[{layer}]"
    if not isinstance(stats, FeatureStats):
        raise ValueError(f"{where}: expected a FeatureStats, got {type(stats).__name__}")
    if stats.num_classes != NUM_CLASSES:
        raise ValueError(
            f"{where}: expected {NUM_CLASSES} classes ({ALIGNED} = aligned, {UNALIGNED} = unaligned), "
            f"got {stats.num_classes}"
        )
    for c in (ALIGNED, UNALIGNED):
        n = float(stats.weight_sum[c])
        if not n > 0:
            raise ValueError(
                f"{where}: class {c} ({CLASS_NAMES[c]}) has no tokens (weight {n}); selection needs both "
                f"classes (an empty or one-class prompt set?)"
            )
        if config.score == "t_stat" and not n > 1:
            raise ValueError(
                f"{where}: class {c} ({CLASS_NAMES[c]}) has total weight {n:.3g} <= 1; score 't_stat' needs "
                f"more than one example per class"
            )
    if config.top_k > stats.num_features:
        raise ValueError(
            f"config.top_k: {config.top_k} is more than the {stats.num_features} features at layer {layer}"
        )


def feature_scores(stats: FeatureStats, config: SelectConfig) -> torch.Tensor:
    """Score every feature of one layer.

    Args:
        stats: FeatureStats with 2 classes (ALIGNED, UNALIGNED) and F features.
        config: SelectConfig (`score`, `eps`).

    Returns:
        [F] fp32 scores, signed for mean_diff / relative / t_stat (positive = fires more on aligned data).

    Example:
        >>> feature_scores(stats, SelectConfig(score="relative"))
    """
    mean = stats.mean().double()
    diff = mean[ALIGNED] - mean[UNALIGNED]
    if config.score == "mean_diff":
        out = diff
    elif config.score == "abs_diff":
        out = diff.abs()
    elif config.score == "relative":
        out = diff / mean[UNALIGNED].clamp_min(config.eps)
    else:
        n = stats.weight_sum.double()[:, None]
        s2 = stats.var().double() * n / (n - 1)
        se = (s2 / n).sum(dim=0).sqrt()
        out = diff / se.clamp_min(config.eps)
    return out.float()


def rank_features(scores: torch.Tensor, direction: str, k: int) -> torch.Tensor:
    """Ids of the k best features, best first: by |score| ("both"), score ("aligned") or -score
    ("unaligned"). Ties go to the lower id (a stable sort), so the result is deterministic."""
    key = {"both": scores.abs(), "aligned": scores, "unaligned": -scores}[direction]
    order = torch.sort(key, descending=True, stable=True).indices
    return order[:k]


def select_features(stats: dict[int, FeatureStats], config: SelectConfig) -> FeatureSelection:
    """Score each layer's SAE features and keep the top `config.top_k` per layer.

    Ranking direction: "both" ranks by |score|, so features firing more on aligned data and features
    firing more on unaligned data both count; "aligned" keeps the largest scores; "unaligned" the most
    negative. Note "relative" is asymmetric: a feature silent on unaligned data gets D / eps, one silent
    on aligned data at most -1, so with "both" it favours aligned-firing features (the paper's choice).

    Args:
        stats: SAE layer index -> FeatureStats with 2 classes, [2, F] accumulators (F may differ per layer).
        config: SelectConfig.

    Returns:
        FeatureSelection: per layer ids [k], scores [k], class_means [2, k], frequencies [2, k].

    Raises:
        ValueError: no layers, a layer that is not an int >= 0, a class with no tokens, top_k > F.

    Example:
        >>> sel = select_features({5: stats5, 10: stats10}, SelectConfig(score="t_stat", top_k=64))
        >>> sel.layers[5].ids  # [64] latent ids at layer 5, best first
    """
    if not isinstance(config, SelectConfig):
        raise ValueError(f"config: expected a SelectConfig, got {type(config).__name__}")
    if not isinstance(stats, dict) or not stats:
        raise ValueError("stats: expected a non-empty dict {layer index: FeatureStats}")
    layers = {}
    for layer in sorted(stats):
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise ValueError(f"stats: layer keys must be ints >= 0, got {layer!r}")
        st = stats[layer]
        _check_stats(layer, st, config)
        st = st.to("cpu")
        scores = feature_scores(st, config)
        ids = rank_features(scores, config.direction, config.top_k)
        layers[layer] = LayerSelection(
            ids=ids.to(torch.int64),
            scores=scores[ids].contiguous(),
            class_means=st.mean()[:, ids].float().contiguous(),
            frequencies=st.frequency()[:, ids].float().contiguous(),
            num_features=st.num_features,
        )
    return FeatureSelection(layers=layers, config=config)
