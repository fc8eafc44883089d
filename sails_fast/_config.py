"""Deprecated: moved to `sails_fast.core.config`; names forward to their new homes."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {},
    "sails_fast.core.config",
)
