"""sails_fast: fused Triton kernels and the SAILS safety-alignment pipeline.

Stable public API (everything else is internal and may move):
"""

from .lora import FusedLoraLinear, lora_linear
from .sae import SAEWeights, load_sae
from .sae_stats import sae_feature_stats
from .stats import FeatureStats

__version__ = "0.1.0"

__all__ = [
    "FusedLoraLinear",
    "lora_linear",
    "SAEWeights",
    "load_sae",
    "sae_feature_stats",
    "FeatureStats",
    "__version__",
]
