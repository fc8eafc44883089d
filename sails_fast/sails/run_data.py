"""Deprecated: moved to `sails_fast.pipeline.data` (each name forwards to its new home;
docs/architecture.md)."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "DataConfig": "sails_fast.pipeline.config",
        "normalize_text": "sails_fast.data",
    },
    "sails_fast.pipeline.data",
)
