"""The SAILS pipeline: config, artifacts, feature selection, subspace and LoRA init (steps 4-6).

Steps 3 (`collect_feature_stats`) and 7 (`sails_fast.sails.train.train`) live in `collect.py` and
`train.py`; their configs are re-exported here.
"""

from .artifacts import artifact_matches, artifact_status, load_artifact, save_artifact
from .collect import CollectConfig, collect_feature_stats
from .config import (
    ALIGNED,
    CLASS_NAMES,
    UNALIGNED,
    InitConfig,
    SailsConfig,
    SelectConfig,
    SubspaceConfig,
)
from .init import InitReport, choose_basis_layer, init_lora_from_subspace, make_lora_config
from .select import FeatureSelection, LayerSelection, feature_scores, select_features
from .subspace import POOLED, Subspace, SubspaceBasis, build_subspace
from .train import TrainConfig

__all__ = [
    "ALIGNED",
    "CLASS_NAMES",
    "CollectConfig",
    "POOLED",
    "UNALIGNED",
    "FeatureSelection",
    "InitConfig",
    "InitReport",
    "LayerSelection",
    "SailsConfig",
    "SelectConfig",
    "Subspace",
    "SubspaceBasis",
    "SubspaceConfig",
    "TrainConfig",
    "artifact_matches",
    "artifact_status",
    "build_subspace",
    "choose_basis_layer",
    "collect_feature_stats",
    "feature_scores",
    "init_lora_from_subspace",
    "load_artifact",
    "make_lora_config",
    "save_artifact",
    "select_features",
]
