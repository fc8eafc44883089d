"""Deterministic train / validation / test splits that do not depend on the order of the input.

Each distinct prompt (its normalised text, `record.key`) gets a rank from sha256(seed, key); the lowest
ranks go to test, the next to validation, the rest to train. So:
- the same prompts and seed give the same splits whatever order they come in;
- duplicates of one prompt (same normalised text, e.g. from two sources) always land in the same split,
  so a test prompt can never be trained on under another id;
- split sizes are exact: round(n * fraction) distinct prompts, n counted after grouping duplicates.
Adding prompts to a set can move a prompt that sat at a cut point into the neighbouring split; re-split
(and re-run the steps that depend on it) when the prompt set changes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from .records import ContrastivePair, PromptRecord

R = TypeVar("R", PromptRecord, ContrastivePair)

SPLIT_NAMES: tuple[str, ...] = ("train", "validation", "test")


def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).digest()


def _label(r: PromptRecord | ContrastivePair) -> str:
    if isinstance(r, PromptRecord):
        return f"{r.source}/{r.id}"
    return f"{r.source}/{r.prompt_id}" if r.prompt_id is not None else f"{r.source}/{r.key}"


@dataclass(frozen=True)
class DataSplits:
    """Three disjoint parts of a prompt (or pair) set, made by `split_records`.

    Args:
        train, validation, test: the records of each split, in rank order (independent of input order).
        seed: the seed used.
        fractions: (train, validation, test) fractions asked for.

    Example:
        >>> from sails_fast.data import load_harmless, split_records
        >>> s = split_records(load_harmless(), seed=0)
        >>> len(s.train), len(s.validation), len(s.test)
        (93, 12, 12)
    """

    train: tuple
    validation: tuple
    test: tuple
    seed: int
    fractions: tuple[float, float, float]

    def __getitem__(self, name: str) -> tuple:
        if name not in SPLIT_NAMES:
            raise ValueError(f"name: expected one of {SPLIT_NAMES}, got {name!r}")
        return getattr(self, name)

    def manifest(self) -> dict:
        """A JSON-ready record of the split: seed, fractions, counts and "source/id" labels per split."""
        return {
            "seed": self.seed,
            "fractions": list(self.fractions),
            "counts": {n: len(self[n]) for n in SPLIT_NAMES},
            **{n: [_label(r) for r in self[n]] for n in SPLIT_NAMES},
        }


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise ValueError(f"fractions: expected 3 numbers (train, validation, test), got {fractions!r}")
    fr = tuple(float(f) for f in fractions)
    if any(not math.isfinite(f) or f < 0 for f in fr):
        raise ValueError(f"fractions: expected finite non-negative numbers, got {fractions!r}")
    if abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"fractions: expected numbers summing to 1, got {fractions!r} (sum {sum(fr)})")
    if fr[0] == 0 or fr[2] == 0:
        raise ValueError(f"fractions: train and test fractions must be positive, got {fractions!r}")
    return fr  # type: ignore[return-value]


def split_records(
    records: Sequence[R], *, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)
) -> DataSplits:
    """Split prompts or pairs into train / validation / test by a seeded hash of each prompt's text.

    Args:
        records: PromptRecords or ContrastivePairs (not mixed).
        seed: any int; a different seed gives a different split.
        fractions: (train, validation, test), non-negative, summing to 1; train and test > 0, validation may
            be 0. Sizes are round(n * fraction) over n distinct prompts, at least 1 for a positive fraction.

    Returns:
        DataSplits: disjoint by normalised text (checked with `check_disjoint` before returning).

    Raises:
        ValueError: empty input, bad fractions, a non-int seed, or too few distinct prompts for the fractions.

    Example:
        >>> from sails_fast.data import PromptRecord
        >>> recs = [PromptRecord(id=str(i), text=f"prompt {i}", source="s") for i in range(10)]
        >>> s = split_records(recs, seed=1, fractions=(0.6, 0.2, 0.2))
        >>> [len(x) for x in (s.train, s.validation, s.test)]
        [6, 2, 2]
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    fr = _check_fractions(fractions)
    if isinstance(records, (str, bytes)) or len(records) == 0:
        raise ValueError("records: the prompt set is empty; nothing to split")
    kinds = {type(r) for r in records}
    if not kinds <= {PromptRecord, ContrastivePair} or len(kinds) != 1:
        raise ValueError(
            "records: expected all PromptRecord or all ContrastivePair, "
            f"got {sorted(k.__name__ for k in kinds)}"
        )

    groups: dict[str, list] = {}
    for r in records:
        groups.setdefault(r.key, []).append(r)
    order = sorted(groups, key=lambda k: (_rank(seed, k), k))
    n = len(order)
    n_test = max(1, round(n * fr[2]))
    n_val = max(1, round(n * fr[1])) if fr[1] > 0 else 0
    if n - n_test - n_val < 1:
        raise ValueError(
            f"records: {n} distinct prompt(s) are too few for fractions {fr} "
            f"(test {n_test}, validation {n_val}, train would be empty)"
        )

    def take(keys: list[str]) -> tuple:
        out = []
        for k in keys:
            # records sharing a key are ordered by content, not by input position
            out += sorted(groups[k], key=lambda r: json.dumps(r.to_dict(), sort_keys=True))
        return tuple(out)

    splits = DataSplits(
        train=take(order[n_test + n_val :]),
        validation=take(order[n_test : n_test + n_val]),
        test=take(order[:n_test]),
        seed=seed,
        fractions=fr,
    )
    check_disjoint(splits)
    return splits


def check_disjoint(splits: DataSplits) -> None:
    """Raise if any prompt (by normalised text) or any "source/id" label is in two splits.

    Args:
        splits: a DataSplits (e.g. one edited by hand or read back from disk).

    Raises:
        ValueError: naming the two splits and up to five shared prompts.

    Example:
        >>> from sails_fast.data import load_safe_scary, split_records
        >>> check_disjoint(split_records(load_safe_scary(), seed=0))  # passes silently
    """
    for i, a in enumerate(SPLIT_NAMES):
        for b in SPLIT_NAMES[i + 1 :]:
            keys_a = {r.key for r in splits[a]}
            shared = sorted(keys_a & {r.key for r in splits[b]})
            if shared:
                raise ValueError(
                    f"splits: {len(shared)} prompt(s) are in both {a} and {b}, e.g. {shared[:5]}"
                )
            labels_a = {_label(r) for r in splits[a]}
            shared = sorted(labels_a & {_label(r) for r in splits[b]})
            if shared:
                raise ValueError(f"splits: {len(shared)} id(s) are in both {a} and {b}, e.g. {shared[:5]}")
