"""SAE feature statistics over contrastive pairs, streamed through forward hooks (METHOD.md step 2).

`collect_feature_stats` runs the frozen model over both sides of every pair (class 0 = aligned, class 1 =
unaligned), hooks the residual stream at the SAE layers and folds each batch into per-layer FeatureStats
with `sails_fast.sae_feature_stats`. Only [classes x latents] accumulators are kept, never anything per
token, and the forward stops after the deepest hooked layer. Under torch.distributed each rank runs a
contiguous share of the batches (the same batches a single process would run, so each example is seen
once and with the same padding) and the statistics are all-reduced: counts, maxima and argmax equal the
single-process run exactly, sums up to fp32 summation order. Examples are tokenised as training
tokenises them (`sails_fast.pairs.tokenize.tokenize_example`); the unaligned side comes from
`sails_fast.pairs.generation`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sails_fast.core import distributed
from sails_fast.core.feature_stats import ALIGNED, UNALIGNED
from sails_fast.models.hooks import StopForward, decoder_layers, hidden_size, model_device
from sails_fast.pairs.config import CollectConfig
from sails_fast.pairs.tokenize import pad_id, tokenize_example


def _sae_feature_stats():
    # looked up at call time so the op's module is imported only when statistics are collected
    from sails_fast.fused.sae_stats import sae_feature_stats

    return sae_feature_stats


def _sae_width(sae) -> int:
    return int(sae.W_enc.shape[0])


def _sae_latents(sae) -> int:
    return int(sae.W_enc.shape[1])


def _examples(pairs: Sequence) -> list[tuple[Any, str, int, int]]:
    """(prompt, response, label, pair index) for both sides of each pair, aligned then unaligned."""
    if pairs is None or len(pairs) == 0:
        raise ValueError("pairs: expected at least one contrastive pair, got none")
    out = []
    for i, pair in enumerate(pairs):
        for label, attr in ((ALIGNED, "aligned"), (UNALIGNED, "unaligned")):
            if not hasattr(pair, attr):
                raise ValueError(f"pairs[{i}]: expected a ContrastivePair with .prompt, .aligned, .unaligned")
            response = getattr(pair, attr)
            if response is not None and response.strip():
                out.append((pair, response, label, i))
    present = {label for _, _, label, _ in out}
    if present != {ALIGNED, UNALIGNED}:
        missing = "unaligned" if UNALIGNED not in present else "aligned"
        raise ValueError(
            f"pairs: every pair lacks an {missing} response, so there is only one class; both aligned "
            "(class 0) and unaligned (class 1) responses are needed (generate the unaligned side first)"
        )
    return out


def _check_layers(model: nn.Module, saes: dict, config: CollectConfig) -> list[int]:
    if not isinstance(saes, dict) or not saes:
        raise ValueError("saes: expected a non-empty dict {layer index: SAEWeights}")
    layers = decoder_layers(model)
    n = len(layers)
    for layer in saes:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise ValueError(
                f"saes: layer index {layer!r} out of range; the model has {n} layers (0..{n - 1})"
            )
    if config.layers and set(config.layers) != set(saes):
        raise ValueError(f"layers: config.layers {sorted(config.layers)} != the SAE layers {sorted(saes)}")
    d_model = hidden_size(model)
    for layer, sae in saes.items():
        if _sae_width(sae) != d_model:
            raise ValueError(
                f"saes[{layer}]: SAE input width {_sae_width(sae)} != model hidden size {d_model}; "
                "the SAE was trained on another model or another hook point"
            )
    return sorted(saes)


def _batch(encoded: list[tuple[list[int], int]], labels: list[int], pooling: str, pad_id: int, device):
    """Right-padded ids, attention mask, per-token labels (-1 = prompt or padding) and weights."""
    B = len(encoded)
    S = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    attention = torch.zeros((B, S), dtype=torch.long)
    token_labels = torch.full((B, S), -1, dtype=torch.long)
    weights = torch.zeros((B, S), dtype=torch.float32)
    for b, ((ids, n_prompt), label) in enumerate(zip(encoded, labels, strict=True)):
        L, n_resp = len(ids), len(ids) - n_prompt
        input_ids[b, :L] = torch.tensor(ids)
        attention[b, :L] = 1
        token_labels[b, n_prompt:L] = label
        weights[b, n_prompt:L] = 1.0 / n_resp if pooling == "response_mean" else 1.0
    to = lambda t: t.to(device)
    return to(input_ids), to(attention), to(token_labels.reshape(-1)), to(weights.reshape(-1))


@torch.no_grad()
def collect_feature_stats(
    model: nn.Module, tokenizer, saes: dict, pairs: Sequence, config: CollectConfig
) -> dict:
    """Per-layer, per-class SAE feature statistics over the responses of contrastive pairs.

    Each pair gives two examples, prompt + aligned response (class 0) and prompt + unaligned response
    (class 1). Only response tokens count (prompt and padding tokens get label -1 and are dropped before
    the SAE); with pooling "response_mean" each response token weighs 1/len(response), so
    `stats.mean()` is the mean over examples of the per-example mean activation. Tokens reach the SAE in
    example order (pair 0 aligned, pair 0 unaligned, pair 1 aligned, ...), so `act_argmax` indexes the
    stream of (possibly truncated) response tokens, whatever the batch size.

    Args:
        model: a causal LM (plain, PEFT-wrapped or 4-bit); frozen and run in eval mode (restored after).
        tokenizer: its tokenizer.
        saes: {layer index: SAEWeights}, each with input width = the model's hidden size.
        pairs: ContrastivePair records (`.prompt`, `.aligned`, `.unaligned`, optional `.history`); a side
            that is None or empty is skipped, but both classes must be present.
        config: CollectConfig.

    Returns:
        dict[int, FeatureStats]: per layer, C = 2 classes x F = the SAE's latents, on the model's device.

    Example:
        >>> stats = collect_feature_stats(model, tok, {10: sae}, pairs, CollectConfig(layers=(10,)))
        >>> d = stats[10].mean()[0] - stats[10].mean()[1]     # [F] aligned minus unaligned
    """
    from tqdm.auto import tqdm

    from sails_fast.core.feature_stats import FeatureStats

    layers = _check_layers(model, saes, config)
    examples = _examples(pairs)
    sae_feature_stats = _sae_feature_stats()
    device = model_device(model)
    saes = {layer: (sae.to(device) if hasattr(sae, "to") else sae) for layer, sae in saes.items()}
    stats = {layer: FeatureStats.empty(2, _sae_latents(saes[layer]), device=device) for layer in layers}

    encoded, n_truncated = [], 0
    for prompt, response, _, _ in examples:
        ids, n_prompt, cut = tokenize_example(
            tokenizer, prompt, response, chat_template=config.chat_template, max_length=config.max_length
        )
        encoded.append((ids, n_prompt))
        n_truncated += cut
    if n_truncated and distributed.is_main():
        warnings.warn(
            f"max_length: {n_truncated} of {len(encoded)} examples are longer than {config.max_length} "
            "tokens and were truncated",
            stacklevel=2,
        )

    # the current batch's labels and weights, read by the hooks
    current: dict[str, torch.Tensor] = {}
    deepest = layers[-1]

    def make_hook(layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            keep = current["labels"] >= 0
            x = h.reshape(-1, h.shape[-1])[keep]
            sae_feature_stats(
                x, saes[layer], current["labels"][keep], token_weights=current["weights"][keep],
                num_classes=2, out=stats[layer], backend=config.backend,
            )  # fmt: skip
            if layer == deepest:
                raise StopForward

        return hook

    blocks = decoder_layers(model)
    was_training = model.training
    handles = []
    try:
        model.eval()
        for layer in layers:
            handles.append(blocks[layer].register_forward_hook(make_hook(layer)))
        # whole batches per rank, in stream order: the argmax offsets of `all_reduce` follow rank order
        starts = distributed.shard(range(0, len(encoded), config.batch_size))
        quiet = not config.progress or not distributed.is_main()
        bar = tqdm(starts, desc="feature stats", unit="batch", disable=quiet)
        for start in bar:
            chunk = slice(start, start + config.batch_size)
            labels = [label for _, _, label, _ in examples[chunk]]
            input_ids, attention, current["labels"], current["weights"] = _batch(
                encoded[chunk], labels, config.pooling, pad_id(tokenizer), device
            )
            try:
                model(input_ids=input_ids, attention_mask=attention, use_cache=False)
            except StopForward:
                pass
            else:
                raise RuntimeError(
                    "the deepest hooked layer did not run; the hooks are not on the decoder blocks"
                )
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for layer_stats in stats.values():
        layer_stats.all_reduce()
    return stats
