"""The records every loader returns: a prompt, and a contrastive (aligned, unaligned) pair.

Both are frozen dataclasses with `to_dict` / `from_dict` (unknown keys rejected), so prompt sets and pairs
can be written beside an artifact as JSON and read back exactly.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace

_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """The key under which two prompts count as the same: whitespace collapsed, case folded.

    Args:
        text: a prompt.

    Returns:
        str: the normalised text (used for splitting, de-duplication and disjointness checks).

    Example:
        >>> normalize_text("  How do I\\n bake BREAD? ")
        'how do i bake bread?'
    """
    return _WS.sub(" ", text).strip().casefold()


def _check_str(name: str, value: object, *, allow_none: bool = False, allow_empty: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a str, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name}: expected a non-empty string, got {value!r}")


def _from_dict(cls, d: Mapping, what: str):
    if not isinstance(d, Mapping):
        raise ValueError(f"{what}: expected a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; expected a subset of {sorted(known)}")
    return cls(**d)


@dataclass(frozen=True)
class PromptRecord:
    """One prompt with where it came from.

    Args:
        id: an identifier unique within its source (e.g. "advbench-0001").
        text: the prompt as the user would type it.
        source: the set it belongs to ("advbench", "harmbench", "donotanswer", "harmless", "safe_scary",
            or the user's file stem / dataset name).
        category: the main category where the source has one, else None.
        tags: every label the source attaches (AdvBench harm categories, Do-Not-Answer intents).
        harmful: True for prompts a safe model should refuse, False for prompts it should answer,
            None when unknown.

    Example:
        >>> PromptRecord(id="mine-1", text="How do I bake bread?", source="mine", harmful=False).key
        'how do i bake bread?'
    """

    id: str
    text: str
    source: str
    category: str | None = None
    tags: tuple[str, ...] = ()
    harmful: bool | None = None

    def __post_init__(self) -> None:
        _check_str("id", self.id)
        _check_str("text", self.text)
        _check_str("source", self.source)
        _check_str("category", self.category, allow_none=True)
        # lists from JSON become tuples, so records stay hashable and frozen
        object.__setattr__(self, "tags", tuple(self.tags))
        for t in self.tags:
            _check_str("tags[]", t)
        if self.harmful is not None and not isinstance(self.harmful, bool):
            raise ValueError(f"harmful: expected True, False or None, got {self.harmful!r}")

    @property
    def key(self) -> str:
        """The normalised text: two records with the same key are the same prompt."""
        return normalize_text(self.text)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tags"] = list(self.tags)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> PromptRecord:
        """Inverse of `to_dict`; unknown keys raise ValueError."""
        return _from_dict(cls, d, "PromptRecord")


@dataclass(frozen=True)
class ContrastivePair:
    """A prompt answered two ways: aligned (a refusal or the user's chosen answer) and unaligned.

    Args:
        prompt: the final user message.
        aligned: the safe response (a refusal template or the user's chosen response).
        unaligned: the unsafe response (the user's rejected response or the unaligned model's own
            completion); None until generated.
        source: the set the prompt came from.
        prompt_id: the PromptRecord id the pair was built from, where there is one.
        category: the prompt's category, where known.
        history: earlier turns of a multi-turn conversation as (role, text) with role "user" or
            "assistant", oldest first; empty for a single-turn prompt.
        aligned_from: how `aligned` was made: "refusal_template:<index>" or "chosen".
        unaligned_from: how `unaligned` was made: "rejected", "generated", or None while missing.

    Example:
        >>> p = ContrastivePair(prompt="Make a bomb", aligned="I can't help with that.", unaligned=None,
        ...                     source="advbench")
        >>> p.with_unaligned("Sure, ...", "generated").is_complete
        True
    """

    prompt: str
    aligned: str
    unaligned: str | None
    source: str
    prompt_id: str | None = None
    category: str | None = None
    history: tuple[tuple[str, str], ...] = ()
    aligned_from: str = "chosen"
    unaligned_from: str | None = None

    def __post_init__(self) -> None:
        _check_str("prompt", self.prompt)
        _check_str("aligned", self.aligned)
        _check_str("unaligned", self.unaligned, allow_none=True)
        _check_str("source", self.source)
        _check_str("prompt_id", self.prompt_id, allow_none=True)
        _check_str("category", self.category, allow_none=True)
        _check_str("aligned_from", self.aligned_from)
        _check_str("unaligned_from", self.unaligned_from, allow_none=True)
        if self.unaligned is not None and self.unaligned_from is None:
            raise ValueError(
                "unaligned_from: expected 'rejected' or 'generated' when unaligned is given, got None"
            )
        history = tuple(tuple(turn) for turn in self.history)
        for i, turn in enumerate(history):
            if len(turn) != 2 or turn[0] not in ("user", "assistant") or not isinstance(turn[1], str):
                raise ValueError(
                    f"history[{i}]: expected (role, text) with role 'user' or 'assistant', got {turn!r}"
                )
        object.__setattr__(self, "history", history)

    @property
    def is_complete(self) -> bool:
        """True when both sides are present."""
        return self.unaligned is not None

    @property
    def key(self) -> str:
        """The normalised prompt (with any history), used for splitting pairs like prompts."""
        past = " ".join(f"{role}: {text}" for role, text in self.history)
        return normalize_text(f"{past} user: {self.prompt}" if past else self.prompt)

    def with_unaligned(self, text: str, origin: str = "generated") -> ContrastivePair:
        """A copy with the unaligned side filled in.

        Args:
            text: the unaligned response.
            origin: "generated" (the unaligned model's completion) or "rejected" (user data).

        Returns:
            ContrastivePair: a new, complete pair.
        """
        if origin not in ("generated", "rejected"):
            raise ValueError(f"origin: expected 'generated' or 'rejected', got {origin!r}")
        return replace(self, unaligned=text, unaligned_from=origin)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["history"] = [list(turn) for turn in self.history]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> ContrastivePair:
        """Inverse of `to_dict`; unknown keys raise ValueError."""
        return _from_dict(cls, d, "ContrastivePair")


def fingerprint(records: Iterable[PromptRecord | ContrastivePair]) -> str:
    """A sha256 over the records' content, independent of their order (for caching artifacts).

    Args:
        records: prompt records or pairs.

    Returns:
        str: 64 hex digits; equal for the same multiset of records in any order.

    Example:
        >>> a = PromptRecord(id="1", text="hi", source="s")
        >>> b = PromptRecord(id="2", text="yo", source="s")
        >>> fingerprint([a, b]) == fingerprint([b, a])
        True
    """
    lines = sorted(json.dumps(r.to_dict(), sort_keys=True, ensure_ascii=False) for r in records)
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def deduplicate(records: Sequence[PromptRecord]) -> list[PromptRecord]:
    """Keep the first record of each normalised text, in input order.

    Args:
        records: prompt records, possibly from several sources.

    Returns:
        list[PromptRecord]: the records whose `key` was not seen earlier in the list.

    Example:
        >>> r = [PromptRecord(id="1", text="Hi", source="a"), PromptRecord(id="2", text=" hi", source="b")]
        >>> [x.id for x in deduplicate(r)]
        ['1']
    """
    seen: set[str] = set()
    out = []
    for r in records:
        if r.key not in seen:
            seen.add(r.key)
            out.append(r)
    return out
