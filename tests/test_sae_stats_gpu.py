"""gpu tier: the compiled SAE statistics kernel against the reference backend at real SAE shapes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sails_fast import SAEWeights, sae_feature_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from shapes import MODELS  # noqa: E402

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
TOKENS = 3000  # not a multiple of any block


def make_sae(
    d: int, F: int, activation: str, seed: int = 0, dtype: torch.dtype = torch.float32
) -> SAEWeights:
    g = torch.Generator().manual_seed(seed)
    extra = {"threshold": torch.rand(F, generator=g) * 0.5} if activation == "jumprelu" else {}
    if activation == "topk":
        extra = {"k": 64}
    return SAEWeights(
        W_enc=torch.randn(d, F, generator=g) / d**0.5,
        b_enc=torch.randn(F, generator=g) * 0.1,
        W_dec=torch.randn(F, d, generator=g) / F**0.5,
        b_dec=torch.randn(d, generator=g) * 0.1,
        activation=activation,
        **extra,
    ).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("strategy", ["fused", "chunked"])
@pytest.mark.parametrize("sae_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("model", ["gemma-2-2b", "gemma-2-9b", "llama-3.1-8b"])
def test_stats_match_the_reference_backend(model, activation, sae_dtype, strategy):
    """fp32 SAEs (IEEE fp32 dots) and bf16 SAEs (tensor-core dots, the fast path), both strategies; x
    in bf16 (cast to the fp32 SAE's dtype by the input pass)."""
    shapes = MODELS[model]
    sae = make_sae(shapes.hidden, shapes.sae_width, activation, dtype=sae_dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS, shapes.hidden, generator=g).to(DEVICE, torch.bfloat16)
    labels = torch.randint(-1, 2, (TOKENS,), generator=g).to(DEVICE)
    weights = torch.rand(TOKENS, generator=g).to(DEVICE)
    ours = sae_feature_stats(x, sae, labels, token_weights=weights, backend="triton", strategy=strategy)
    ref = sae_feature_stats(x, sae, labels, token_weights=weights, backend="torch")
    assert torch.equal(ours.token_count, ref.token_count)
    # pre-activations summed in another order may cross zero / a threshold / the k-th value for a few
    # (token, latent) pairs: allow a handful of count changes, and sums to fp32 accumulation accuracy
    assert (ours.active_count - ref.active_count).abs().max().item() <= 3
    for name in ("act_sum", "act_sq_sum", "act_max"):
        a, b = getattr(ours, name).float(), getattr(ref, name).float()
        finite = torch.isfinite(b)
        err = ((a - b)[finite].norm() / b[finite].norm().clamp_min(1e-12)).item()
        assert err < 1e-4, f"{model}/{activation}/{sae_dtype}/{strategy}/{name}: relative error {err:.2e}"


@pytest.mark.parametrize("strategy", ["fused", "chunked"])
@pytest.mark.parametrize("sae_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_is_bitwise_reproducible(sae_dtype, strategy):
    """Moved from the CPU tier: under the interpreter atomics run one at a time, so only a GPU, where
    programs race on the accumulators, can show an order-dependent last bit."""
    shapes = MODELS["gemma-2-2b"]
    sae = make_sae(shapes.hidden, shapes.sae_width, "relu", dtype=sae_dtype)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16384, shapes.hidden, generator=g).to(DEVICE)
    labels = torch.randint(-1, 2, (16384,), generator=g).to(DEVICE)
    w = torch.rand(16384, generator=g).to(DEVICE)
    run = lambda: sae_feature_stats(
        x, sae, labels, token_weights=w, backend="triton", deterministic=True, strategy=strategy
    )
    runs = [run(), run()]
    for name, t in runs[0].tensors().items():
        assert torch.equal(t, runs[1].tensors()[name]), name
