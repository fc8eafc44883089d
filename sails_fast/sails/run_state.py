"""Deprecated: moved to `sails_fast.pipeline.state` (each name forwards to its new home;
docs/architecture.md)."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {},
    "sails_fast.pipeline.state",
)
