"""Deprecated: moved to `sails_fast.statistics.collect` (each name forwards to its new home;
docs/architecture.md)."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "CACHE_FORMAT": "sails_fast.pairs.generation",
        "CollectConfig": "sails_fast.pairs.config",
        "ConfigBase": "sails_fast.core.config",
        "HOOK_POINTS": "sails_fast.pairs.config",
        "POOLINGS": "sails_fast.pairs.config",
        "_generation_settings": "sails_fast.pairs.generation",
        "_read_cache": "sails_fast.pairs.generation",
        "complete_pairs": "sails_fast.pairs.generation",
        "decoder_layers": "sails_fast.models.hooks",
        "generate_unaligned": "sails_fast.pairs.generation",
        "prompt_hash": "sails_fast.pairs.generation",
        "prompt_ids": "sails_fast.pairs.tokenize",
        "tokenize_example": "sails_fast.pairs.tokenize",
    },
    "sails_fast.statistics.collect",
)
