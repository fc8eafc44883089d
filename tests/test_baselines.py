"""Hidden-space baselines (difference of means, PCA of differences) and PEFT's inits, on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer

from sails_fast.data import ContrastivePair
from sails_fast.lora_init.config import InitConfig
from sails_fast.lora_init.init import init_lora_from_subspace, make_lora_config
from sails_fast.pairs.config import CollectConfig
from sails_fast.pairs.tokenize import tokenize_example
from sails_fast.study.baselines import (
    collect_hidden_pooled,
    hidden_subspace,
    peft_init_model,
    peft_lora_config,
)
from sails_fast.study.theory_estimators import pca_of_differences

PAIRS = [
    ContrastivePair(
        prompt=f"How do I pick lock number {i}?",
        aligned="I can't help with that.",
        unaligned=f"Sure, first take pin {i} and turn it slowly.",
        source="test",
        unaligned_from="generated",
    )
    for i in range(7)
]


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_llama(num_layers=3, tokenizer=tok), tok


def test_pooled_hidden_states_are_the_response_mean_of_each_side(tiny):
    model, tok = tiny
    config = CollectConfig(batch_size=3, max_length=64, progress=False)
    pooled = collect_hidden_pooled(model, tok, PAIRS, [0, 1], config)
    assert set(pooled) == {0, 1}
    for layer in (0, 1):
        a, u = pooled[layer]
        assert a.shape == u.shape == (len(PAIRS), 64)
    # pair 4's unaligned side, by hand: mean over its response tokens of the block-1 output
    ids, n_prompt, _ = tokenize_example(tok, PAIRS[4], PAIRS[4].unaligned, chat_template=True, max_length=64)
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    # hidden_states[0] is the embedding output (and the last one is after the final norm)
    expected = hidden[2][0, n_prompt:].mean(0)
    torch.testing.assert_close(pooled[1][1][4], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pooled[1][0][4], expected)


def test_pooled_hidden_rejects_bad_layers(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="layers"):
        collect_hidden_pooled(model, tok, PAIRS, [3], CollectConfig(progress=False))


def _random_pooled(n: int = 12, d: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shift = torch.zeros(d)
    shift[5] = 3.0
    a = torch.randn(n, d, generator=g) + shift
    return {1: (a, torch.randn(n, d, generator=g))}


def test_diffmean_basis_starts_with_the_mean_difference_and_is_orthonormal():
    pooled = _random_pooled()
    sub = hidden_subspace(pooled, "diffmean", rank=6, seed=3)
    U = sub.bases[1].U.double()
    assert U.shape == (64, 6)
    torch.testing.assert_close(U.T @ U, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)
    mu = (pooled[1][0] - pooled[1][1]).mean(0).double()
    torch.testing.assert_close(U[:, 0], mu / mu.norm(), atol=1e-6, rtol=0)
    assert sub.bases[1].n_kept == 1 and sub.config.rank == 6 and sub.sae_layers == [1]
    # the complement is random: another seed gives other padding, the same first column
    other = hidden_subspace(pooled, "diffmean", rank=6, seed=4).bases[1].U.double()
    torch.testing.assert_close(other[:, 0], U[:, 0])
    assert (other[:, 1:] - U[:, 1:]).abs().max() > 0.1


def test_pca_basis_is_the_top_principal_directions_of_the_differences():
    pooled = _random_pooled()
    sub = hidden_subspace(pooled, "pca_diff", rank=4)
    expected = pca_of_differences(pooled[1][0].double(), pooled[1][1].double(), 4)
    # the same subspace (columns may differ in sign)
    P = sub.bases[1].U.double() @ sub.bases[1].U.double().T
    torch.testing.assert_close(P, expected @ expected.T, atol=1e-6, rtol=0)
    assert sub.bases[1].n_kept == 4


def test_hidden_subspace_validates_its_inputs():
    pooled = _random_pooled(n=3)
    with pytest.raises(ValueError, match="method"):
        hidden_subspace(pooled, "svd", rank=2)
    with pytest.raises(ValueError, match="rank"):
        hidden_subspace(pooled, "diffmean", rank=65)
    with pytest.raises(ValueError, match="needs >= 4 pairs"):
        hidden_subspace(pooled, "pca_diff", rank=4)
    with pytest.raises(ValueError, match="pooled"):
        hidden_subspace({}, "diffmean", rank=2)


def test_hidden_subspace_initialises_lora_like_the_sae_subspace(tiny):
    from peft import get_peft_model

    model, tok = tiny
    base = tiny_llama(num_layers=3, tokenizer=tok)
    sub = hidden_subspace(_random_pooled(), "pca_diff", rank=4)
    peft_model = get_peft_model(base, make_lora_config(InitConfig(), rank=4))
    report = init_lora_from_subspace(peft_model, sub, InitConfig())
    assert len(report.modules) == 3 * 4
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.lora_A["default"].weight, sub.bases[1].U.T)


def _calibration(tok, n: int = 6):
    from sails_fast.training.sft import sft_batch

    encoded = [tokenize_example(tok, p, p.aligned, chat_template=True, max_length=64)[:2] for p in PAIRS[:n]]
    ids, mask, labels = sft_batch(encoded, tok.pad_token_id)
    return [{"input_ids": ids, "attention_mask": mask, "labels": labels}]


@pytest.mark.parametrize("method", ["lora", "pissa", "corda", "eva"])
def test_peft_inits_leave_the_model_unchanged_at_step_zero(tiny, method):
    """Every PEFT init starts from the base function: B = 0 (lora, eva) or W_res + B A = W (pissa, corda)."""
    model, tok = tiny
    base = tiny_llama(num_layers=3, tokenizer=tok)
    ids = torch.tensor(
        [tokenize_example(tok, PAIRS[0], PAIRS[0].aligned, chat_template=True, max_length=64)[0]]
    )
    with torch.no_grad():
        expected = base(ids).logits
    lora_config = make_lora_config(InitConfig(), rank=4)
    peft_model = peft_init_model(method, base, lora_config, lambda: _calibration(tok))
    assert peft_model.peft_config["default"].init_lora_weights == (True if method == "lora" else method)
    with torch.no_grad():
        got = peft_model(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)
    q = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    assert q.lora_A["default"].weight.shape == (4, 64)  # EVA's rank redistribution is off: r stays 4
    assert q.lora_A["default"].weight.abs().sum() > 0
    if method in ("pissa", "corda"):  # the base weight now holds the residual W - B A
        assert q.lora_B["default"].weight.abs().sum() > 0


def test_peft_inits_refuse_what_they_cannot_do(tiny):
    model, tok = tiny
    config = make_lora_config(InitConfig(), rank=4)
    for method in ("pissa", "corda"):
        with pytest.raises(ValueError, match="4-bit NF4 base cannot hold"):
            peft_init_model(method, model, config, lambda: [], quantized=True)
    for method in ("corda", "eva"):
        with pytest.raises(ValueError, match="calibration_batches"):
            peft_init_model(method, model, config, None)
    with pytest.raises(ValueError, match="method"):
        peft_lora_config("olora", config)
