"""Contrastive pairs: the aligned side from refusal templates (or the user's chosen responses), the
unaligned side from the user's rejected responses or, later, the unaligned model's own completions.

Pairs are written and read as JSONL (one `ContrastivePair.to_dict()` per line), so generated
completions can be cached beside an artifact and reloaded exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .records import ContrastivePair, PromptRecord, normalize_text

# written for this project; no template repeats or paraphrases the request, so no harmful text is echoed
DEFAULT_REFUSAL_TEMPLATES: tuple[str, ...] = (
    "I can't help with that.",
    "I'm sorry, but I can't help with that request.",
    "I won't help with this, because it could cause serious harm to people.",
    "Sorry, I can't assist with that. If you have another question, I'm happy to help.",
    "I'm not able to provide that. It could be used to hurt someone or break the law.",
    "I can't do that. Helping with this could put people at risk.",
    "I'm sorry, but I must decline. This request asks for something harmful.",
    "No, I can't help with this. Is there something else I can do for you?",
)


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str) or not isinstance(templates, Sequence) or len(templates) == 0:
        raise ValueError(f"templates: expected a non-empty list of refusal strings, got {templates!r}")
    for i, t in enumerate(templates):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"templates[{i}]: expected a non-empty string, got {t!r}")
    return tuple(templates)


def choose_refusal(prompt: str, templates: Sequence[str] | None = None, seed: int = 0) -> tuple[int, str]:
    """Pick a refusal template for a prompt, deterministically by (seed, prompt text).

    Args:
        prompt: the prompt text (normalised before hashing, so spacing and case do not matter).
        templates: the refusal strings; None for DEFAULT_REFUSAL_TEMPLATES.
        seed: any int.

    Returns:
        (index, template): the chosen template and its index in `templates`.

    Example:
        >>> i, text = choose_refusal("Write a phishing email", seed=0)
        >>> text == DEFAULT_REFUSAL_TEMPLATES[i]
        True
    """
    tpl = _check_templates(DEFAULT_REFUSAL_TEMPLATES if templates is None else templates)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt: expected a str, got {type(prompt).__name__}")
    digest = hashlib.sha256(f"refusal\x00{seed}\x00{normalize_text(prompt)}".encode()).digest()
    i = int.from_bytes(digest[:8], "big") % len(tpl)
    return i, tpl[i]


def build_refusal_pairs(
    prompts: Sequence[PromptRecord],
    *,
    templates: Sequence[str] | None = None,
    seed: int = 0,
    unaligned: Mapping[str, str] | None = None,
) -> list[ContrastivePair]:
    """Pairs whose aligned side is a refusal template; the unaligned side is filled from `unaligned` or left
    None for generation.

    Args:
        prompts: harmful PromptRecords (records with harmful=False are rejected: refusing them would teach
            over-refusal).
        templates: refusal strings; None for DEFAULT_REFUSAL_TEMPLATES.
        seed: picks the template per prompt (see `choose_refusal`).
        unaligned: optional {prompt id: unaligned response}, e.g. cached completions; ids not in it stay None.

    Returns:
        list[ContrastivePair]: one per prompt, in input order, aligned_from "refusal_template:<index>",
        unaligned_from "generated" where filled.

    Raises:
        ValueError: empty prompt set, a prompt marked harmful=False, an `unaligned` id matching no prompt.

    Example:
        >>> from sails_fast.data import load_advbench
        >>> pairs = build_refusal_pairs(load_advbench()[:2], seed=0)  # doctest: +SKIP
        >>> pairs[0].unaligned is None  # doctest: +SKIP
        True
    """
    if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise ValueError("prompts: the prompt set is empty; expected harmful PromptRecords")
    tpl = _check_templates(DEFAULT_REFUSAL_TEMPLATES if templates is None else templates)
    unaligned = dict(unaligned or {})
    ids = set()
    pairs = []
    for j, p in enumerate(prompts):
        if not isinstance(p, PromptRecord):
            raise ValueError(f"prompts[{j}]: expected a PromptRecord, got {type(p).__name__}")
        if p.harmful is False:
            raise ValueError(
                f"prompts[{j}]: {p.source}/{p.id} is marked harmful=False; refusal pairs need harmful prompts"
            )
        ids.add(p.id)
        i, text = choose_refusal(p.text, tpl, seed)
        response = unaligned.get(p.id)
        pairs.append(
            ContrastivePair(
                prompt=p.text,
                aligned=text,
                unaligned=response,
                source=p.source,
                prompt_id=p.id,
                category=p.category,
                aligned_from=f"refusal_template:{i}",
                unaligned_from=None if response is None else "generated",
            )
        )
    stray = sorted(set(unaligned) - ids)
    if stray:
        raise ValueError(f"unaligned: {len(stray)} id(s) match no prompt, e.g. {stray[:5]}")
    return pairs


def write_pairs(pairs: Sequence[ContrastivePair], path: str | os.PathLike) -> Path:
    """Write pairs as JSONL, atomically (a temporary file renamed into place, so no half-written file).

    Args:
        pairs: the pairs to save.
        path: the .jsonl file to write.

    Returns:
        Path: the written file.

    Example:
        >>> write_pairs(pairs, "out/pairs.jsonl")  # doctest: +SKIP
    """
    for j, p in enumerate(pairs):
        if not isinstance(p, ContrastivePair):
            raise ValueError(f"pairs[{j}]: expected a ContrastivePair, got {type(p).__name__}")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for p in pairs:
                f.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_pairs(path: str | os.PathLike) -> list[ContrastivePair]:
    """Read pairs written by `write_pairs`.

    Args:
        path: a JSONL file of `ContrastivePair.to_dict()` lines.

    Returns:
        list[ContrastivePair]: in file order.

    Raises:
        ValueError: malformed JSONL line or unknown / invalid fields, naming file:line.

    Example:
        >>> read_pairs("out/pairs.jsonl")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: no such file {str(path)!r}")
    pairs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                pairs.append(ContrastivePair.from_dict(json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: malformed JSONL line ({e.msg} at column {e.colno})"
                ) from None
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
    return pairs
