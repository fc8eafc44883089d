"""sails_fast: fused Triton kernels and the SAILS safety-alignment pipeline.

Stable public API (everything else is internal and may move):
"""

from .lora import FusedLoraLinear, lora_linear

__version__ = "0.1.0"

__all__ = ["FusedLoraLinear", "lora_linear", "__version__"]
