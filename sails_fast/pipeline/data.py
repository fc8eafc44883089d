"""The run's data: prompt sets loaded once, split, checked for leaks, and the retain examples.

`load_sources` reads every set the config names (named sets, files, hub datasets) and the optional pairs
file; `split_sources` gives the splits the steps use; `check_no_leak` refuses a run whose held-out
(evaluated) prompts also appear in what it trains on, by the normalised text the splits use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sails_fast.core import distributed
from sails_fast.data import normalize_text
from sails_fast.pipeline.config import DataConfig

RETAIN_FILE = "retain.jsonl"


# the splits a run evaluates on: never trained on
HELD_OUT = ("test", "harmless_test", "safe_scary_test")


@dataclass
class Sources:
    """Every record the data config names, as loaded (before splitting)."""

    harmful: list
    harmless: list
    safe_scary: list
    pairs: list | None


def _load_set(name: str) -> list:
    from sails_fast.data import load_prompt_set

    return load_prompt_set(name)


def load_sources(config: DataConfig) -> Sources:
    from sails_fast.data import load_preference_pairs

    return Sources(
        harmful=_load_set(config.harmful),
        harmless=_load_set(config.harmless),
        safe_scary=_load_set(config.safe_scary),
        pairs=load_preference_pairs(config.pairs) if config.pairs else None,
    )


def _take(records: list, n: int | None) -> list:
    return list(records) if n is None else list(records)[:n]


def split_sources(sources: Sources, config: DataConfig) -> dict[str, list]:
    """Splits of the harmful set, and the test splits of the over-refusal sets."""
    from sails_fast.data import split_records

    harmful = split_records(sources.harmful, seed=config.seed)
    harmless = split_records(sources.harmless, seed=config.seed)
    safe_scary = split_records(sources.safe_scary, seed=config.seed)
    # the harmless set's train split feeds the retain examples; its test and validation splits are for
    # evaluation only. The safe-but-scary set is never trained on, so evaluation may use all of it.
    return {
        "train": _take(harmful.train, config.train_prompts),
        "validation": list(harmful.validation),
        "test": _take(harmful.test, config.eval_prompts),
        "retain": _take(harmless.train, config.retain_prompts),
        "harmless_test": _take([*harmless.test, *harmless.validation], config.eval_prompts),
        "safe_scary_test": _take(
            [*safe_scary.test, *safe_scary.validation, *safe_scary.train], config.eval_prompts
        ),
    }


def prepare_data(config: DataConfig) -> dict[str, list]:
    """The splits of the sets `config` names (see `split_sources`)."""
    return split_sources(load_sources(config), config)


def _prompt_keys(record) -> set[str]:
    # a pair is matched by its final prompt alone as well as with its history
    keys = {record.key}
    if getattr(record, "prompt", None) is not None:
        keys.add(normalize_text(record.prompt))
    return keys


def check_no_leak(data: dict[str, list], sources: Sources, config: DataConfig) -> None:
    """Raise ValueError when an evaluated prompt is also a training prompt (pairs, or the harmful train
    split they are built from, or retain), unless `config.allow_overlap`."""
    if config.allow_overlap:
        return
    training = {
        "pairs file" if sources.pairs is not None else "train split": sources.pairs or data["train"],
        "retain prompts": data["retain"],
    }
    trained = {name: set().union(*(_prompt_keys(r) for r in records)) for name, records in training.items()}
    leaks = []
    for split in HELD_OUT:
        for name, keys in trained.items():
            count = sum(1 for r in data[split] if _prompt_keys(r) & keys)
            if count:
                leaks.append(f"{count} of {len(data[split])} {split} prompts are in the {name}")
    if leaks:
        raise ValueError(
            f"data: held-out prompts would be trained on: {'; '.join(leaks)} (compared by normalised text). "
            "Give the pairs and the prompt sets disjoint data, or set data.allow_overlap=true to accept it"
        )


def write_retain(
    model, tokenizer, prompts: list, collect_config, out_dir: Path, cache: Path | None = None
) -> None:
    """The base model's own greedy answers to harmless prompts: training targets that keep it helpful.
    `cache`: where the answers are cached as they are generated (default out_dir/retain_cache.jsonl)."""
    from sails_fast.pairs.generation import generate_unaligned

    texts = [getattr(r, "text", str(r)) for r in prompts]
    cache = out_dir / "retain_cache.jsonl" if cache is None else cache
    answers = generate_unaligned(model, tokenizer, texts, collect_config, cache) if texts else []
    rows = [{"prompt": p, "response": a} for p, a in zip(texts, answers, strict=True) if a.strip()]
    if not distributed.is_main():  # every rank generated its share; rank 0 writes them all
        return
    tmp = out_dir / (RETAIN_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out_dir / RETAIN_FILE)


def read_retain(out_dir: Path) -> list[tuple[str, str]]:
    path = out_dir / RETAIN_FILE
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            rows.append((row["prompt"], row["response"]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path}:{i}: not a retain example ({err}); delete the file to regenerate it"
            ) from err
    return rows
