"""Residual-stream activations for SAE training: tokenised texts run through the model, the hooked layer's
outputs kept."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sails_fast.models.hooks import StopForward, decoder_layers


def _check_int(name: str, v: Any, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {v!r}")


# ----- activations


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
        raise ValueError(f"texts: expected a non-empty list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t:
            raise ValueError(f"texts[{i}]: expected a non-empty str, got {t!r}")
    return list(texts)


def _tokenize(tokenizer, texts: list[str], max_seq_len: int) -> list[list[int]]:
    bos = getattr(tokenizer, "bos_token", None)
    out = []
    for t in texts:
        # chat-rendered texts already start with BOS where the template writes one
        add = not (bos and t.startswith(bos))
        ids = list(tokenizer(t, add_special_tokens=add)["input_ids"])[:max_seq_len]
        out.append(ids)
    return out


def _new_positions(ids: list[int], seen: set[int]) -> list[int]:
    # a position's activation depends only on its token prefix (causal model): a prefix seen before
    # gives an exact duplicate vector (the chat template's shared system prompt, repeated prompts)
    keep, h = [], 0
    for i, tok in enumerate(ids):
        h = hash((h, tok))
        if h not in seen:
            seen.add(h)
            keep.append(i)
    return keep


@torch.no_grad()
def collect_residual_activations(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layer: int,
    *,
    max_seq_len: int = 128,
    batch_size: int = 16,
    seen_prefixes: set[int] | None = None,
) -> torch.Tensor:
    """Residual-stream activations after decoder block `layer`, one row per new token position.

    The hook sits on the block's output (h_l in METHOD.md); the forward stops right after it. Texts are
    tokenised as given (the tokenizer's special tokens are added unless a text already starts with BOS)
    and cut to `max_seq_len`. Positions whose whole token prefix was already seen (in this call or in
    `seen_prefixes`) are skipped: their vectors would be exact copies.

    Args:
        model: a Hugging Face causal LM (any dtype; runs on its own device).
        tokenizer: its tokenizer.
        texts: the texts, already rendered (e.g. through the chat template).
        layer: block index, 0 <= layer < num_hidden_layers.
        max_seq_len: tokens per text.
        batch_size: texts per forward (sorted by length, so padding stays small).
        seen_prefixes: prefix hashes to skip and to extend (pass the same set to a second call to
            keep held-out tokens disjoint from training tokens).

    Returns:
        torch.Tensor [N, d] fp32 on CPU, rows in text order.

    Example:
        >>> acts = collect_residual_activations(model, tok, ["Hello there"], layer=15)   # [2, 576]
    """
    texts = _check_texts(texts)
    blocks = decoder_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(blocks):
        raise ValueError(f"layer: expected an int in [0, {len(blocks)}), got {layer!r}")
    _check_int("max_seq_len", max_seq_len, 1)
    _check_int("batch_size", batch_size, 1)
    seen = set() if seen_prefixes is None else seen_prefixes
    tokenized = _tokenize(tokenizer, texts, max_seq_len)
    keep = [_new_positions(ids, seen) for ids in tokenized]
    device = next(model.parameters()).device
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None else 0

    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise StopForward

    rows: list[torch.Tensor | None] = [None] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(tokenized[i]))
    handle = blocks[layer].register_forward_hook(hook)
    was_training = model.training
    try:
        model.eval()
        for start in range(0, len(order), batch_size):
            idx = [i for i in order[start : start + batch_size] if keep[i]]
            if not idx:
                continue
            width = max(len(tokenized[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(tokenized[i])] = torch.tensor(tokenized[i])
                mask[r, : len(tokenized[i])] = 1
            with contextlib.suppress(StopForward):
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            h = captured.pop("h").float().cpu()
            for r, i in enumerate(idx):
                rows[i] = h[r, keep[i]]
    finally:
        handle.remove()
        model.train(was_training)
    kept = [r for r in rows if r is not None]
    if not kept:
        raise ValueError("texts: no new token positions (every prefix was already seen)")
    return torch.cat(kept)
