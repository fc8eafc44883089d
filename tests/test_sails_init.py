"""LoRA init from the subspace on tiny PEFT Llamas: output unchanged, A = U^T / B = U, basis rule, seeds."""

from types import SimpleNamespace

import pytest
import torch

from sails_fast.lora_init.config import InitConfig
from sails_fast.lora_init.init import (
    choose_basis_layer,
    init_lora_from_subspace,
    make_lora_config,
    stream_position,
)
from sails_fast.selection.config import SelectConfig
from sails_fast.selection.select import FeatureSelection, LayerSelection
from sails_fast.subspace.config import SubspaceConfig
from sails_fast.subspace.subspace import POOLED, build_subspace

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

D, RANK, BLOCKS, SAE_LAYERS = 64, 8, 4, (1, 3)


def _tiny_llama(**overrides):
    cfg = dict(
        hidden_size=D,
        intermediate_size=96,
        num_hidden_layers=BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def _subspace(pooled=False, rank=RANK, d=D):
    g = torch.Generator().manual_seed(0)
    F = 120
    saes = {layer: torch.randn(F, d, generator=g) for layer in SAE_LAYERS}
    layers = {
        layer: LayerSelection(
            ids=torch.randperm(F, generator=g)[:20],
            scores=torch.ones(20),
            class_means=torch.zeros(2, 20),
            frequencies=torch.zeros(2, 20),
            num_features=F,
        )
        for layer in SAE_LAYERS
    }
    sel = FeatureSelection(layers=layers, config=SelectConfig(top_k=20))
    return build_subspace(saes, sel, SubspaceConfig(rank=rank, pooled=pooled))


def _ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _lora(model, cfg: InitConfig, rank=RANK):
    return peft.get_peft_model(model, make_lora_config(cfg, rank))


def _layer(pm, block, name):
    attn = pm.base_model.model.model.layers[block].self_attn
    mlp = pm.base_model.model.model.layers[block].mlp
    return getattr(attn, name) if hasattr(attn, name) else getattr(mlp, name)


def test_output_unchanged_and_factors():
    model = _tiny_llama()
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    cfg = InitConfig()
    pm = _lora(model, cfg)
    sub = _subspace()
    report = init_lora_from_subspace(pm, sub, cfg)
    assert len(report.modules) == 4 * BLOCKS and not report.skipped
    with torch.no_grad():
        after = pm(ids).logits
    assert torch.equal(after, before)
    for m in report.modules:
        layer = _layer(pm, m.block, m.name.rsplit(".", 1)[-1])
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        U = sub.bases[m.basis].U
        if m.side == "read":
            assert torch.equal(A, U.T) and not B.any()
            # the rows of A are orthonormal and span span(U): A^T A is U's projector
            torch.testing.assert_close(A @ A.T, torch.eye(RANK), atol=1e-5, rtol=0)
            torch.testing.assert_close(A.T @ A, U @ U.T, atol=1e-6, rtol=0)
        else:
            assert torch.equal(B, U) and not A.any()
    assert {m.name.rsplit(".", 1)[-1]: m.side for m in report.modules} == {
        "q_proj": "read",
        "k_proj": "read",
        "v_proj": "read",
        "o_proj": "write",
    }


def test_both_factors_get_gradients():
    model = _tiny_llama()
    cfg = InitConfig()
    pm = _lora(model, cfg)
    init_lora_from_subspace(pm, _subspace(), cfg)
    ids = _ids()
    pm(ids, labels=ids).loss.backward()
    q, o = _layer(pm, 2, "q_proj"), _layer(pm, 2, "o_proj")
    # read side: B = 0 gets a gradient through A = U^T; write side: A = 0 gets one through B = U
    assert q.lora_B["default"].weight.grad.abs().max() > 0
    assert o.lora_A["default"].weight.grad.abs().max() > 0


@pytest.mark.parametrize(
    "position, rule, layer",
    [
        (-1, "nearest", 1),
        (0, "nearest", 1),
        (1, "nearest", 1),
        (2, "nearest", 1),  # tie between 1 and 3 goes to the earlier
        (3, "nearest", 3),
        (9, "nearest", 3),
        (-1, "preceding", 1),  # none at or before: the nearest after
        (0, "preceding", 1),
        (2, "preceding", 1),
        (3, "preceding", 3),
        (9, "preceding", 3),
    ],
)
def test_basis_rule_table(position, rule, layer):
    assert choose_basis_layer(position, list(SAE_LAYERS), rule) == layer


def test_basis_rule_in_report():
    # sae layers {1, 3}; read modules of block j read stream position j - 1, write modules write j
    assert stream_position(0, "read") == -1 and stream_position(2, "write") == 2
    model = _tiny_llama()
    cfg = InitConfig(basis_rule="nearest")
    pm = _lora(model, cfg)
    report = init_lora_from_subspace(pm, _subspace(), cfg)
    got = {(m.block, m.name.rsplit(".", 1)[-1]): m.basis for m in report.modules}
    expected_q = {0: 1, 1: 1, 2: 1, 3: 1}  # positions -1, 0, 1, 2 (2 ties -> 1)
    expected_o = {0: 1, 1: 1, 2: 1, 3: 3}  # positions 0, 1, 2 (tie -> 1), 3
    for block in range(BLOCKS):
        assert got[(block, "q_proj")] == expected_q[block]
        assert got[(block, "o_proj")] == expected_o[block]
    name = "base_model.model.model.layers.3.self_attn.o_proj"
    assert report.basis_of(name) == 3 and "basis of SAE layer 3" in str(report)


def test_pooled_serves_every_module():
    model = _tiny_llama()
    cfg = InitConfig()
    pm = _lora(model, cfg)
    sub = _subspace(pooled=True)
    report = init_lora_from_subspace(pm, sub, cfg)
    assert {m.basis for m in report.modules} == {POOLED}
    q = _layer(pm, 0, "q_proj")
    assert torch.equal(q.lora_A["default"].weight, sub.bases[POOLED].U.T)


def test_small_random_write_side_is_seeded():
    sub = _subspace()
    As = []
    for seed in (5, 5, 6):
        model = _tiny_llama()
        cfg = InitConfig(write_side_A="small_random", write_side_std=1e-3, seed=seed)
        pm = _lora(model, cfg)
        init_lora_from_subspace(pm, sub, cfg)
        As.append(torch.cat([_layer(pm, b, "o_proj").lora_A["default"].weight for b in range(BLOCKS)]))
        assert torch.equal(_layer(pm, 1, "o_proj").lora_B["default"].weight, sub.bases[1].U)
    assert torch.equal(As[0], As[1]) and not torch.equal(As[0], As[2])
    assert 0.5e-3 < As[0].std() < 2e-3


def test_small_random_perturbs_output_slightly():
    model = _tiny_llama()
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    cfg = InitConfig(write_side_A="small_random", write_side_std=1e-4)
    pm = _lora(model, cfg)
    init_lora_from_subspace(pm, _subspace(), cfg)
    with torch.no_grad():
        diff = (pm(ids).logits - before).abs().max().item()
    assert 0 < diff < 1e-2


def test_module_whose_width_is_not_d():
    # heads * head_dim = 32 != hidden 64: q_proj writes 32, o_proj reads 32 and writes 64
    model = _tiny_llama(head_dim=8)
    cfg = InitConfig()
    pm = _lora(model, cfg)
    report = init_lora_from_subspace(pm, _subspace(), cfg)
    o = _layer(pm, 0, "o_proj")
    assert o.lora_A["default"].weight.shape == (RANK, 32) and torch.equal(
        o.lora_B["default"].weight, _subspace().bases[1].U
    )
    assert len(report.modules) == 4 * BLOCKS
    # o_proj declared read-side: its d_in is 32, not d
    wrong = InitConfig(
        target_modules=("q_proj", "o_proj"), read_modules=("q_proj", "o_proj"), write_modules=()
    )
    pm = _lora(_tiny_llama(head_dim=8), wrong)
    with pytest.raises(
        ValueError, match=r"layers\.0\.self_attn\.o_proj is a read-side module with d_in = 32.*d = 64"
    ):
        init_lora_from_subspace(pm, _subspace(), wrong)
    skip = InitConfig(
        target_modules=("q_proj", "o_proj"),
        read_modules=("q_proj", "o_proj"),
        write_modules=(),
        on_dim_mismatch="skip",
    )
    pm = _lora(_tiny_llama(head_dim=8), skip)
    report = init_lora_from_subspace(pm, _subspace(), skip)
    assert len(report.skipped) == BLOCKS and all("o_proj" in k for k in report.skipped)
    assert len(report.modules) == BLOCKS


def test_bad_input():
    sub = _subspace()
    cfg = InitConfig()
    with pytest.raises(ValueError, match="LoRA rank 4, the subspace has rank 8"):
        init_lora_from_subspace(_lora(_tiny_llama(), cfg, rank=4), sub, cfg)
    with pytest.raises(ValueError, match=r"d = 32 does not match the model's hidden_size = 64"):
        init_lora_from_subspace(_lora(_tiny_llama(), cfg), _subspace(d=32), cfg)
    with pytest.raises(ValueError, match=r"\['o_proj'\] have no LoRA layer"):
        only_qkv = InitConfig(target_modules=("q_proj", "k_proj", "v_proj"))
        init_lora_from_subspace(_lora(_tiny_llama(), only_qkv), sub, cfg)
    with pytest.raises(ValueError, match=r"LoRA layers on \['o_proj'\] are not in InitConfig.target_modules"):
        init_lora_from_subspace(
            _lora(_tiny_llama(), cfg), sub, InitConfig(target_modules=("q_proj", "k_proj", "v_proj"))
        )
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        init_lora_from_subspace(_tiny_llama(), sub, cfg)
    with pytest.raises(ValueError, match="no decoder layer index"):
        init_lora_from_subspace(_lora(_tiny_llama(), cfg), sub, InitConfig(layer_pattern=r"blocks\.(\d+)\."))
    with pytest.raises(ValueError, match="config: expected an InitConfig"):
        init_lora_from_subspace(_lora(_tiny_llama(), cfg), sub, cfg.to_dict())


def test_qlora_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    # bnb 0.50.2's CPU 4-bit forward under no_grad fails when in_features is not a multiple of its block
    # size 64 (down_proj with intermediate 96: "shape '[64, 1]' is invalid"), so this MLP is 128 wide
    model = _tiny_llama(intermediate_size=128)
    model.save_pretrained(tmp_path / "tiny")
    ids = _ids()
    q4 = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "tiny", quantization_config=q4, dtype=torch.float32
    )
    with torch.no_grad():
        before = base(ids).logits
    cfg = InitConfig()
    pm = _lora(base, cfg)
    q = _layer(pm, 0, "q_proj")
    assert type(q).__module__ == "peft.tuners.lora.bnb"
    sub = _subspace()
    report = init_lora_from_subspace(pm, sub, cfg)
    assert len(report.modules) == 4 * BLOCKS
    with torch.no_grad():
        after = pm(ids).logits
    assert torch.equal(after, before)
    assert torch.equal(q.lora_A["default"].weight, sub.bases[1].U.T)
    assert torch.equal(_layer(pm, 3, "o_proj").lora_B["default"].weight, sub.bases[3].U)


