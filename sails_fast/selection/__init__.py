"""Pipeline step "select": score every SAE feature from its class statistics and keep the top ones per layer
(`config`: SelectConfig; `select`: scores, ranking, FeatureSelection).

May import: sails_fast.core.
"""

from sails_fast.selection.config import SelectConfig
from sails_fast.selection.select import FeatureSelection, LayerSelection, feature_scores, select_features

__all__ = ["FeatureSelection", "LayerSelection", "SelectConfig", "feature_scores", "select_features"]
