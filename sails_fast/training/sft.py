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
from torch.utils.checkpoint import checkpoint

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


# CausalLM classes whose forward is exactly: decoder -> lm_head (-> final logit soft-capping), so the
# loss can be taken from the decoder's hidden states chunk by chunk; any other model keeps the plain path
CHUNKABLE_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2", "starcoder2"}
)


# "auto" loss chunks hold this many bytes of fp32 logits (256 tokens of Gemma-2's 256000-word vocabulary)
AUTO_CHUNK_BYTES = 256 * 2**20


def auto_chunk_tokens(vocab: int) -> int:
    """Response tokens per loss chunk for chunk_tokens="auto": AUTO_CHUNK_BYTES of fp32 logits, >= 64."""
    return max(64, AUTO_CHUNK_BYTES // (4 * vocab))


def response_loss(
    model: nn.Module, input_ids, attention_mask, labels, chunk_tokens: int | str | None = None
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the response tokens, and how many there are.

    With `chunk_tokens` the [B, S, V] logits never exist: the decoder's hidden states at the n response
    positions are multiplied by the output embedding `chunk_tokens` rows at a time, each chunk's logits
    upcast, scored and freed, and recomputed in the backward (activation checkpointing per chunk). The
    largest loss-side tensor is then [chunk_tokens, V] in fp32 instead of [B, S, V] (compute dtype) plus
    [n, V] (fp32). Same value and gradients as the plain path up to summation order. Models whose forward
    is not decoder -> lm_head (see CHUNKABLE_MODEL_TYPES) take the plain path.

    Args:
        model: a causal LM returning `.logits` [B, S, V] (or a PEFT model around one).
        input_ids, attention_mask, labels: [B, S] from `sft_batch`.
        chunk_tokens: response tokens per logits chunk; "auto": `auto_chunk_tokens` of the vocabulary;
            None: the model's full logits.

    Returns:
        (loss_sum, n_tokens): fp32 scalar with gradient, int. Position t predicts token t + 1, so a label at
        t + 1 is scored from the logits at t; prompt and padding positions (-100) are ignored.

    Example:
        >>> loss_sum, n = response_loss(model, *sft_batch(encoded, pad_id), chunk_tokens=1024)
        >>> (loss_sum / n).backward()
    """
    target = labels[:, 1:]
    keep = target != -100
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if chunk_tokens is None or not chunkable(base):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        # only the response positions are upcast and scored: [n_tokens, V], not [B, S, V], in fp32
        loss = F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="sum")
        return loss, int(keep.sum())
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    h, t = hidden.last_hidden_state[:, :-1][keep], target[keep]  # [n, d], [n]
    head, cap = base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)
    if chunk_tokens == "auto":
        chunk_tokens = auto_chunk_tokens(head.weight.shape[0])
    loss = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk_tokens):
        args = (h[s : s + chunk_tokens], t[s : s + chunk_tokens], head, cap)
        if torch.is_grad_enabled():
            loss = loss + checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            loss = loss + _chunk_loss(*args)
    return loss, int(keep.sum())


def chunkable(model: nn.Module) -> bool:
    """Whether `response_loss` can take `model`'s loss in chunks (its forward is decoder -> lm_head)."""
    config = getattr(model, "config", None)
    return (
        getattr(config, "model_type", None) in CHUNKABLE_MODEL_TYPES
        and callable(getattr(model, "get_decoder", None))
        and callable(getattr(model, "get_output_embeddings", None))
        and model.get_output_embeddings() is not None
    )


def _chunk_loss(h: torch.Tensor, target: torch.Tensor, head: nn.Module, cap: float | None) -> torch.Tensor:
    logits = head(h).float()  # [chunk, V]
    if cap is not None:  # Gemma-2's final logit soft-capping, as its forward applies it
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, target, reduction="sum")
