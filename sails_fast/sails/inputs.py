"""Deprecated: moved to `sails_fast.core.digests`; names forward to their new homes."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "digest_records": "sails_fast.pipeline.fingerprints",
    },
    "sails_fast.core.digests",
)
