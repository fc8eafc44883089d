"""The unaligned side of the contrastive pairs: the model's own greedy completions, generated once and cached
to a JSONL file keyed by prompt content and generation settings.

Under torch.distributed every rank calls `generate_unaligned` with the same prompts: the prompts not yet
cached are split over the ranks (`sails_fast.core.distributed.shard`), each rank appends to its own cache
file (`<name>.rank<r>.jsonl` beside the cache), and the completions are gathered, so every rank returns
all of them. A rerun reads the cache and every rank file, whatever world size wrote them.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sails_fast.core import distributed
from sails_fast.models.hooks import model_device
from sails_fast.pairs.config import CollectConfig
from sails_fast.pairs.tokenize import pad_id, prompt_ids, prompt_messages

CACHE_FORMAT = "sails_fast.unaligned_cache/1"


# ----- the unaligned side


def prompt_hash(prompt: Any) -> str:
    """sha256 of a prompt's content (text and any history): the cache key of its completion."""
    messages, _ = prompt_messages(prompt)
    return hashlib.sha256(
        json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8")
    ).hexdigest()


def _generation_settings(model: nn.Module, config: CollectConfig) -> dict:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = str(getattr(getattr(base, "config", None), "_name_or_path", "") or type(base).__name__)
    return {
        "model": name,
        "chat_template": config.chat_template,
        "max_new_tokens": config.max_new_tokens,
        "max_length": config.max_length,
        "decoding": "greedy",
    }


def rank_cache_files(path: Path) -> list[Path]:
    """The per-rank cache files written beside `path` by a distributed run."""
    return sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))


def _rank_cache(path: Path) -> Path:
    """Where this rank appends its completions: `path` itself in a single process."""
    if not distributed.active():
        return path
    return path.with_name(f"{path.stem}.rank{distributed.rank()}{path.suffix}")


