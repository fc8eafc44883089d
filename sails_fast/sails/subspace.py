"""Deprecated: moved to `sails_fast.subspace.subspace` (each name forwards to its new home;
docs/architecture.md)."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "FeatureSelection": "sails_fast.selection.select",
        "SubspaceConfig": "sails_fast.subspace.config",
        "load_artifact": "sails_fast.core.artifacts",
        "save_artifact": "sails_fast.core.artifacts",
    },
    "sails_fast.subspace.subspace",
)
