"""Deprecated: moved to `sails_fast.lora_init.init` (each name forwards to its new home;
docs/architecture.md)."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "InitConfig": "sails_fast.lora_init.config",
        "POOLED": "sails_fast.subspace.subspace",
        "Subspace": "sails_fast.subspace.subspace",
    },
    "sails_fast.lora_init.init",
)
