"""sails_fast: fused Triton kernels and the SAILS safety-alignment pipeline.

Stable public API (everything else is internal and may move):
"""

from .integrations.peft import FuseReport, fuse_lora, is_fused, unfuse_lora
from .lora import FusedLoraLinear, lora_linear
from .nf4 import NF4LoraLinear, NF4Weight, dequantize_nf4, qlora_linear, quantize_model_nf4, quantize_nf4
from .sae import SAEWeights, load_sae
from .sae_stats import sae_feature_stats
from .sails import (
    InitConfig,
    SailsConfig,
    SelectConfig,
    SubspaceConfig,
    build_subspace,
    init_lora_from_subspace,
    select_features,
)
from .sails.collect import CollectConfig, collect_feature_stats, generate_unaligned
from .sails.evaluate import EvalConfig, EvalResult, compare, evaluate, evaluate_before_after
from .sails.refusal import RefusalMatcher
from .sails.report import report
from .sails.train import TrainConfig, load_base_4bit, train
from .stats import FeatureStats

__version__ = "0.1.0"

__all__ = [
    "FusedLoraLinear",
    "lora_linear",
    "fuse_lora",
    "unfuse_lora",
    "is_fused",
    "FuseReport",
    "NF4Weight",
    "NF4LoraLinear",
    "quantize_nf4",
    "dequantize_nf4",
    "qlora_linear",
    "quantize_model_nf4",
    "SAEWeights",
    "load_sae",
    "sae_feature_stats",
    "FeatureStats",
    "SailsConfig",
    "SelectConfig",
    "SubspaceConfig",
    "InitConfig",
    "select_features",
    "build_subspace",
    "init_lora_from_subspace",
    "CollectConfig",
    "collect_feature_stats",
    "generate_unaligned",
    "TrainConfig",
    "train",
    "load_base_4bit",
    "EvalConfig",
    "EvalResult",
    "evaluate",
    "evaluate_before_after",
    "compare",
    "RefusalMatcher",
    "report",
    "__version__",
]
