"""SAEWeights: SAELens conversion with exact encode semantics, load_sae round trip, validation."""

from __future__ import annotations

import pytest
import torch

from sails_fast import SAEWeights, load_sae

ARCHS = ["standard", "jumprelu", "topk"]


def grid(shape, step: float, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    """Random multiples of `step` in [lo, hi]: products and sums of these stay exact in fp32, so any
    summation order gives the same pre-activations and maxima can be compared bit for bit."""
    n = round((hi - lo) / step)
    return torch.randint(0, n + 1, shape, generator=g).float() * step + lo


def make_sae_lens(arch: str, d: int, F: int, apply_b_dec: bool = True, k: int = 16, seed: int = 0):
    """A SAELens SAE with random non-zero weights, biases and thresholds on exact grids."""
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )

    g = torch.Generator().manual_seed(seed)
    if arch == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=F, apply_b_dec_to_input=apply_b_dec))
    elif arch == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=F, apply_b_dec_to_input=apply_b_dec))
    else:
        sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=F, k=k, apply_b_dec_to_input=apply_b_dec))
    with torch.no_grad():
        sae.W_enc.copy_(grid((d, F), 2**-10, -0.25, 0.25, g))
        sae.b_enc.copy_(grid((F,), 2**-16, -0.5, 0.5, g))
        sae.b_dec.copy_(grid((d,), 2**-6, -0.5, 0.5, g))
        sae.W_dec.copy_(torch.randn(F, d, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(grid((F,), 2**-10, 2**-10, 1.0, g))
    return sae


def make_x(T: int, d: int, seed: int = 1) -> torch.Tensor:
    """Inputs on a grid exact in fp16 and bf16 too."""
    return grid((T, d), 2**-6, -2.0, 2.0, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_from_sae_lens_encode_equals_sae_lens(arch, apply_b_dec):
    sae = make_sae_lens(arch, 96, 200, apply_b_dec)
    w = SAEWeights.from_sae_lens(sae)
    assert w.activation == {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}[arch]
    assert w.apply_b_dec_to_input is apply_b_dec
    assert (w.d_model, w.num_features) == (96, 200)
    x = make_x(23, 96)
    ours, theirs = w.encode(x), sae.encode(x)
    assert (ours > 0).any() and (theirs == 0).any()
    assert torch.equal(ours, theirs)
    # the weights are copies: changing the SAELens module afterwards does not leak in
    with torch.no_grad():
        sae.W_enc.add_(1.0)
    assert torch.equal(w.encode(x), ours)


@pytest.mark.parametrize("arch", ARCHS)
def test_load_sae_round_trip(arch, tmp_path):
    sae = make_sae_lens(arch, 64, 130, apply_b_dec=arch != "jumprelu", k=5)
    sae.save_model(str(tmp_path))
    loaded = load_sae(tmp_path)
    x = make_x(19, 64)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert loaded.apply_b_dec_to_input is (arch != "jumprelu")
    assert loaded.k == (5 if arch == "topk" else None)
    half = load_sae(str(tmp_path), dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_unsupported_architecture_is_named():
    from sae_lens import GatedSAE, GatedSAEConfig

    gated = GatedSAE(GatedSAEConfig(d_in=16, d_sae=32))
    with pytest.raises(ValueError, match="gated"):
        SAEWeights.from_sae_lens(gated)
    with pytest.raises(ValueError, match="sae: expected a SAELens SAE"):
        SAEWeights.from_sae_lens(torch.nn.Linear(2, 2))


def test_configs_that_change_encode_are_refused():
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    normed = StandardSAE(StandardSAEConfig(d_in=16, d_sae=32, normalize_activations="layer_norm"))
    with pytest.raises(ValueError, match="normalize_activations"):
        SAEWeights.from_sae_lens(normed)
    rescaled = TopKSAE(TopKSAEConfig(d_in=16, d_sae=32, k=4, rescale_acts_by_decoder_norm=True))
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm"):
        SAEWeights.from_sae_lens(rescaled)


def test_load_sae_bad_spec(tmp_path):
    with pytest.raises(ValueError, match="spec"):
        load_sae("no_slash_and_not_a_directory")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="spec"):
        load_sae(f)


def _weights(d=8, F=12, **kw):
    base = dict(W_enc=torch.randn(d, F), b_enc=torch.zeros(F), W_dec=torch.randn(F, d), b_dec=torch.zeros(d))
    base.update(kw)
    return base


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(W_enc=torch.randn(8)), "W_enc"),
        (dict(W_enc=torch.randint(0, 3, (8, 12))), "W_enc"),
        (dict(b_enc=torch.zeros(11)), "b_enc"),
        (dict(W_dec=torch.randn(8, 12)), "W_dec"),
        (dict(b_dec=torch.zeros(8, dtype=torch.float16)), "b_dec"),
        (dict(activation="gelu"), "activation"),
        (dict(activation="jumprelu"), "threshold"),
        (dict(activation="jumprelu", threshold=torch.zeros(5)), "threshold"),
        (dict(threshold=torch.zeros(12)), "threshold"),
        (dict(activation="topk"), "k"),
        (dict(activation="topk", k=13), "k"),
        (dict(activation="topk", k=0), "k"),
        (dict(k=3), "k"),
    ],
)
def test_validation_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        SAEWeights(**_weights(**kwargs))


def test_encode_rejects_bad_x():
    w = SAEWeights(**_weights())
    with pytest.raises(ValueError, match="^x:"):
        w.encode(torch.randn(3, 9))
    with pytest.raises(ValueError, match="^x:"):
        w.encode(torch.ones(3, 8, dtype=torch.int64))


def test_to_keeps_semantics():
    w = SAEWeights(**_weights(activation="topk", k=3), apply_b_dec_to_input=False)
    h = w.to(dtype=torch.float64)
    assert h.dtype == torch.float64 and h.k == 3 and h.apply_b_dec_to_input is False
    x = torch.randn(4, 8)
    assert torch.allclose(h.encode(x.double()).float(), w.encode(x), atol=1e-5)
