"""The baselines SAILS is compared against, built so they drop into the same pipeline.

Hidden-space subspaces (METHOD.md, "Baselines"): the same contrastive pairs, the same layers and the same
pooling as the SAE statistics, but read straight from the residual stream instead of through an SAE:

    diffmean   the rank-1 "refusal direction" mean(h_aligned) - mean(h_unaligned), completed to rank r with a
               random orthonormal complement (`sails_fast.study.theory_estimators.complete_basis`)
    pca_diff   the top-r principal directions of the per-pair differences h_aligned[i] - h_unaligned[i]
               (uncentred, `sails_fast.study.theory_estimators.pca_of_differences`)

Both return a `Subspace`, so `init_lora_from_subspace` initialises LoRA from them exactly as it does from
the SAE subspace (A = U^T on read-side modules, B = U on write-side ones).

PEFT's own inits (`peft_init_model`): "pissa" and "corda" rewrite the base weight (W - B A stays in the
model), so they need a full-precision base and cannot run on a 4-bit NF4 one; "eva" only sets A from the
SVD of each layer's inputs and runs on either. "lora" is PEFT's default (Kaiming-uniform A, B = 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sails_fast.models.hooks import StopForward, decoder_layers, model_device
from sails_fast.pairs.config import CollectConfig
from sails_fast.pairs.tokenize import pad_id, tokenize_example
from sails_fast.statistics.collect import ALIGNED, UNALIGNED, _batch, _examples
from sails_fast.study.theory_estimators import complete_basis, diff_of_means_direction, pca_of_differences
from sails_fast.subspace.config import SubspaceConfig
from sails_fast.subspace.subspace import Subspace, SubspaceBasis

HIDDEN_METHODS = ("diffmean", "pca_diff")


PEFT_INITS = ("lora", "pissa", "corda", "eva")


# PEFT inits that subtract B A from the base weight: impossible on a quantised base
NEEDS_FULL_PRECISION_BASE = ("pissa", "corda")


@torch.no_grad()
def collect_hidden_pooled(
    model: nn.Module, tokenizer, pairs: Sequence, layers: Sequence[int], config: CollectConfig
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per-pair pooled residual-stream activations, aligned and unaligned side, at each layer.

    The same tokens and the same pooling as `collect_feature_stats` (response tokens only; with
    "response_mean" the mean over each response's tokens), so the hidden-space baselines see exactly the
    data the SAE route sees.

    Args:
        model: a causal LM (frozen; eval mode, restored after).
        tokenizer: its tokenizer.
        pairs: ContrastivePair records with both sides; pairs missing a side are dropped.
        layers: decoder-block indices (the residual stream after each block is read).
        config: CollectConfig (chat_template, max_length, batch_size, pooling).

    Returns:
        {layer: (aligned [n, d], unaligned [n, d])} fp32 on CPU, row i of both from the same pair.

    Example:
        >>> pooled = collect_hidden_pooled(model, tok, pairs, [15], CollectConfig())
        >>> pooled[15][0].shape      # [n_pairs, d]
    """
    from tqdm.auto import tqdm

    blocks = decoder_layers(model)
    layers = sorted(set(layers))
    if not layers or any(not isinstance(x, int) or not 0 <= x < len(blocks) for x in layers):
        raise ValueError(f"layers: expected layer indices in [0, {len(blocks)}), got {list(layers)}")
    examples = _examples(pairs)
    encoded = [
        tokenize_example(
            tokenizer, prompt, response, chat_template=config.chat_template, max_length=config.max_length
        )[:2]
        for prompt, response, _, _ in examples
    ]
    device = model_device(model)
    pooled: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    current: dict[str, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            w = current["weights"].view(h.shape[0], h.shape[1], 1).to(h.dtype)
            pooled[layer].append((h * w).sum(1).float().cpu())
            if layer == layers[-1]:
                raise StopForward

        return hook

    handles, was_training = [], model.training
    try:
        model.eval()
        handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
        starts = range(0, len(encoded), config.batch_size)
        for start in tqdm(starts, desc="hidden states", unit="batch", disable=not config.progress):
            chunk = slice(start, start + config.batch_size)
            labels = [label for _, _, label, _ in examples[chunk]]
            input_ids, attention, _, current["weights"] = _batch(
                encoded[chunk], labels, config.pooling, pad_id(tokenizer), device
            )
            with contextlib.suppress(StopForward):
                model(input_ids=input_ids, attention_mask=attention, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    # pair the two sides by pair index; a pair with only one side has no difference to offer
    sides: dict[int, dict[int, int]] = {}
    for row, (_, _, label, pair_index) in enumerate(examples):
        sides.setdefault(pair_index, {})[label] = row
    both = [(s[ALIGNED], s[UNALIGNED]) for _, s in sorted(sides.items()) if len(s) == 2]
    if not both:
        raise ValueError("pairs: no pair has both an aligned and an unaligned response")
    rows_a = torch.tensor([a for a, _ in both])
    rows_u = torch.tensor([u for _, u in both])
    out = {}
    for layer in layers:
        h = torch.cat(pooled[layer])
        out[layer] = (h[rows_a], h[rows_u])
    return out


def _basis(U: torch.Tensor, n_kept: int, spectrum: torch.Tensor, layer: int) -> SubspaceBasis:
    energy = spectrum.square()
    total = energy.sum()
    explained = energy / total if total > 0 else torch.zeros_like(energy)
    return SubspaceBasis(
        U=U.float().contiguous(),
        singular_values=spectrum.float(),
        explained=explained.float(),
        n_components=n_kept,
        n_kept=n_kept,
        # no SAE features: the basis comes from the hidden space (kept keyed by layer for init's basis rule)
        feature_ids={layer: torch.zeros(0, dtype=torch.long)},
        loadings=torch.zeros(0, U.shape[1]),
    )


def hidden_subspace(
    pooled: dict[int, tuple[torch.Tensor, torch.Tensor]], method: str, rank: int, seed: int = 0
) -> Subspace:
    """A `Subspace` (one basis per layer) from pooled hidden states, by a hidden-space method.

    Args:
        pooled: from `collect_hidden_pooled`.
        method: "diffmean" (rank-1 direction + random orthonormal complement) or "pca_diff" (top-r
            principal directions of the per-pair differences, uncentred).
        rank: r, the LoRA rank.
        seed: seed of the random complement ("diffmean"); the basis of layer l uses seed + l.

    Returns:
        Subspace with `config.rank = rank`, ready for `init_lora_from_subspace`.

    Example:
        >>> sub = hidden_subspace(pooled, "diffmean", rank=16, seed=0)
    """
    if method not in HIDDEN_METHODS:
        raise ValueError(f"method: expected one of {HIDDEN_METHODS}, got {method!r}")
    if not isinstance(pooled, dict) or not pooled:
        raise ValueError("pooled: expected {layer: (aligned [n, d], unaligned [n, d])}, got nothing")
    bases, d = {}, None
    for layer, (ha, hu) in sorted(pooled.items()):
        ha, hu = ha.double(), hu.double()
        n, d = ha.shape
        if not (isinstance(rank, int) and 1 <= rank <= d):
            raise ValueError(f"rank: expected an int in [1, {d}], got {rank!r}")
        delta = ha - hu
        if method == "diffmean":
            direction = diff_of_means_direction(ha, hu)
            U = complete_basis(direction, rank, seed=seed + layer)
            spectrum = torch.linalg.vector_norm(delta.mean(0)).reshape(1)
            bases[layer] = _basis(U, 1, spectrum, layer)
        else:
            if n < rank:
                raise ValueError(f"pooled[{layer}]: PCA of rank {rank} needs >= {rank} pairs, got {n}")
            U = pca_of_differences(ha, hu, rank)
            spectrum = torch.linalg.svdvals(delta)
            bases[layer] = _basis(U, rank, spectrum, layer)
    config = SubspaceConfig(rank=rank, seed=seed)
    return Subspace(bases=bases, config=config, d_model=int(d))


def peft_lora_config(method: str, base_config, calibration: Any = None):
    """The LoraConfig for a PEFT init ("lora", "pissa", "corda", "eva") on top of `base_config`.

    EVA's rank redistribution is turned off (rho = 1), so every module keeps rank r: the same budget as the
    other methods. CorDA uses its instruction-previewed mode ("ipm").
    """
    import copy

    if method not in PEFT_INITS:
        raise ValueError(f"method: expected one of {PEFT_INITS}, got {method!r}")
    config = copy.deepcopy(base_config)
    if method == "lora":
        config.init_lora_weights = True
    elif method == "pissa":
        config.init_lora_weights = "pissa"
    elif method == "corda":
        from peft.tuners.lora.config import CordaConfig

        config.init_lora_weights = "corda"
        config.corda_config = CordaConfig(corda_method="ipm")
    else:
        from peft.tuners.lora.config import EvaConfig

        config.init_lora_weights = "eva"
        config.eva_config = EvaConfig(rho=1.0)
    return config


def peft_init_model(
    method: str,
    base: nn.Module,
    lora_config,
    calibration_batches: Callable[[], list[dict[str, torch.Tensor]]] | None = None,
    quantized: bool = False,
):
    """get_peft_model with one of PEFT's inits; data-driven ones read `calibration_batches()`.

    Args:
        method: "lora", "pissa", "corda" or "eva".
        base: the base model (full precision for pissa / corda).
        lora_config: the shared LoraConfig (rank, alpha, targets); the init fields are set here.
        calibration_batches: returns a list of {"input_ids", "attention_mask", "labels"} batches (on the
            model's device); needed by "corda" (covariance of layer inputs) and "eva" (SVD of layer inputs).
        quantized: whether `base` is 4-bit; pissa / corda raise ValueError then.

    Returns:
        the PEFT model.
    """
    from peft import get_peft_model

    if method in NEEDS_FULL_PRECISION_BASE and quantized:
        raise ValueError(
            f"method: {method!r} rewrites the base weight (W - B A), which a 4-bit NF4 base cannot hold; "
            "run it with model.quantize = 'none'"
        )
    if method in ("corda", "eva") and calibration_batches is None:
        raise ValueError(f"calibration_batches: {method!r} is data-driven and needs calibration batches")
    config = peft_lora_config(method, lora_config)
    if method == "corda":
        from peft.tuners.lora.corda import preprocess_corda

        batches = calibration_batches()

        @torch.no_grad()
        def run_model() -> None:
            # PEFT's CorDA hook squeezes the batch dimension: it takes one unpadded sequence per forward
            for batch in batches:
                for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                    base(input_ids=ids[: int(mask.sum())].unsqueeze(0), use_cache=False)

        preprocess_corda(base, config, run_model=run_model)
        return get_peft_model(base, config)
    if method == "eva":
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        model = get_peft_model(base, config, low_cpu_mem_usage=True)
        initialize_lora_eva_weights(model, calibration_batches(), show_progress_bar=False)
        return model
    return get_peft_model(base, config)


__all__ = [
    "HIDDEN_METHODS",
    "NEEDS_FULL_PRECISION_BASE",
    "PEFT_INITS",
    "collect_hidden_pooled",
    "hidden_subspace",
    "peft_init_model",
    "peft_lora_config",
]
