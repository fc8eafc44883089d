"""Train a sparse autoencoder on one layer's residual stream through SAELens, offline, on CPU.

    collect_residual_activations   forward hook on decoder block `layer` (its output is the residual
                                   stream after the block), early stop after it, duplicate prefixes dropped
    train_sae                      SAELens SAETrainer on those activations; held-out metrics; optional
                                   atomic save with SAELens' own `save_model`
    embedded_sae                   the default SAE of the embedded SmolLM2 model: trained once, cached
    default_sae_texts              the training texts built from installed wheels and the chat template

Metrics (all on held-out tokens, see `sae_metrics`): explained variance, L0, dead-latent fraction.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from sails_fast.core.config import ConfigBase
from sails_fast.models.embedded import build_once
from sails_fast.sae.weights import SAEWeights
from sails_fast.sae_training.activations import (
    _check_int,
    _check_texts,
    _tokenize,
    collect_residual_activations,
)

Architecture = Literal["standard", "topk", "jumprelu"]


ARCHITECTURES = ("standard", "topk", "jumprelu")


ARTIFACT_VERSION = 1


# default sparsity coefficient per architecture: l1 for standard, l0 for jumprelu (topk uses k)
_DEFAULT_SPARSITY = {"standard": 5.0, "jumprelu": 2.0, "topk": 0.0}


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class SAETrainingConfig(ConfigBase):
    """How to train an SAE on one layer (the layer itself is an argument of `train_sae`).

    Args:
        architecture: "topk" (k largest pre-activations kept), "standard" (ReLU + L1 penalty) or
            "jumprelu" (thresholded ReLU + L0 penalty), as SAELens trains them.
        expansion_factor: latents = expansion_factor * hidden size (8 -> 4608 at hidden 576).
        k: active latents per token for "topk".
        sparsity_coefficient: the L1 coefficient ("standard") or the L0 coefficient ("jumprelu");
            None takes 5.0 / 2.0. Unused by "topk".
        training_tokens: activation vectors the trainer sees (the stored set is cycled through,
            reshuffled each pass, when it is smaller).
        batch_size: activation vectors per optimiser step.
        lr: Adam learning rate; linear warm-up over the first 5 % of steps, cosine decay to lr / 10.
        dead_feature_window: steps without firing after which a latent counts as dead for TopK's
            auxiliary loss (SAELens' default 1000 is longer than a short CPU run).
        max_seq_len: tokens per text (longer texts are cut).
        collect_tokens: stop taking texts (in a seeded random order) once they hold this many tokens;
            None takes them all. The model forward is the slow part on CPU (see `select_texts`).
        collect_batch_size: texts per model forward when collecting activations.
        eval_fraction: share of texts (not tokens) held out for the metrics.
        autocast: train under bf16 autocast (about 2x faster on CPUs with AVX512-BF16; the weights and
            the metrics stay fp32). "auto": where this CPU has a fast bf16 matmul
            (`sails_fast.models.loading.fast_bf16_on_cpu`); elsewhere bf16 is ~100x slower than fp32.
        seed: seeds the held-out split, the SAE initialisation and the batch order.

    Example:
        >>> cfg = SAETrainingConfig(architecture="topk", k=32, training_tokens=200_000)
        >>> SAETrainingConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    architecture: Architecture = "topk"
    expansion_factor: int = 8
    k: int = 32
    sparsity_coefficient: float | None = None
    training_tokens: int = 400_000
    batch_size: int = 1024
    lr: float = 3e-3
    dead_feature_window: int = 40
    max_seq_len: int = 128
    collect_tokens: int | None = 120_000
    collect_batch_size: int = 16
    eval_fraction: float = 0.1
    autocast: bool | str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture: expected one of {ARCHITECTURES}, got {self.architecture!r}")
        for name in ("expansion_factor", "k", "training_tokens", "batch_size", "dead_feature_window"):
            _check_int(name, getattr(self, name), 1)
        _check_int("max_seq_len", self.max_seq_len, 2)
        _check_int("collect_batch_size", self.collect_batch_size, 1)
        if self.collect_tokens is not None:
            _check_int("collect_tokens", self.collect_tokens, 1)
        _check_int("seed", self.seed, 0)
        if self.training_tokens < self.batch_size:
            raise ValueError(
                f"training_tokens: expected >= batch_size ({self.batch_size}), got {self.training_tokens}"
            )
        if not _is_real(self.lr) or not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr: expected a finite float > 0, got {self.lr!r}")
        if self.sparsity_coefficient is not None and (
            not _is_real(self.sparsity_coefficient)
            or not math.isfinite(self.sparsity_coefficient)
            or self.sparsity_coefficient < 0
        ):
            raise ValueError(
                f"sparsity_coefficient: expected None or a finite float >= 0, got {self.sparsity_coefficient}"
            )
        if not _is_real(self.eval_fraction) or not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: expected a float in (0, 1), got {self.eval_fraction!r}")
        if not isinstance(self.autocast, bool) and self.autocast != "auto":
            raise ValueError(f'autocast: expected a bool or "auto", got {self.autocast!r}')

    def resolved_autocast(self) -> bool:
        """`autocast` with "auto" decided for this CPU."""
        from sails_fast.models.loading import fast_bf16_on_cpu

        return fast_bf16_on_cpu() if self.autocast == "auto" else bool(self.autocast)

    @property
    def sparsity(self) -> float:
        """The sparsity coefficient in effect (the architecture's default when None)."""
        if self.sparsity_coefficient is None:
            return _DEFAULT_SPARSITY[self.architecture]
        return float(self.sparsity_coefficient)

    def num_latents(self, d_model: int) -> int:
        """Latents of the SAE for a hidden size `d_model`."""
        return self.expansion_factor * d_model

    def hash(self) -> str:
        """12 hex digits identifying every field (the cache key part of this config)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# ----- metrics


@torch.no_grad()
def sae_metrics(sae: SAEWeights, x: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """Reconstruction and sparsity of `sae` on activations `x` [N, d], in fp32.

    With a = sae.encode(x) [N, F] and x_hat = a @ W_dec + b_dec:
      explained_variance = 1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean_t(x)||^2
          (share of the variance around the mean activation that the reconstruction recovers; 1 is
          perfect, 0 is no better than predicting the mean, negative is worse);
      l0 = mean over tokens of #{i : a_ti > 0} (active latents per token);
      dead_fraction = #{i : a_ti = 0 for every token t} / F (latents that never fire on these tokens;
          fewer tokens overstate it);
      mse = mean over tokens and dimensions of (x - x_hat)^2.

    Args:
        sae: the SAE.
        x: [N, d] activations, N >= 2.
        chunk: tokens per encode (bounds the [chunk, F] temporary).

    Returns:
        dict with explained_variance, l0, dead_fraction, mse, tokens.

    Example:
        >>> m = sae_metrics(weights, held_out)   # {'explained_variance': 0.8, 'l0': 32.0, ...}
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != sae.d_model or x.shape[0] < 2:
        raise ValueError(f"x: expected [N >= 2, {sae.d_model}] activations, got {getattr(x, 'shape', x)}")
    w = sae.to(dtype=torch.float32)
    x = x.float()
    mean = x.mean(0)
    err = tot = 0.0
    active = 0
    fired = torch.zeros(w.num_features, dtype=torch.bool, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xb = x[s : s + chunk]
        a = w.encode(xb)
        x_hat = a @ w.W_dec + w.b_dec
        err += float((xb - x_hat).pow(2).sum())
        tot += float((xb - mean).pow(2).sum())
        pos = a > 0
        active += int(pos.sum())
        fired |= pos.any(0)
    n = x.shape[0]
    return {
        "explained_variance": 1.0 - err / tot if tot > 0 else float("nan"),
        "l0": active / n,
        "dead_fraction": 1.0 - float(fired.float().mean()),
        "mse": err / (n * x.shape[1]),
        "tokens": n,
    }


# ----- training


def _batches(x: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    # cycle through the stored activations, reshuffled on every pass
    n = x.shape[0]
    while True:
        perm = torch.randperm(n, generator=generator)
        for s in range(0, n - batch_size + 1, batch_size):
            yield x[perm[s : s + batch_size]]
        if n < batch_size:
            yield x[torch.randint(0, n, (batch_size,), generator=generator)]


def _make_training_sae(config: SAETrainingConfig, d_in: int):
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    common = dict(
        d_in=d_in,
        d_sae=config.num_latents(d_in),
        dtype="float32",
        device="cpu",
        normalize_activations="expected_average_only_in",
    )
    if config.architecture == "topk":
        if config.k > config.num_latents(d_in):
            raise ValueError(f"k: expected <= {config.num_latents(d_in)} latents, got {config.k}")
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=config.k, **common))
    if config.architecture == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=config.sparsity, **common))
    return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(l0_coefficient=config.sparsity, **common))