def _read_cache(path: Path, settings: dict, repair: bool = True) -> dict[str, str]:
    """Completed records of a cache file; a torn last line (a killed writer) is dropped, and rewritten when
    `repair` (only the file's own writer repairs it)."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    # every complete record ends in a newline, so only the final segment can be torn
    torn = lines.pop() != ""
    done, good = {}, []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ok = (
                isinstance(rec, dict)
                and rec.get("format") == CACHE_FORMAT
                and {"hash", "response"} <= set(rec)
            )
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise ValueError(
                f"cache_path: {path} line {i + 1} is not an unaligned-completion record (corrupted?)"
            )
        if rec.get("settings") != settings:
            raise ValueError(
                f"cache_path: {path} holds completions made with {rec.get('settings')}, not {settings}; "
                "use another cache file"
            )
        done[rec["hash"]] = rec["response"]
        good.append(line)
    if torn and repair:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(g + "\n" for g in good), encoding="utf-8")
        tmp.replace(path)
    return done


@torch.no_grad()
def generate_unaligned(
    model: nn.Module, tokenizer, prompts: Sequence, config: CollectConfig, cache_path: str | Path
) -> list[str]:
    """The model's own greedy completions of `prompts`, generated once and cached.

    Each completion is appended to `cache_path` (JSONL, one record per prompt keyed by the sha256 of the
    prompt and its history, with the generation settings) as soon as its batch is done, so a killed run
    resumes where it stopped; a cache made with other settings (model, template, lengths) is refused.

    Args:
        model: the unaligned causal LM.
        tokenizer: its tokenizer (needs a pad or eos token for batching).
        prompts: str, ContrastivePair or PromptRecord items.
        config: CollectConfig (chat_template, batch_size, max_length for the prompt, max_new_tokens).
        cache_path: the JSONL file (created with its parent folders).

    Returns:
        list[str]: one completion per prompt, in order (special tokens removed).

    Example:
        >>> texts = generate_unaligned(model, tok, [p.prompt for p in pairs], CollectConfig(), "gen.jsonl")
        >>> pairs = [p.with_unaligned(t, "generated") for p, t in zip(pairs, texts)]
    """
    from tqdm.auto import tqdm

    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got none")
    path = Path(cache_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = _generation_settings(model, config)
    own = _rank_cache(path)
    done = {}
    for file in [path, *rank_cache_files(path)]:
        done.update(_read_cache(file, settings, repair=file == own))
    keys = [prompt_hash(p) for p in prompts]
    todo, seen = [], set()
    for key, prompt in zip(keys, prompts, strict=True):
        if key not in done and key not in seen:
            todo.append((key, prompt))
            seen.add(key)
    # rank 0's list for all: a rank that reads the caches after another rank has started appending to
    # its own would otherwise see fewer prompts to do and split them differently
    todo = distributed.broadcast(todo)
    todo_all, todo = todo, list(distributed.shard(todo))

    device = model_device(model)
    pad = pad_id(tokenizer)
    was_training = model.training
    model.eval()
    n_truncated = 0
    try:
        bar = tqdm(range(0, len(todo), config.batch_size), desc="unaligned completions", unit="batch",
                   disable=not config.progress or not todo or not distributed.is_main())  # fmt: skip
        for start in bar:
            chunk = todo[start : start + config.batch_size]
            encoded = []
            for _, prompt in chunk:
                ids = prompt_ids(tokenizer, prompt, config.chat_template)
                if len(ids) > config.max_length:
                    n_truncated += 1
                    ids = ids[len(ids) - config.max_length :]
                encoded.append(ids)
            # left padding, so every row's generation starts right after its own prompt
            S = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(encoded), S), pad, dtype=torch.long)
            attention = torch.zeros_like(input_ids)
            for b, ids in enumerate(encoded):
                input_ids[b, S - len(ids) :] = torch.tensor(ids)
                attention[b, S - len(ids) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=False,
                max_new_tokens=config.max_new_tokens, pad_token_id=pad,
            )  # fmt: skip
            with own.open("a", encoding="utf-8") as f:
                for (key, _), row in zip(chunk, out[:, S:].tolist(), strict=True):
                    text = tokenizer.decode(row, skip_special_tokens=True)
                    done[key] = text
                    rec = {"format": CACHE_FORMAT, "hash": key, "response": text, "settings": settings}
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
    finally:
        model.train(was_training)
    if distributed.active() and todo_all:
        # every rank returns every completion: its own and those the others generated
        for part in distributed.gather({key: done[key] for key, _ in todo}):
            done.update(part)
        n_truncated = int(distributed.all_sum(n_truncated))
    if n_truncated:
        warnings.warn(
            f"max_length: {n_truncated} prompts are longer than {config.max_length} tokens and were "
            "truncated (oldest tokens dropped) before generation",
            stacklevel=2,
        )
    return [done[key] for key in keys]


def complete_pairs(
    model: nn.Module, tokenizer, pairs: Sequence, config: CollectConfig, cache_path: str | Path
):
    """Fill the missing unaligned side of `pairs` with `generate_unaligned` (pairs that have one are kept).

    Args:
        model, tokenizer, config, cache_path: as for `generate_unaligned`.
        pairs: ContrastivePair records.

    Returns:
        list[ContrastivePair]: the same pairs in order, filled in ("generated") where the completion is
        not empty; an empty completion leaves unaligned=None, with a warning.

    Example:
        >>> pairs = complete_pairs(model, tok, pairs, CollectConfig(), "out/unaligned.jsonl")
    """
    missing = [i for i, p in enumerate(pairs) if p.unaligned is None]
    if not missing:
        return list(pairs)
    texts = generate_unaligned(model, tokenizer, [pairs[i] for i in missing], config, cache_path)
    out, empty = list(pairs), 0
    for i, text in zip(missing, texts, strict=True):
        if text.strip():
            out[i] = pairs[i].with_unaligned(text, "generated")
        else:
            empty += 1
    if empty:
        warnings.warn(
            f"pairs: the model's completion was empty for {empty} of {len(missing)} prompts; those pairs "
            "keep unaligned=None (collect_feature_stats uses only their aligned side)",
            stacklevel=2,
        )
    return out
