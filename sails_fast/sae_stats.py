"""Deprecated: moved to `sails_fast.fused.sae_stats` (each name forwards to its new home;
docs/architecture.md)."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "DEFAULT_MAX_CHUNK_BYTES": "sails_fast.fused.roofline",
        "FeatureStats": "sails_fast.core.feature_stats",
        "SAEWeights": "sails_fast.sae.weights",
        "resolve_backend": "sails_fast.fused.backend",
        "sae_feature_stats_ref": "sails_fast.kernels.sae_stats_ref",
    },
    "sails_fast.fused.sae_stats",
)