@torch.no_grad()
def _finalise(sae) -> None:
    # after fit() the input scaling is folded into the weights; fold TopK's decoder-norm rescaling too,
    # so the saved SAE is a plain encoder/decoder (unit-norm decoder rows) that SAEWeights reproduces
    if sae.cfg.architecture() == "topk" and getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        sae.fold_W_dec_norm()
        sae.cfg.rescale_acts_by_decoder_norm = False


def select_texts(tokenizer, texts: Sequence[str], config: SAETrainingConfig) -> tuple[list[str], list[str]]:
    """The (training, held-out) texts `train_sae` uses: a seeded random order, cut at `collect_tokens`.

    Texts are taken in a random order (by `config.seed`) until their token count (each cut to
    max_seq_len) reaches `config.collect_tokens` (all texts when None); the first `eval_fraction` of
    those are held out. Both lists keep the input order.

    Example:
        >>> train, held = select_texts(tok, texts, SAETrainingConfig(collect_tokens=20_000))
    """
    texts = _check_texts(texts)
    g = torch.Generator().manual_seed(config.seed)
    perm = torch.randperm(len(texts), generator=g).tolist()
    chosen = perm
    if config.collect_tokens is not None:
        lengths = [len(ids) for ids in _tokenize(tokenizer, [texts[i] for i in perm], config.max_seq_len)]
        chosen, total = [], 0
        for i, n in zip(perm, lengths, strict=True):
            if total >= config.collect_tokens:
                break
            chosen.append(i)
            total += n
    n_eval = max(1, round(len(chosen) * config.eval_fraction))
    if n_eval >= len(chosen):
        raise ValueError(
            f"texts: need at least 2 texts to hold some out, got {len(chosen)} (of {len(texts)}) "
            f"within collect_tokens={config.collect_tokens}"
        )
    held, train = sorted(chosen[:n_eval]), sorted(chosen[n_eval:])
    return [texts[i] for i in train], [texts[i] for i in held]


