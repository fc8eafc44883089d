"""Deprecated: moved to `sails_fast.pipeline.demo` (each name forwards to its new home;
docs/architecture.md)."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "RunConfig": "sails_fast.pipeline.config",
        "RunResult": "sails_fast.pipeline.run",
        "run_pipeline": "sails_fast.pipeline.run",
    },
    "sails_fast.pipeline.demo",
)