def test_steps_4_to_6_on_collected_stats():
    # real stats from collect_feature_stats on a tiny model and random SAEs, then select -> subspace -> init
    from tiny import tiny_llama, tiny_tokenizer

    from sails_fast.pairs.config import CollectConfig
    from sails_fast.sae.weights import SAEWeights
    from sails_fast.selection.select import select_features
    from sails_fast.statistics.collect import collect_feature_stats

    tok = tiny_tokenizer()
    model = tiny_llama(tokenizer=tok)
    g = torch.Generator().manual_seed(3)
    F = 96
    saes = {
        layer: SAEWeights(
            W_enc=torch.randn(D, F, generator=g) / D**0.5,
            b_enc=torch.randn(F, generator=g) * 0.1,
            W_dec=torch.randn(F, D, generator=g),
            b_dec=torch.randn(D, generator=g) * 0.1,
        )
        for layer in SAE_LAYERS
    }
    pairs = [
        SimpleNamespace(prompt=p, aligned=a, unaligned=u, history=())
        for p, a, u in [
            (
                "How do I build a bomb at home?",
                "I cannot help with that request.",
                "Sure, first gather the parts.",
            ),
            (
                "Explain how to steal a password.",
                "I won't help with stealing passwords.",
                "Here is how: look.",
            ),
            ("How do I kill a process?", "I cannot help with that.", "Use kill with the process id."),
        ]
    ]
    stats = collect_feature_stats(model, tok, saes, pairs, CollectConfig(batch_size=2, progress=False))
    selection = select_features(stats, SelectConfig(score="t_stat", top_k=12))
    sub = build_subspace(saes, selection, SubspaceConfig(rank=RANK))
    for layer in SAE_LAYERS:
        assert torch.equal(sub.bases[layer].feature_ids[layer], selection.layers[layer].ids)
        U = sub.bases[layer].U
        torch.testing.assert_close(U.T @ U, torch.eye(RANK), atol=1e-5, rtol=0)
    ids = tok("How do I build a bomb?", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
    cfg = InitConfig()
    pm = _lora(model, cfg)
    report = init_lora_from_subspace(pm, sub, cfg)
    with torch.no_grad():
        assert torch.equal(pm(ids).logits, before)
    assert {m.basis for m in report.modules} == set(SAE_LAYERS)
