"""Training SAEs: `activations` (a model's residual stream at one layer, for a list of texts),
`training` (fit an SAE on them with SAELens' trainer; metrics; the cached training artifact) and `embedded`
(the embedded default model's SAEs, trained once from packaged texts and cached).

May import: sails_fast.sae, sails_fast.models, sails_fast.data, sails_fast.core.
"""

from sails_fast.sae_training.activations import collect_residual_activations
from sails_fast.sae_training.embedded import (
    DEFAULT_TEXTS_VERSION,
    EmbeddedSAE,
    default_sae_texts,
    embedded_sae,
)
from sails_fast.sae_training.training import (
    ARCHITECTURES,
    ARTIFACT_VERSION,
    Architecture,
    SAETrainingConfig,
    fit_sae,
    sae_metrics,
    select_texts,
    texts_fingerprint,
    train_sae,
)

__all__ = [
    "ARCHITECTURES",
    "ARTIFACT_VERSION",
    "Architecture",
    "DEFAULT_TEXTS_VERSION",
    "EmbeddedSAE",
    "SAETrainingConfig",
    "collect_residual_activations",
    "default_sae_texts",
    "embedded_sae",
    "fit_sae",
    "sae_metrics",
    "select_texts",
    "texts_fingerprint",
    "train_sae",
]
