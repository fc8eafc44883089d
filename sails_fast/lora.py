"""Deprecated: moved to `sails_fast.fused.lora`; names forward to their new homes."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "lora_linear_ref": "sails_fast.kernels.lora_ref",
        "resolve_backend": "sails_fast.fused.backend",
        "seed_tensor": "sails_fast.fused.custom_ops",
    },
    "sails_fast.fused.lora",
)
