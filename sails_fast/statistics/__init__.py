"""Pipeline step "stats": per-class SAE feature statistics over the pairs, streamed through forward hooks
into `FeatureStats` (`collect`).

May import: sails_fast.pairs, sails_fast.sae, sails_fast.models, sails_fast.fused, sails_fast.core.
"""

from sails_fast.statistics.collect import collect_feature_stats

__all__ = ["collect_feature_stats"]
