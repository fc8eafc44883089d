"""Config dataclasses: defaults, validation errors naming the field, dict / JSON round trips."""

import json

import pytest

from sails_fast.core.feature_stats import ALIGNED, CLASS_NAMES, UNALIGNED
from sails_fast.lora_init.config import InitConfig
from sails_fast.pairs.config import CollectConfig
from sails_fast.pipeline.config import SailsConfig
from sails_fast.selection.config import SelectConfig
from sails_fast.subspace.config import SubspaceConfig
from sails_fast.training.config import TrainConfig


def test_class_convention():
    assert (ALIGNED, UNALIGNED) == (0, 1)
    assert CLASS_NAMES[ALIGNED] == "aligned" and CLASS_NAMES[UNALIGNED] == "unaligned"


def test_defaults_follow_method():
    cfg = SailsConfig()
    assert cfg.select.score == "mean_diff" and cfg.select.top_k == 64 and cfg.select.direction == "both"
    assert cfg.subspace.variance_threshold == 0.8 and cfg.subspace.rank == 16 and cfg.subspace.pooled is False
    assert cfg.init.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert cfg.init.write_side_A == "zeros"
    assert cfg.init.alpha(cfg.subspace.rank) == 32.0
    assert InitConfig(lora_alpha=8).alpha(16) == 8.0


def test_round_trip_dict_and_json(tmp_path):
    cfg = SailsConfig(
        collect=CollectConfig(layers=(1, 3), batch_size=2, pooling="token"),
        select=SelectConfig(score="t_stat", direction="aligned", top_k=7, eps=1e-4),
        subspace=SubspaceConfig(variance_threshold=0.9, rank=4, pooled=True, seed=3),
        init=InitConfig(target_modules=("q_proj", "down_proj"), write_side_A="small_random", lora_alpha=4.0),
        train=TrainConfig(learning_rate=1e-4, adam_betas=(0.8, 0.99), max_steps=3),
    )
    d = cfg.to_dict()
    assert isinstance(d["init"]["target_modules"], list) and d["collect"]["layers"] == [1, 3]
    assert SailsConfig.from_dict(json.loads(json.dumps(d))) == cfg
    path = tmp_path / "cfg.json"
    cfg.save(path)
    assert SailsConfig.load(path) == cfg
    assert not list(tmp_path.glob("*.tmp"))
    # a partial dict fills the rest with defaults
    part = SailsConfig.from_dict({"select": {"top_k": 3}})
    assert part.select.top_k == 3 and part.subspace == SubspaceConfig()


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"selct": {}}, "selct"),
        ({"select": {"topk": 3}}, "topk"),
        ({"subspace": {"rank": 4, "alpha": 1}}, "alpha"),
        ({"init": {"targets": ["q_proj"]}}, "targets"),
        ({"collect": {"layerz": [1]}}, "layerz"),
        ({"train": {"lr": 1e-4}}, "lr"),
    ],
)
def test_unknown_keys_rejected(data, needle):
    with pytest.raises(ValueError, match=needle):
        SailsConfig.from_dict(data)


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: SelectConfig(score="ratio"), r"SelectConfig\.score.*'mean_diff'.*'t_stat'"),
        (lambda: SelectConfig(direction="positive"), r"SelectConfig\.direction.*'both'"),
        (lambda: SelectConfig(top_k=0), r"SelectConfig\.top_k"),
        (lambda: SelectConfig(top_k=True), r"SelectConfig\.top_k"),
        (lambda: SelectConfig(top_k=2.0), r"SelectConfig\.top_k"),
        (lambda: SelectConfig(eps=0.0), r"SelectConfig\.eps"),
        (lambda: SelectConfig(eps=float("nan")), r"SelectConfig\.eps"),
        (lambda: SelectConfig(score="abs_diff", direction="aligned"), r"SelectConfig\.direction.*abs_diff"),
        (lambda: SubspaceConfig(variance_threshold=0.0), r"SubspaceConfig\.variance_threshold"),
        (lambda: SubspaceConfig(variance_threshold=1.5), r"SubspaceConfig\.variance_threshold"),
        (lambda: SubspaceConfig(rank=0), r"SubspaceConfig\.rank"),
        (lambda: SubspaceConfig(pooled="yes"), r"SubspaceConfig\.pooled"),
        (lambda: SubspaceConfig(seed=-1), r"SubspaceConfig\.seed"),
        (lambda: InitConfig(write_side_A="normal"), r"InitConfig\.write_side_A.*'zeros'.*'small_random'"),
        (lambda: InitConfig(basis_rule="closest"), r"InitConfig\.basis_rule"),
        (lambda: InitConfig(on_dim_mismatch="ignore"), r"InitConfig\.on_dim_mismatch"),
        (lambda: InitConfig(target_modules=()), r"InitConfig\.target_modules"),
        (lambda: InitConfig(target_modules=("c_attn",)), r"InitConfig\.target_modules.*c_attn.*neither"),
        (lambda: InitConfig(write_modules=("o_proj", "q_proj")), r"InitConfig\.read_modules.*q_proj"),
        (lambda: InitConfig(write_side_std=0.0), r"InitConfig\.write_side_std"),
        (lambda: InitConfig(lora_alpha=-1), r"InitConfig\.lora_alpha"),
        (lambda: InitConfig(layer_pattern=r"layers\.\d+"), r"InitConfig\.layer_pattern.*group"),
        (lambda: InitConfig(layer_pattern=r"layers\.(\d+"), r"InitConfig\.layer_pattern.*regex"),
        (lambda: SailsConfig(select=3), r"SailsConfig\.select"),
        (lambda: SailsConfig(collect=SelectConfig()), r"SailsConfig\.collect"),
        (lambda: SailsConfig(train=3), r"SailsConfig\.train"),
        (lambda: SailsConfig.from_dict({"collect": {"pooling": "max"}}), r"pooling"),
        (lambda: SailsConfig.from_dict({"train": {"parallel": "zero3"}}), r"parallel.*'ddp' or 'fsdp'"),
    ],
)
def test_bad_values_name_the_field(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_custom_architecture_sides():
    cfg = InitConfig(target_modules=("c_attn", "c_proj"), read_modules=("c_attn",), write_modules=("c_proj",))
    assert cfg.side("c_attn") == "read" and cfg.side("c_proj") == "write"
    with pytest.raises(ValueError, match="module_name"):
        cfg.side("q_proj")


def test_load_bad_json_names_path(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        SailsConfig.load(path)
    with pytest.raises(ValueError, match="expected a dict"):
        SailsConfig.from_dict([1, 2])
