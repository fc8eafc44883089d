"""The fused ops above the Triton kernels (`sails_fast.kernels`): each a launcher-facing public function with
a plain PyTorch backend, a `torch.autograd.Function` or `torch.library` custom op, and a module where it owns
weights. `lora` (fused LoRA linear), `nf4_weight` + `nf4` (4-bit NF4 base, bit-compatible with
bitsandbytes, and QLoRA), `sae_stats` (streaming SAE encode + per-class statistics), `custom_ops`
(torch.library registrations), `strategy` / `roofline` (which strategy runs, and why), `backend`.

May import: sails_fast.kernels, sails_fast.sae (the SAE weights sae_stats reads), sails_fast.core.
"""

from sails_fast.fused.lora import FusedLoraLinear, lora_linear
from sails_fast.fused.nf4 import NF4LoraLinear, qlora_linear, quantize_model_nf4
from sails_fast.fused.nf4_weight import NF4Weight, dequantize_nf4, quantize_nf4
from sails_fast.fused.sae_stats import sae_feature_stats

__all__ = [
    "FusedLoraLinear",
    "NF4LoraLinear",
    "NF4Weight",
    "dequantize_nf4",
    "lora_linear",
    "qlora_linear",
    "quantize_model_nf4",
    "quantize_nf4",
    "sae_feature_stats",
]
