"""sails_fast: fused Triton kernels and the SAILS safety-alignment pipeline.

Stable public API (everything else is internal and may move):
"""

from sails_fast.core.feature_stats import FeatureStats
from sails_fast.core.version import __version__
from sails_fast.evaluation.config import EvalConfig
from sails_fast.evaluation.refusal import RefusalMatcher
from sails_fast.evaluation.results import EvalResult, compare
from sails_fast.evaluation.run import evaluate, evaluate_before_after
from sails_fast.fused.lora import FusedLoraLinear, lora_linear
from sails_fast.fused.nf4 import NF4LoraLinear, qlora_linear, quantize_model_nf4
from sails_fast.fused.nf4_weight import NF4Weight, dequantize_nf4, quantize_nf4
from sails_fast.fused.sae_stats import sae_feature_stats
from sails_fast.lora_init.config import InitConfig
from sails_fast.lora_init.init import init_lora_from_subspace
from sails_fast.models.loading import load_base_4bit
from sails_fast.pairs.config import CollectConfig
from sails_fast.pairs.generation import generate_unaligned
from sails_fast.pipeline.config import SailsConfig
from sails_fast.report.html import report
from sails_fast.sae.weights import SAEWeights, load_sae
from sails_fast.selection.config import SelectConfig
from sails_fast.selection.select import select_features
from sails_fast.statistics.collect import collect_feature_stats
from sails_fast.subspace.config import SubspaceConfig
from sails_fast.subspace.subspace import build_subspace
from sails_fast.training.config import TrainConfig
from sails_fast.training.loop import train

from .integrations.peft import FuseReport, fuse_lora, is_fused, unfuse_lora

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
