"""Supervised fine-tuning data and loss: (prompt, response) examples to padded batches, and the loss on
response tokens only."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ----- data


def _sft_examples(examples: Sequence) -> list[tuple[Any, str]]:
    """(prompt, aligned response) from ContrastivePair records or (prompt, response) tuples."""
    if examples is None or len(examples) == 0:
        raise ValueError("examples: expected at least one training example, got none")
    out = []
    for i, ex in enumerate(examples):
        if hasattr(ex, "aligned") and hasattr(ex, "prompt"):
            out.append((ex, ex.aligned))
        elif isinstance(ex, (tuple, list)) and len(ex) == 2 and all(isinstance(t, str) for t in ex):
            out.append((ex[0], ex[1]))
        else:
            raise ValueError(
                f"examples[{i}]: expected a ContrastivePair or a (prompt, response) pair of strings, "
                f"got {type(ex).__name__}"
            )
        if not isinstance(out[-1][1], str) or not out[-1][1].strip():
            raise ValueError(f"examples[{i}]: the aligned response is empty")
    return out


def _fingerprint(encoded: list[tuple[list[int], int]]) -> str:
    h = hashlib.sha256()
    for ids, n_prompt in encoded:
        h.update(json.dumps([n_prompt, ids]).encode())
    return h.hexdigest()


def sft_batch(encoded: Sequence[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded input_ids, attention_mask and labels (-100 on prompt and padding tokens).

    Args:
        encoded: (ids, n_prompt) per example, as `tokenize_example` returns them.
        pad_id: the id written into padding positions.

    Returns:
        input_ids [B, S] int64, attention_mask [B, S] int64, labels [B, S] int64 (= input_ids on response
        tokens, -100 elsewhere; the shift for next-token prediction happens in `response_loss`).

    Example:
        >>> ids, mask, labels = sft_batch([tokenize_example(tok, "hi", "hello", ...)[:2]], tok.pad_token_id)
    """
    S = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), S), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for b, (ids, n_prompt) in enumerate(encoded):
        t = torch.tensor(ids)
        input_ids[b, : len(ids)] = t
        mask[b, : len(ids)] = 1
        labels[b, n_prompt : len(ids)] = t[n_prompt:]
    return input_ids, mask, labels


def response_loss(model: nn.Module, input_ids, attention_mask, labels) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the response tokens, and how many there are.

    Args:
        model: a causal LM returning `.logits` [B, S, V].
        input_ids, attention_mask, labels: [B, S] from `sft_batch`.

    Returns:
        (loss_sum, n_tokens): fp32 scalar with gradient, int. Position t predicts token t + 1, so a label at
        t + 1 is scored from the logits at t; prompt and padding positions (-100) are ignored.

    Example:
        >>> loss_sum, n = response_loss(model, *sft_batch(encoded, pad_id)); (loss_sum / n).backward()
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    target = labels[:, 1:]
    keep = target != -100
    # only the response positions are upcast and scored: [n_tokens, V], not [B, S, V], in fp32
    loss = F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="sum")
    return loss, int(keep.sum())
