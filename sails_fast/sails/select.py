"""Deprecated: moved to `sails_fast.selection.select` (each name forwards to its new home;
docs/architecture.md)."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "ALIGNED": "sails_fast.core.feature_stats",
        "CLASS_NAMES": "sails_fast.core.feature_stats",
        "FeatureStats": "sails_fast.core.feature_stats",
        "NUM_CLASSES": "sails_fast.core.feature_stats",
        "SelectConfig": "sails_fast.selection.config",
        "UNALIGNED": "sails_fast.core.feature_stats",
        "load_artifact": "sails_fast.core.artifacts",
        "save_artifact": "sails_fast.core.artifacts",
    },
    "sails_fast.selection.select",
)
