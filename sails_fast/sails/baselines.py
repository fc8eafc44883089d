"""Deprecated: moved to `sails_fast.study.baselines` (each name forwards to its new home;
docs/architecture.md)."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "ALIGNED": "sails_fast.statistics.collect",
        "CollectConfig": "sails_fast.pairs.config",
        "Subspace": "sails_fast.subspace.subspace",
        "SubspaceBasis": "sails_fast.subspace.subspace",
        "SubspaceConfig": "sails_fast.subspace.config",
        "UNALIGNED": "sails_fast.statistics.collect",
        "_batch": "sails_fast.statistics.collect",
        "_examples": "sails_fast.statistics.collect",
        "complete_basis": "sails_fast.study.theory_estimators",
        "decoder_layers": "sails_fast.models.hooks",
        "diff_of_means_direction": "sails_fast.study.theory_estimators",
        "pca_of_differences": "sails_fast.study.theory_estimators",
        "tokenize_example": "sails_fast.pairs.tokenize",
    },
    "sails_fast.study.baselines",
)
