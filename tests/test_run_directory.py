"""A run directory you can trust: one test per way a user found it holding results that do not belong
together (issue 15), on the tiny Llama, SAEs and prompts of test_sails_pipeline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_sails_pipeline import HARMFUL, save_tiny_sae, tiny_config, write_prompts, write_tiny_assets
from tiny import save_tiny

from sails_fast.cli import main as cli_main
from sails_fast.models.loading import resolve_model_path
from sails_fast.pipeline.config import ModelConfig, RunConfig
from sails_fast.pipeline.run import run_pipeline

ADAPTER = "train/adapter/adapter_model.safetensors"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_assets(tmp_path_factory.mktemp("assets"))


def config(assets, **sections) -> RunConfig:
    """tiny_config with sections updated ({"sails": {"select": {"top_k": 5}}} style, merged)."""
    base = tiny_config(*assets).to_dict()

    def merge(into: dict, update: dict) -> None:
        for k, v in update.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v

    merge(base, sections)
    return RunConfig.from_dict(base)


def adapter(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / ADAPTER))


# 1 ---------------------------------------------------------------------------------------------------


def test_force_after_a_selection_change_retrains_instead_of_resuming(assets, tmp_path):
    """--force after changing select.top_k used to resume the old run's checkpoint: the final adapter was
    byte-identical to the old one while eval described the new selection."""
    out = tmp_path / "run"
    run_pipeline(config(assets), out, until="train")
    old = adapter(out)
    changed = config(assets, sails={"select": {"top_k": 5}})
    forced = run_pipeline(changed, out, until="train", force=True)
    assert {"select", "subspace", "init", "train"} <= set(forced.steps_run)
    assert "sails.select.top_k: 8 -> 5" in forced.reasons["select"]
    new = adapter(out)
    assert any(not torch.equal(old[k], new[k]) for k in old)
    # exactly what a fresh run with the new config trains
    fresh = tmp_path / "fresh"
    run_pipeline(changed, fresh, until="train")
    assert all(torch.equal(new[k], t) for k, t in adapter(fresh).items())


def test_interrupted_training_resumes_only_its_own_checkpoints(assets, tmp_path, monkeypatch):
    """A kill mid-training resumes (same init, data, config); --from train starts over."""
    from sails_fast.training import loop as train_module

    out = tmp_path / "run"
    real_save = train_module._save_checkpoint
    calls = {"n": 0}

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls["n"] += 1
        raise KeyboardInterrupt  # killed right after the first checkpoint

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config(assets), out, until="train")
    monkeypatch.setattr(train_module, "_save_checkpoint", real_save)
    resumed = run_pipeline(config(assets), out, until="train")
    assert resumed.train.resumed_from == 2
    fresh = tmp_path / "fresh"
    run_pipeline(config(assets), fresh, until="train")
    assert all(torch.equal(adapter(out)[k], t) for k, t in adapter(fresh).items())
    again = run_pipeline(config(assets), out, until="train", from_step="train")
    assert again.steps_run == ["train"] and again.train.resumed_from is None


# 2 ---------------------------------------------------------------------------------------------------


def test_a_refused_run_names_the_changed_keys_and_writes_nothing(assets, tmp_path, capsys):
    out = tmp_path / "run"
    run_pipeline(config(assets), out, until="eval")
    before = {p: p.read_bytes() for p in (out / "config.json", out / "run_state.json")}
    changed = config(assets, sails={"select": {"top_k": 5}, "train": {"learning_rate": 1e-3}})
    with pytest.raises(ValueError) as err:
        run_pipeline(changed, out, until="eval")
    message = str(err.value)
    assert "sails.select.top_k: 8 -> 5" in message and "sails.train.learning_rate:" in message
    assert all(p.read_bytes() == b for p, b in before.items())
    # the intact run still evaluates from the command line
    assert cli_main(["eval", str(out)]) == 0
    assert "reused" in capsys.readouterr().out


# 3 ---------------------------------------------------------------------------------------------------


def test_an_edited_data_file_recomputes_what_depends_on_it(assets, tmp_path):
    model_dir, sae_dirs, _ = assets
    prompts = write_prompts(tmp_path / "harmful.jsonl", HARMFUL[:24])
    cfg = tiny_config(model_dir, sae_dirs, prompts)
    out = tmp_path / "run"
    run_pipeline(cfg, out, until="pairs")
    write_prompts(prompts, [f"Describe how to break into flat {i} unseen." for i in range(6)])  # in place
    again = run_pipeline(cfg, out, until="pairs")
    assert again.steps_run == ["data", "pairs"]
    assert "data.harmful" in again.reasons["data"]
    from sails_fast.pipeline.data import prepare_data

    ids = {k: [r.id for r in v] for k, v in prepare_data(cfg.data).items()}
    assert json.loads((out / "data.json").read_text()) == ids
    pairs = [json.loads(line)["prompt"] for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all("flat" in p for p in pairs)


def test_changed_model_and_sae_folders_recompute_what_read_them(assets, tmp_path):
    model_dir, sae_dirs, prompts = assets
    model = shutil.copytree(model_dir, tmp_path / "model")
    sae0 = shutil.copytree(sae_dirs[0], tmp_path / "sae0")
    cfg = tiny_config(model, {0: sae0}, prompts)
    out = tmp_path / "run"
    run_pipeline(cfg, out, until="stats")
    save_tiny_sae(sae0, seed=7)  # new weights, same path
    again = run_pipeline(cfg, out, until="stats")
    assert again.steps_run == ["saes", "stats"] and "sae.0" in again.reasons["saes"]
    save_tiny(model, seed=3, num_layers=3)
    third = run_pipeline(cfg, out, until="stats")
    assert third.steps_run == ["pairs", "saes", "stats"] and "model" in third.reasons["pairs"]


# 4 ---------------------------------------------------------------------------------------------------


def test_held_out_prompts_that_are_also_trained_on_are_refused(assets, tmp_path):
    model_dir, sae_dirs, _ = assets
    both = tmp_path / "hh.jsonl"
    both.write_text("".join(
        json.dumps({"prompt": p, "chosen": "I can't help with that.", "rejected": "Sure, first..."}) + "\n"
        for p in HARMFUL
    ))  # fmt: skip
    cfg = tiny_config(model_dir, sae_dirs, both).to_dict()
    cfg["data"]["pairs"] = str(both)
    leak = r"held-out prompts would be trained on: 3 of 3 test prompts are in the pairs file"
    with pytest.raises(ValueError, match=leak):
        run_pipeline(RunConfig.from_dict(cfg), tmp_path / "run", until="data")
    assert not (tmp_path / "run").exists()
    cfg["data"]["allow_overlap"] = True
    assert run_pipeline(RunConfig.from_dict(cfg), tmp_path / "run", until="data").steps_run == ["data"]


# 5 ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_a_damaged_artifact_is_named_and_recomputed_by_force_or_by_deleting_it(assets, tmp_path, damage):
    out = tmp_path / "run"
    run_pipeline(config(assets), out, until="select")
    path = out / "stats" / "layer_0.safetensors"
    good = path.read_bytes()
    bad = good[:200] + bytes(64) + good[264:] if damage == "zeroed" else good[: len(good) // 2]
    path.write_bytes(bad)
    with pytest.raises(ValueError, match=r"layer_0.safetensors: does not match the checksum"):
        run_pipeline(config(assets), out, until="select")
    forced = run_pipeline(config(assets), out, until="select", force=True)
    assert "stats" in forced.steps_run and path.read_bytes() == good
    path.write_bytes(bad)
    path.unlink()
    again = run_pipeline(config(assets), out, until="select")
    assert again.steps_run == ["stats"] and "missing" in again.reasons["stats"]
    assert path.read_bytes() == good


# 6 ---------------------------------------------------------------------------------------------------


def test_eval_force_evaluates_again(assets, tmp_path, capsys):
    out = tmp_path / "run"
    run_pipeline(config(assets), out, until="eval")
    (out / "eval_after.json").write_text((out / "eval_after.json").read_text())  # same bytes, new mtime
    stamp = (out / "eval_after.json").stat().st_mtime_ns
    assert cli_main(["eval", str(out), "--force"]) == 0
    assert "recomputed eval: --from eval" in capsys.readouterr().out
    assert (out / "eval_after.json").stat().st_mtime_ns != stamp


# 7 ---------------------------------------------------------------------------------------------------


def _cli_error(capsys, argv) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_first_mistakes_are_one_line_errors_naming_the_path(assets, tmp_path, capsys):
    model_dir, sae_dirs, prompts = assets
    cfg_path = tmp_path / "cfg.json"

    def run_with(cfg: dict, out=None) -> str:
        cfg_path.write_text(json.dumps(cfg))
        return _cli_error(capsys, ["select", "--config", str(cfg_path), "--out", str(out or tmp_path / "o")])

    good = tiny_config(*assets).to_dict()
    missing = str(tmp_path / "no_such_model")
    assert f"model.path: {missing} does not exist" in run_with({**good, "model": {"path": missing}})
    hub_id = "no-such-org/no-such-model"  # offline, not in the hub cache
    assert f"model.path: cannot load '{hub_id}'" in run_with({**good, "model": {"path": hub_id}})
    typo = str(tmp_path / "sae_typo")
    sae = {**good["sae"], "specs": {"0": typo, "1": str(sae_dirs[1])}}
    assert f"sae.specs[0]: {typo} is not a directory" in run_with({**good, "sae": sae})
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    assert f"{latin1}:2: not UTF-8 text" in run_with(
        {**good, "data": {**good["data"], "harmful": str(latin1)}}
    )
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert "out_dir: cannot write to" in run_with(good, out=a_file / "run")
    no_config = tmp_path / "missing.json"
    err = _cli_error(capsys, ["select", "--config", str(no_config), "--out", str(tmp_path / "o")])
    assert f"--config: cannot read a run config from {no_config}: no such file" in err
    yaml_as_json = tmp_path / "cfg.txt"
    yaml_as_json.write_text("model:\n  path: embedded\n")
    assert "bad JSON at line 1" in _cli_error(
        capsys, ["select", "--config", str(yaml_as_json), "--out", str(tmp_path / "o")]
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_out_dir_is_a_one_line_error(assets, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(tiny_config(*assets).to_dict()))
    err = _cli_error(capsys, ["select", "--config", str(cfg_path), "--out", str(locked / "run")])
    assert "out_dir: cannot write to" in err


def test_a_yaml_config_runs(assets, tmp_path):
    yaml = pytest.importorskip("yaml")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(*assets).to_dict()))
    assert cli_main(["select", "--config", str(cfg_path), "--out", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "selection.safetensors").exists()


def test_a_gguf_model_path_is_converted_once_through_transformers(assets, tmp_path, monkeypatch):
    from sails_fast.models import embedded

    model_dir = assets[0]
    monkeypatch.setenv("SAILS_FAST_CACHE", str(tmp_path / "cache"))
    converted = []

    def convert(gguf, out_dir):  # stands in for transformers' gguf_file loader (tested in test_embedded)
        converted.append(gguf)
        shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(embedded, "convert_gguf_to_hf", convert)
    gguf = tmp_path / "my-model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF fake")
    folder = resolve_model_path(ModelConfig(path=str(gguf)))
    assert (tmp_path / "cache") in Path(folder).parents
    assert resolve_model_path(ModelConfig(path=str(gguf))) == folder and len(converted) == 1
    gguf.write_bytes(b"GGUF edited")  # another file: converted again
    assert resolve_model_path(ModelConfig(path=str(gguf))) != folder and len(converted) == 2
    not_a_model = tmp_path / "weights.bin"
    not_a_model.write_bytes(b"")
    with pytest.raises(ValueError, match=r"model.path: .* is a file; expected a model folder, a .gguf"):
        resolve_model_path(ModelConfig(path=str(not_a_model)))


# 8 ---------------------------------------------------------------------------------------------------


def test_the_evaluation_says_which_base_and_can_use_both(assets, tmp_path):
    out = tmp_path / "run"
    result = run_pipeline(config(assets, eval={"bases": "both"}), out, until="eval")
    assert result.after.meta["base"]["weights"] == "4-bit NF4 (bitsandbytes)"
    full = json.loads((out / "eval_after_full.json").read_text())
    assert full["meta"]["base"]["weights"] == "full precision"
    table = (out / "eval_table.txt").read_text()
    assert "base: 4-bit NF4" in table and "base: full precision (the same adapter)" in table


def test_a_run_directory_from_an_earlier_version_is_recomputed_or_refused(assets, tmp_path):
    """run_state.json of the first format (step -> path-based fingerprint): nothing in it can be verified,
    so the same config recomputes every step (saying why) and another config is refused."""
    out = tmp_path / "run"
    run_pipeline(config(assets), out, until="select")
    steps = ["data", "pairs", "saes", "stats", "select"]
    (out / "run_state.json").write_text(
        json.dumps({"steps": dict.fromkeys(steps, "0123abcd"), "seconds": {}})
    )
    with pytest.raises(
        ValueError, match=r"earlier sails_fast with another configuration \(sails.select.top_k"
    ):
        run_pipeline(config(assets, sails={"select": {"top_k": 5}}), out, until="select")
    again = run_pipeline(config(assets), out, until="select")
    assert again.steps_run == steps and "earlier sails_fast" in again.reasons["data"]
    assert run_pipeline(config(assets), out, until="select").steps_run == []


def test_input_digests_follow_content_and_are_cached(tmp_path, monkeypatch):
    from sails_fast.core import digests as inputs

    monkeypatch.setenv("SAILS_FAST_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    (folder / ".lock").write_text("not the model")
    first = inputs.folder_digest(folder)
    assert json.loads((tmp_path / "cache" / "digests.json").read_text())  # cached by size and mtime
    (folder / ".lock").write_text("changed")  # hidden entries are not the model
    assert inputs.folder_digest(folder) == first
    (folder / "model.safetensors").write_bytes(b"WEIGHTS" * 100)  # same size, new bytes
    assert inputs.folder_digest(folder) != first
    assert inputs.digest_path(folder).startswith("folder:")
    assert inputs.digest_path("org/not-cached") == "hub:org/not-cached@unresolved"
