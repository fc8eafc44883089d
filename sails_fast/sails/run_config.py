"""Deprecated: moved to `sails_fast.pipeline.config` (each name forwards to its new home;
docs/architecture.md)."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "EvalConfig": "sails_fast.evaluation.config",
        "read_config_file": "sails_fast.core.config",
        "write_json_atomic": "sails_fast.pipeline.state",
    },
    "sails_fast.pipeline.config",
)
