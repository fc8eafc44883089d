"""Deprecated: moved to `sails_fast.pipeline.run`; names forward to their new homes."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "ALIGNED": "sails_fast.core.feature_stats",
        "CLASS_NAMES": "sails_fast.core.feature_stats",
        "CollectConfig": "sails_fast.pairs.config",
        "FeatureSelection": "sails_fast.selection.select",
        "InitConfig": "sails_fast.lora_init.config",
        "InitReport": "sails_fast.lora_init.init",
        "LayerSelection": "sails_fast.selection.select",
        "POOLED": "sails_fast.subspace.subspace",
        "SailsConfig": "sails_fast.pipeline.config",
        "SelectConfig": "sails_fast.selection.config",
        "Subspace": "sails_fast.subspace.subspace",
        "SubspaceBasis": "sails_fast.subspace.subspace",
        "SubspaceConfig": "sails_fast.subspace.config",
        "TrainConfig": "sails_fast.training.config",
        "UNALIGNED": "sails_fast.core.feature_stats",
        "artifact_matches": "sails_fast.core.artifacts",
        "artifact_status": "sails_fast.core.artifacts",
        "build_subspace": "sails_fast.subspace.subspace",
        "choose_basis_layer": "sails_fast.lora_init.init",
        "collect_feature_stats": "sails_fast.statistics.collect",
        "feature_scores": "sails_fast.selection.select",
        "init_lora_from_subspace": "sails_fast.lora_init.init",
        "load_artifact": "sails_fast.core.artifacts",
        "make_lora_config": "sails_fast.lora_init.init",
        "save_artifact": "sails_fast.core.artifacts",
        "select_features": "sails_fast.selection.select",
    },
    "sails_fast.pipeline.run",
)
