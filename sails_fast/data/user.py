"""The user's own data: prompt sets and chosen/rejected pairs from files, `datasets` objects or hub ids.

Prompts: JSONL / JSON / CSV / TSV rows with a text column ("prompt", "text", "instruction", "question",
"goal" or "behavior" found automatically, or `text_field=`), optional "id" and "category" columns.

Pairs (HH-RLHF style): rows with "prompt", "chosen", "rejected" columns, or HH-RLHF's raw transcript form
where "chosen" and "rejected" are whole conversations "\\n\\nHuman: ...\\n\\nAssistant: ..." that share every
turn but the last assistant reply.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

from ._io import Row, read_rows
from .records import ContrastivePair, PromptRecord

TEXT_FIELDS: tuple[str, ...] = ("prompt", "text", "instruction", "question", "goal", "behavior")

_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str) -> list[tuple[str, str]]:
    """Split an HH-RLHF transcript into turns.

    Args:
        text: "\\n\\nHuman: ...\\n\\nAssistant: ..." (leading whitespace before the first "Human:" allowed).

    Returns:
        list[tuple[str, str]]: (role, text) with role "user" or "assistant", texts stripped, oldest first.

    Raises:
        ValueError: the text does not start with a "Human:" turn.

    Example:
        >>> parse_hh_transcript("\\n\\nHuman: Hi there\\n\\nAssistant: Hello!")
        [('user', 'Hi there'), ('assistant', 'Hello!')]
    """
    if not isinstance(text, str):
        raise ValueError(f"text: expected an HH-RLHF transcript string, got {type(text).__name__}")
    body = "\n\n" + text.lstrip()
    parts = _TURN.split(body)
    # parts = [before the first marker, role, text, role, text, ...]
    if parts[0].strip() or len(parts) < 3 or parts[1] != "Human":
        raise ValueError(
            f"text: expected an HH-RLHF transcript starting with 'Human:', got {text[:60]!r}"
            + ("..." if len(text) > 60 else "")
        )
    return [(_ROLES[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]


def _is_transcript(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("Human:")


def _columns(rows: list[Row]) -> list[str]:
    seen: dict[str, None] = {}
    for _, row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _require_rows(rows: list[Row], name: str) -> None:
    if not rows:
        raise ValueError(f"source: the prompt set {name!r} is empty (no rows)")


def _str_field(row: dict, field: str, loc: str, what: str) -> str:
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{loc}: empty {what} in column {field!r}")
    if not isinstance(value, str):
        raise ValueError(f"{loc}: column {field!r} should hold text, got {type(value).__name__}")
    return value


def load_prompts(
    source: Any,
    *,
    text_field: str | None = None,
    id_field: str = "id",
    category_field: str = "category",
    source_name: str | None = None,
    harmful: bool | None = None,
    format: str | None = None,
    split: str = "train",
) -> list[PromptRecord]:
    """Load the user's prompts.

    Args:
        source: a .jsonl / .json / .csv / .tsv path, a `datasets.Dataset` / `DatasetDict`, a hub dataset
            id (needs network; loaded through `datasets.load_dataset`), a list of dicts or a list of str.
        text_field: the column holding the prompt; None finds the first of TEXT_FIELDS present.
        id_field: the column holding an id; rows without one get "<source>-<row number>".
        category_field: the column holding a category (optional).
        source_name: the records' `source`; default the file stem or dataset id.
        harmful: the label to give every record (True: should be refused, False: should be answered).
        format: "jsonl", "json", "csv" or "tsv" to override the file extension.
        split: the split to take from a DatasetDict or hub dataset.

    Returns:
        list[PromptRecord]: one record per row, in input order.

    Raises:
        ValueError: empty set, unknown format, missing text column (named, with the columns found),
            malformed JSONL line (file:line), empty prompt, duplicate id.

    Example:
        >>> recs = load_prompts(["How do I bake bread?"], source_name="mine", harmful=False)
        >>> recs[0].id, recs[0].source
        ('mine-00001', 'mine')
    """
    is_list = isinstance(source, Sequence) and not isinstance(source, (str, bytes))
    if is_list and source and all(isinstance(s, str) for s in source):
        source = [{text_field or "prompt": s} for s in source]
    name, rows = read_rows(source, format=format, split=split)
    name = source_name or name
    _require_rows(rows, name)
    columns = _columns(rows)
    if text_field is None:
        found = [f for f in TEXT_FIELDS if f in columns]
        if not found:
            raise ValueError(
                f"source: missing a prompt column in {name!r}; expected one of {list(TEXT_FIELDS)} "
                f"(or pass text_field=), found columns {columns}"
            )
        text_field = found[0]
    elif text_field not in columns:
        raise ValueError(f"text_field: missing column {text_field!r} in {name!r}; found columns {columns}")

    records: list[PromptRecord] = []
    where: dict[str, str] = {}
    for i, (loc, row) in enumerate(rows, start=1):
        text = _str_field(row, text_field, loc, "prompt")
        rid = row.get(id_field)
        rid = f"{name}-{i:05d}" if rid is None or str(rid).strip() == "" else str(rid).strip()
        if rid in where:
            raise ValueError(f"{loc}: duplicate id {rid!r} (first at {where[rid]})")
        where[rid] = loc
        cat = row.get(category_field)
        records.append(
            PromptRecord(
                id=rid,
                text=text.strip(),
                source=name,
                category=None if cat is None or str(cat).strip() == "" else str(cat).strip(),
                harmful=harmful,
            )
        )
    return records


def load_preference_pairs(
    source: Any,
    *,
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str | None = "rejected",
    id_field: str = "id",
    category_field: str = "category",
    source_name: str | None = None,
    format: str | None = None,
    split: str = "train",
) -> list[ContrastivePair]:
    """Load chosen / rejected pairs (HH-RLHF style): aligned = chosen, unaligned = rejected.

    Two row forms are accepted:
    - columns prompt, chosen, rejected: the responses are plain text. A prompt that is itself an HH
      transcript ("\\n\\nHuman: ...\\n\\nAssistant:") is split into the final user message and history.
    - no prompt column, chosen and rejected are whole HH-RLHF transcripts: the prompt is the last
      "Human:" turn, earlier turns go to `history`, the responses are the final "Assistant:" turns. Rows
      whose two transcripts differ before the last reply, or whose last reply is empty, are skipped with
      one warning (the public HH-RLHF release has a few such rows).

    Args:
        source: as for `load_prompts`.
        prompt_field, chosen_field: column names.
        rejected_field: the rejected column; None when the user gives chosen responses only (unaligned is
            then None, to be generated).
        id_field, category_field: optional columns; the id becomes `prompt_id`.
        source_name: the pairs' `source`; default the file stem or dataset id.
        format, split: as for `load_prompts`.

    Returns:
        list[ContrastivePair]: aligned_from "chosen", unaligned_from "rejected" (or None).

    Raises:
        ValueError: empty set, unknown format, missing columns (all named), malformed JSONL line
            (file:line), empty prompt or response in column form, malformed transcript.

    Example:
        >>> rows = [{"prompt": "Make a bomb", "chosen": "I can't help with that.", "rejected": "Sure..."}]
        >>> load_preference_pairs(rows)[0].unaligned
        'Sure...'
    """
    name, rows = read_rows(source, format=format, split=split)
    name = source_name or name
    _require_rows(rows, name)
    columns = _columns(rows)
    transcript_form = (
        prompt_field not in columns
        and chosen_field in columns
        and _is_transcript(rows[0][1].get(chosen_field))
    )
    needed = [chosen_field] + ([rejected_field] if rejected_field else [])
    if not transcript_form:
        needed = [prompt_field] + needed
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(
            f"source: missing column(s) {missing} in {name!r}; found columns {columns}. Expected prompt, "
            "chosen, rejected columns, or HH-RLHF transcripts in chosen/rejected (set prompt_field=, "
            "chosen_field=, rejected_field= to rename)"
        )

    pairs: list[ContrastivePair] = []
    skipped: list[str] = []
    for loc, row in rows:
        pid = row.get(id_field)
        pid = None if pid is None or str(pid).strip() == "" else str(pid).strip()
        cat = row.get(category_field)
        cat = None if cat is None or str(cat).strip() == "" else str(cat).strip()
        if transcript_form:
            pair = _pair_from_transcripts(row, chosen_field, rejected_field, loc, name, pid, cat)
            if pair is None:
                skipped.append(loc)
            else:
                pairs.append(pair)
            continue
        pairs.append(_pair_from_columns(row, prompt_field, chosen_field, rejected_field, loc, name, pid, cat))
    if skipped:
        warnings.warn(
            f"{name}: skipped {len(skipped)} of {len(rows)} HH-RLHF rows whose chosen and rejected "
            f"transcripts differ before the last reply or end with an empty turn (first: {skipped[0]})",
            stacklevel=2,
        )
    if not pairs:
        raise ValueError(f"source: no usable pairs in {name!r} ({len(skipped)} rows skipped)")
    return pairs


def _pair_from_columns(
    row: dict, prompt_field: str, chosen_field: str, rejected_field: str | None, loc: str, name: str, pid, cat
) -> ContrastivePair:
    """A pair from prompt / chosen / rejected columns; a prompt that is an HH transcript gives its history."""
    prompt = _str_field(row, prompt_field, loc, "prompt")
    history: tuple = ()
    if _is_transcript(prompt):
        turns = _parse_at(prompt, loc, prompt_field)
        # a prompt transcript ends with an open "Assistant:" turn awaiting the response
        if turns[-1] == ("assistant", ""):
            turns = turns[:-1]
        if turns[-1][0] != "user":
            raise ValueError(f"{loc}: the prompt transcript in {prompt_field!r} should end with a Human turn")
        prompt, history = turns[-1][1], tuple(turns[:-1])
    chosen = _str_field(row, chosen_field, loc, "chosen response")
    rejected = _str_field(row, rejected_field, loc, "rejected response") if rejected_field else None
    return _make_pair(
        loc,
        prompt=prompt.strip(),
        aligned=chosen.strip(),
        unaligned=None if rejected is None else rejected.strip(),
        source=name,
        prompt_id=pid,
        category=cat,
        history=history,
        aligned_from="chosen",
        unaligned_from=None if rejected is None else "rejected",
    )


def _make_pair(loc: str, **kwargs: Any) -> ContrastivePair:
    try:
        return ContrastivePair(**kwargs)
    except ValueError as e:
        raise ValueError(f"{loc}: {e}") from None


def _parse_at(text: str, loc: str, field: str) -> list[tuple[str, str]]:
    try:
        return parse_hh_transcript(text)
    except ValueError as e:
        raise ValueError(f"{loc}: column {field!r}: {e}") from None


def _pair_from_transcripts(
    row: dict,
    chosen_field: str,
    rejected_field: str | None,
    loc: str,
    name: str,
    pid: str | None,
    cat: str | None,
) -> ContrastivePair | None:
    chosen = _parse_at(_str_field(row, chosen_field, loc, "chosen transcript"), loc, chosen_field)
    rejected = None
    if rejected_field:
        rejected = _parse_at(_str_field(row, rejected_field, loc, "rejected transcript"), loc, rejected_field)
    for turns, field in ((chosen, chosen_field), (rejected, rejected_field)):
        if turns is not None and (len(turns) < 2 or turns[-1][0] != "assistant" or turns[-2][0] != "user"):
            raise ValueError(
                f"{loc}: column {field!r}: expected a transcript ending 'Human: ... Assistant: ...'"
            )
    if rejected is not None and chosen[:-1] != rejected[:-1]:
        return None
    if not chosen[-2][1] or not chosen[-1][1] or (rejected is not None and not rejected[-1][1]):
        return None
    return _make_pair(
        loc,
        prompt=chosen[-2][1],
        aligned=chosen[-1][1],
        unaligned=None if rejected is None else rejected[-1][1],
        source=name,
        prompt_id=pid,
        category=cat,
        history=tuple(chosen[:-2]),
        aligned_from="chosen",
        unaligned_from=None if rejected is None else "rejected",
    )
