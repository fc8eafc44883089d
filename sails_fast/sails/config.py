"""Deprecated: moved to `sails_fast.pipeline.config` (each name forwards to its new home;
docs/architecture.md)."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "ALIGNED": "sails_fast.core.feature_stats",
        "BasisRule": "sails_fast.subspace.config",
        "CLASS_NAMES": "sails_fast.core.feature_stats",
        "CollectConfig": "sails_fast.pairs.config",
        "DEFAULT_READ_MODULES": "sails_fast.lora_init.config",
        "DEFAULT_WRITE_MODULES": "sails_fast.lora_init.config",
        "DimMismatch": "sails_fast.lora_init.config",
        "Direction": "sails_fast.selection.config",
        "InitConfig": "sails_fast.lora_init.config",
        "NUM_CLASSES": "sails_fast.core.feature_stats",
        "ScoreName": "sails_fast.selection.config",
        "SelectConfig": "sails_fast.selection.config",
        "SubspaceConfig": "sails_fast.subspace.config",
        "TrainConfig": "sails_fast.training.config",
        "UNALIGNED": "sails_fast.core.feature_stats",
        "WriteSideA": "sails_fast.lora_init.config",
        "_check_names": "sails_fast.core.config",
        "_is_int": "sails_fast.core.config",
        "_is_number": "sails_fast.core.config",
    },
    "sails_fast.pipeline.config",
)