def texts_fingerprint(texts: Sequence[str]) -> str:
    """12 hex digits identifying an ordered list of texts."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    return h.hexdigest()[:12]


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for name in ("sae-lens", "transformers", "sails_fast"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "unknown"
    return out


def _check_config(config: SAETrainingConfig | None) -> SAETrainingConfig:
    config = SAETrainingConfig() if config is None else config
    if not isinstance(config, SAETrainingConfig):
        raise ValueError(f"config: expected SAETrainingConfig, got {type(config).__name__}")
    return config


def fit_sae(x_train: torch.Tensor, x_eval: torch.Tensor, config: SAETrainingConfig | None = None):
    """Train an SAE with SAELens' SAETrainer on stored activations and measure it on held-out ones.

    Inputs are scaled to mean norm sqrt(d) (SAELens' "expected_average_only_in" rule, the factor
    computed here from x_train), the decoder bias starts at the mean activation, and at the end the
    scale (and TopK's decoder-norm rescaling) is folded into the weights, so the result encodes raw
    activations.

    Args:
        x_train: [N, d] training activations.
        x_eval: [M, d] held-out activations, M >= 2.
        config: SAETrainingConfig.

    Returns:
        (sae, weights, metrics): the SAELens training SAE (folded; `sae.save_model(dir)` writes it),
        the same as SAEWeights, and a dict: explained_variance, l0, dead_fraction, mse (held-out, see
        `sae_metrics`), train_explained_variance, train_l0 (on M training rows), train_tokens,
        eval_tokens, steps, train_seconds, d_model, num_latents, architecture, torch_threads.

    Example:
        >>> sae, weights, m = fit_sae(acts[:9000], acts[9000:], SAETrainingConfig(k=32))
    """
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    config = _check_config(config)
    for name, x in (("x_train", x_train), ("x_eval", x_eval)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a 2-D float tensor [N, d], got {getattr(x, 'shape', x)}")
    if x_eval.shape[1] != x_train.shape[1]:
        raise ValueError(f"x_eval: expected width {x_train.shape[1]} like x_train, got {x_eval.shape[1]}")
    if x_eval.shape[0] < 2 or x_train.shape[0] < 2:
        raise ValueError(
            f"x_train, x_eval: expected >= 2 rows each, got {x_train.shape[0]} and {x_eval.shape[0]}; "
            "pass more texts"
        )
    x_train, x_eval = x_train.float(), x_eval.float()
    d = x_train.shape[1]

    torch.manual_seed(config.seed)
    sae = _make_training_sae(config, d)
    steps = config.training_tokens // config.batch_size
    # input scale set here (SAELens' own rule: mean norm -> sqrt(d)) rather than estimated from batches
    scale = math.sqrt(d) / float(x_train.norm(dim=-1).mean())
    with torch.no_grad():
        # start the decoder bias at the mean activation: the SAE then only has to code the deviations
        sae.b_dec.copy_(x_train.mean(0) * scale)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * config.batch_size,
        train_batch_size_samples=config.batch_size,
        lr=config.lr,
        lr_end=config.lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=steps // 20,
        lr_decay_steps=0,
        device="cpu",
        autocast=config.resolved_autocast(),
        dead_feature_window=config.dead_feature_window,
        feature_sampling_window=steps + 1,
    )
    gen = torch.Generator().manual_seed(config.seed)
    trainer = SAETrainer(trainer_cfg, sae, _batches(x_train, config.batch_size, gen))
    trainer.activation_scaler.scaling_factor = scale
    t1, c1 = time.perf_counter(), time.process_time()
    _quiet_fit(trainer)
    train_s, train_cpu = time.perf_counter() - t1, time.process_time() - c1
    _finalise(sae)

    weights = SAEWeights.from_sae_lens(sae)
    held = sae_metrics(weights, x_eval)
    g = torch.Generator().manual_seed(config.seed + 1)
    sample = x_train[torch.randperm(x_train.shape[0], generator=g)[: x_eval.shape[0]]]
    seen_m = sae_metrics(weights, sample)
    metrics = {
        **{k: v for k, v in held.items() if k != "tokens"},
        "train_explained_variance": seen_m["explained_variance"],
        "train_l0": seen_m["l0"],
        "train_tokens": int(x_train.shape[0]),
        "eval_tokens": int(x_eval.shape[0]),
        "steps": steps,
        "train_seconds": round(train_s, 2),
        "train_cpu_seconds": round(train_cpu, 2),
        "d_model": d,
        "num_latents": weights.num_features,
        "architecture": config.architecture,
        "torch_threads": torch.get_num_threads(),
    }
    return sae, weights, metrics


def train_sae(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    layer: int,
    config: SAETrainingConfig | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    verbose: bool = True,
) -> tuple[SAEWeights, dict]:
    """Train an SAE on the residual stream after block `layer` with SAELens, and measure it.

    Texts are split (by text, seeded) into training and held-out parts; activations are collected
    with `collect_residual_activations` (held-out tokens never repeat a training prefix). SAELens'
    SAETrainer trains the SAE (inputs scaled to mean norm sqrt(d), the scale folded back into the
    weights at the end; TopK's decoder-norm rescaling folded too). The metrics of `sae_metrics` are
    measured on the held-out tokens, and on as many training tokens for comparison.

    Args:
        model: a Hugging Face causal LM (not modified; any dtype).
        tokenizer: its tokenizer.
        texts: at least 2 rendered texts (chat template applied where wanted).
        layer: block index.
        config: SAETrainingConfig (default: topk, k 32, 8x).
        out_dir: when given, the SAE is saved there with SAELens' `save_model` (cfg.json +
            sae_weights.safetensors) plus sails_fast_build.json (config, layer, metrics, versions),
            atomically: the folder appears complete or not at all. An existing complete folder is
            kept as it is.
        verbose: print timings and metrics to stderr.

    Returns:
        (weights, metrics): SAEWeights [d -> expansion_factor * d]; metrics is a dict with
        explained_variance, l0, dead_fraction, mse (held-out), train_explained_variance, train_l0,
        train_tokens, eval_tokens, steps, collect_seconds, train_seconds, layer, d_model, num_latents.

    Example:
        >>> weights, m = train_sae(model, tok, texts, layer=15, config=SAETrainingConfig(k=32))
        >>> round(m["explained_variance"], 2), m["l0"]
    """
    config = _check_config(config)
    texts = _check_texts(texts)
    train_texts, eval_texts = select_texts(tokenizer, texts, config)

    t0, c0 = time.perf_counter(), time.process_time()
    seen: set[int] = set()
    kw = dict(max_seq_len=config.max_seq_len, batch_size=config.collect_batch_size, seen_prefixes=seen)
    x_train = collect_residual_activations(model, tokenizer, train_texts, layer, **kw)
    x_eval = collect_residual_activations(model, tokenizer, eval_texts, layer, **kw)
    collect_s, collect_cpu = time.perf_counter() - t0, time.process_time() - c0
    sae, weights, metrics = fit_sae(x_train, x_eval, config)
    metrics = {
        **metrics,
        "train_texts": len(train_texts),
        "eval_texts": len(eval_texts),
        "collect_seconds": round(collect_s, 2),
        "collect_cpu_seconds": round(collect_cpu, 2),
        "layer": layer,
    }
    if verbose:
        print(
            f"sails_fast: SAE layer {layer} ({config.architecture}, {weights.num_features} latents): "
            f"collect {collect_s:.1f} s ({x_train.shape[0]} + {x_eval.shape[0]} tokens), "
            f"train {metrics['train_seconds']:.1f} s ({metrics['steps']} steps); "
            f"held-out EV {metrics['explained_variance']:.3f}, "
            f"L0 {metrics['l0']:.1f}, dead {metrics['dead_fraction']:.3f}",
            file=sys.stderr,
        )
    if out_dir is not None:
        meta = {
            "artifact": "sails_fast.sae",
            "artifact_version": ARTIFACT_VERSION,
            "layer": layer,
            "hook": f"decoder_layers[{layer}].output",
            "config": config.to_dict(),
            "metrics": metrics,
            "texts_fingerprint": texts_fingerprint(texts),
            "versions": _versions(),
        }
        build_once(Path(out_dir), lambda tmp: (sae.save_model(str(tmp)), meta)[1])
    return weights, metrics


def _quiet_fit(trainer) -> None:
    # SAELens draws a tqdm bar; keep it off pytest / logs unless stderr is a terminal
    import sae_lens.training.sae_trainer as st

    original = st.tqdm
    if not sys.stderr.isatty():
        st.tqdm = lambda *a, **k: original(*a, **{**k, "disable": True})
    try:
        trainer.fit()
    finally:
        st.tqdm = original
