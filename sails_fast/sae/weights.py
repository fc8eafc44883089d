"""SAE weights as plain tensors, independent of SAELens, with the exact SAELens encode semantics.

    pre = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc          x [T, d], W_enc [d, F]
    relu:     a = relu(pre)
    jumprelu: a = relu(pre) * (pre > threshold)                               threshold [F]
    topk:     a = relu(pre) on the k largest pre-activations of the row, 0 elsewhere

`SAEWeights.from_sae_lens` reads SAELens StandardSAE / JumpReLUSAE / TopKSAE objects; `load_sae` loads a
SAELens directory or a "release/sae_id" pair from the hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

Activation = Literal["relu", "jumprelu", "topk"]


ACTIVATIONS = ("relu", "jumprelu", "topk")


# SAELens architecture name -> our activation
_SAE_LENS_ARCHITECTURES = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}


@dataclass
class SAEWeights:
    """The encoder (and decoder) of a sparse autoencoder with d inputs and F latents.

    Attributes:
        W_enc [d, F], b_enc [F], W_dec [F, d], b_dec [d]: all of one floating dtype, on one device.
        apply_b_dec_to_input: subtract b_dec from x before encoding (SAELens default True; False for
            Gemma Scope).
        activation: "relu", "jumprelu" (needs `threshold` [F]) or "topk" (needs `k`, 1 <= k <= F).
        threshold [F]: JumpReLU thresholds, else None.
        k: TopK's number of active latents per token, else None.

    Example:
        >>> sae = SAEWeights.from_sae_lens(sae_lens_sae)
        >>> acts = sae.encode(x)        # [T, F], dense: for tests; use sae_feature_stats for statistics
    """

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    apply_b_dec_to_input: bool = True
    activation: Activation = "relu"
    threshold: torch.Tensor | None = None
    k: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.W_enc, torch.Tensor) or self.W_enc.dim() != 2:
            raise ValueError(f"W_enc: expected a 2-D tensor [d, F], got {_describe(self.W_enc)}")
        d, F = self.W_enc.shape
        dtype, device = self.W_enc.dtype, self.W_enc.device
        if not dtype.is_floating_point:
            raise ValueError(f"W_enc: expected a floating-point dtype, got {dtype}")
        expected = {"b_enc": (F,), "W_dec": (F, d), "b_dec": (d,)}
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation == "jumprelu":
            expected["threshold"] = (F,)
        elif self.threshold is not None:
            raise ValueError(
                f"threshold: only used with activation='jumprelu', got activation={self.activation!r}"
            )
        for name, shape in expected.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {list(shape)}, got {_describe(t)}")
            if t.dtype != dtype or t.device != device:
                raise ValueError(
                    f"{name}: expected {dtype} on {device} like W_enc, got {t.dtype} on {t.device}"
                )
        if self.activation == "topk":
            if not isinstance(self.k, int) or isinstance(self.k, bool) or not 1 <= self.k <= F:
                raise ValueError(f"k: expected an int in [1, {F}] for activation='topk', got {self.k!r}")
        elif self.k is not None:
            raise ValueError(f"k: only used with activation='topk', got activation={self.activation!r}")
        self.apply_b_dec_to_input = bool(self.apply_b_dec_to_input)

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[0]

    @property
    def num_features(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SAEWeights:
        """A copy on `device` and/or in `dtype` (k, activation and apply_b_dec_to_input kept)."""
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)
        return SAEWeights(
            W_enc=move(self.W_enc),
            b_enc=move(self.b_enc),
            W_dec=move(self.W_dec),
            b_dec=move(self.b_dec),
            apply_b_dec_to_input=self.apply_b_dec_to_input,
            activation=self.activation,
            threshold=move(self.threshold),
            k=self.k,
        )

    @torch.no_grad()
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """[T, F] pre-activations in the SAE's dtype, as SAELens computes them (x cast first)."""
        self._check_x(x)
        sae_in = x.to(self.dtype)
        if self.apply_b_dec_to_input:
            sae_in = sae_in - self.b_dec
        return sae_in @ self.W_enc + self.b_enc

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense reference encode. x [T, d] any float dtype -> activations [T, F] in the SAE's dtype.

        Allocates [T, F]: meant for tests and small batches. Statistics over many tokens belong to
        `sails_fast.sae_feature_stats`, which never materialises this matrix.
        """
        pre = self.pre_activations(x)
        if self.activation == "relu":
            return pre.relu()
        if self.activation == "jumprelu":
            return pre.relu() * (pre > self.threshold).to(pre.dtype)
        values, indices = torch.topk(pre, k=self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"x: expected shape [T, {self.d_model}] (the SAE's d_in), got {_describe(x)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"x: expected a floating-point dtype, got {x.dtype}")

    @classmethod
    @torch.no_grad()
    def from_sae_lens(cls, sae) -> SAEWeights:
        """Read a SAELens StandardSAE, JumpReLUSAE or TopKSAE (inference or training variants).

        Args:
            sae: a `sae_lens` SAE object. Its weights are detached and cloned, so later training of
                `sae` does not change the result.

        Returns:
            SAEWeights with the same encode semantics, including `apply_b_dec_to_input`.

        Raises:
            ValueError: another architecture (named in the message), or a config this library cannot
                reproduce exactly (activation normalisation, hook_z reshaping, TopK with
                rescale_acts_by_decoder_norm).

        Example:
            >>> from sae_lens import SAE
            >>> weights = SAEWeights.from_sae_lens(SAE.load_from_disk("my_sae_dir"))
        """
        cfg = getattr(sae, "cfg", None)
        architecture_fn = getattr(cfg, "architecture", None)
        if cfg is None or architecture_fn is None:
            raise ValueError(f"sae: expected a SAELens SAE object, got {type(sae).__name__}")
        architecture = architecture_fn()
        if architecture not in _SAE_LENS_ARCHITECTURES:
            raise ValueError(
                f"sae: unsupported SAELens architecture {architecture!r} ({type(sae).__name__}); "
                f"supported: {sorted(_SAE_LENS_ARCHITECTURES)} (StandardSAE, JumpReLUSAE, TopKSAE)"
            )
        norm = getattr(cfg, "normalize_activations", "none")
        if norm not in ("none", None):
            raise ValueError(f"sae: normalize_activations={norm!r} is not supported (only 'none')")
        reshape = getattr(cfg, "reshape_activations", "none")
        if reshape not in ("none", None):
            raise ValueError(f"sae: reshape_activations={reshape!r} is not supported (only 'none')")
        if architecture == "topk" and getattr(cfg, "rescale_acts_by_decoder_norm", False):
            raise ValueError("sae: TopK with rescale_acts_by_decoder_norm=True is not supported")
        grab = lambda t: t.detach().clone()
        activation = _SAE_LENS_ARCHITECTURES[architecture]
        return cls(
            W_enc=grab(sae.W_enc),
            b_enc=grab(sae.b_enc),
            W_dec=grab(sae.W_dec),
            b_dec=grab(sae.b_dec),
            apply_b_dec_to_input=bool(cfg.apply_b_dec_to_input),
            activation=activation,
            threshold=grab(sae.threshold) if activation == "jumprelu" else None,
            k=int(cfg.k) if activation == "topk" else None,
        )


def check_sae_spec(spec: str | Path) -> None:
    """Raise ValueError unless `spec` is a directory or "release/sae_id" of a known SAELens release (read
    from SAELens' own list, offline): a path typo is named before anything runs."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    path, text = Path(spec), str(spec)
    if path.is_dir():
        return
    if path.exists():
        raise ValueError(f"spec: {spec} is a file; expected a SAELens directory or 'release/sae_id'")
    if "/" not in text:
        raise ValueError(f"spec: expected a SAELens directory or 'release/sae_id', got {text!r}")
    release = text.split("/", 1)[0]
    if release in get_pretrained_saes_directory():
        return
    raise ValueError(
        f"spec: {spec} is not a directory, and {release!r} is not a SAELens release; expected a SAELens "
        "directory (cfg.json + sae_weights.safetensors) or 'release/sae_id'"
    )


def load_sae(spec: str | Path, device: str = "cpu", dtype: str | None = None) -> SAEWeights:
    """Load an SAE as SAEWeights: a local SAELens directory, or "release/sae_id" from the hub.

    Args:
        spec: a directory written by SAELens `sae.save_model(dir)` (cfg.json + sae_weights.safetensors),
            or "release/sae_id" as listed in SAELens' pretrained_saes.yaml (the release is the part
            before the first "/"; needs a hub connection).
        device: where the weights go.
        dtype: e.g. "float32" or "bfloat16"; None keeps the saved dtype.

    Returns:
        SAEWeights (see `SAEWeights.from_sae_lens` for the architectures accepted).

    Example:
        >>> sae = load_sae("checkpoints/smollm2_l15_sae")
        >>> sae = load_sae("gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical")
    """
    from sae_lens import SAE

    path = Path(spec)
    if path.is_dir():
        return SAEWeights.from_sae_lens(SAE.load_from_disk(str(path), device=device, dtype=dtype))
    check_sae_spec(spec)
    release, sae_id = str(spec).split("/", 1)
    sae = SAE.from_pretrained(release, sae_id, device=device, **({"dtype": dtype} if dtype else {}))
    return SAEWeights.from_sae_lens(sae)


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{list(t.shape)} {t.dtype}"
    return type(t).__name__
