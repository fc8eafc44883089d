"""Deprecated: moved to `sails_fast.fused.nf4`; names forward to their new homes."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "Backend": "sails_fast.fused.lora",
        "FLOAT_DTYPES": "sails_fast.fused.nf4_weight",
        "NESTED_BLOCKSIZE": "sails_fast.kernels.nf4_ref",
        "NF4Weight": "sails_fast.fused.nf4_weight",
        "_check_float_dtype": "sails_fast.fused.nf4_weight",
        "_check_nf4": "sails_fast.fused.nf4_weight",
        "autocast_cast": "sails_fast.fused.lora",
        "autocast_dtype": "sails_fast.fused.lora",
        "check_blocksize": "sails_fast.kernels.nf4_ref",
        "dequantize_nf4": "sails_fast.fused.nf4_weight",
        "dequantize_nf4_ref": "sails_fast.kernels.nf4_ref",
        "dynamic_code": "sails_fast.kernels.nf4_ref",
        "lora_scaling": "sails_fast.fused.lora",
        "nf4_op_args": "sails_fast.fused.custom_ops",
        "qlora_linear_ref": "sails_fast.kernels.nf4_ref",
        "quantize_nf4": "sails_fast.fused.nf4_weight",
        "quantize_nf4_ref": "sails_fast.kernels.nf4_ref",
        "resolve_backend": "sails_fast.fused.backend",
        "seed_tensor": "sails_fast.fused.custom_ops",
        "validate_lora_args": "sails_fast.fused.lora",
    },
    "sails_fast.fused.nf4",
)
