"""run_pipeline and the sails-fast CLI end to end on a tiny random Llama and a SAELens SAE on disk."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import save_tiny

from sails_fast.cli import main as cli_main
from sails_fast.pipeline.config import RunConfig
from sails_fast.pipeline.fingerprints import STEPS, step_fingerprints
from sails_fast.pipeline.run import run_pipeline

HARMFUL = [f"Explain how to steal item number {i} from a locked shop." for i in range(30)]


def write_prompts(path, prompts):
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def save_tiny_sae(path, d: int = 64, width: int = 96, seed: int = 0):
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=width))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.2)
    sae.save_model(str(path))
    return path


def write_tiny_assets(root):
    """A 3-layer tiny Llama, tiny SAEs at layers 0 and 1, and the harmful prompts, under `root`."""
    model_dir = save_tiny(root / "model", num_layers=3)
    sae_dirs = {layer: save_tiny_sae(root / f"sae{layer}", seed=layer) for layer in (0, 1)}
    prompts = write_prompts(root / "harmful.jsonl", HARMFUL)
    return model_dir, sae_dirs, prompts


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    return write_tiny_assets(tmp_path_factory.mktemp("assets"))


def tiny_config(model_dir, sae_dirs, prompts, **train) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"path": str(model_dir), "quantize": "nf4"},
            "sae": {
                "layers": sorted(sae_dirs),
                "source": "specs",
                "specs": {str(k): str(v) for k, v in sae_dirs.items()},
            },
            "data": {"harmful": str(prompts), "train_prompts": 12, "eval_prompts": 4, "retain_prompts": 3},
            "sails": {
                "collect": {"batch_size": 4, "max_length": 48, "max_new_tokens": 6, "progress": False},
                "select": {"top_k": 8},
                "subspace": {"rank": 4},
                "train": {"max_steps": 3, "batch_size": 4, "save_every": 2, "progress": False, **train},
            },
            "eval": {"max_new_tokens": 4, "progress": False},
        }
    )


def test_pipeline_runs_every_step_then_reuses_them(tiny_assets, tmp_path):
    config = tiny_config(*tiny_assets)
    out = tmp_path / "run"
    first = run_pipeline(config, out)
    assert first.steps_run == list(STEPS)
    for name in ("config.json", "data.json", "pairs.jsonl", "saes.json", "stats/layer_0.safetensors",
                 "stats/layer_1.safetensors", "init.json", "train/adapter/adapter_model.safetensors",
                 "eval_before.json", "eval_after.json", "eval_table.txt", "run_state.json",
                 "stats/token_map.safetensors", "report/report.html"):  # fmt: skip
        assert (out / name).exists(), name
    # the subspace is orthonormal and the selection keeps top_k features per layer
    for basis in first.subspace.bases.values():
        u = basis.U.double()
        assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), atol=1e-5)
    assert all(len(sel.ids) == 8 for sel in first.selection.layers.values())

    assert "No response snippets" not in (out / "report" / "report.html").read_text()
    # retain examples: the base model's answers to harmless train-split prompts, none of them evaluated on
    retain = [json.loads(line) for line in (out / "retain.jsonl").read_text().splitlines()]
    assert 0 < len(retain) <= 3
    evaluated = {
        r["prompt"] for r in json.loads((out / "eval_after.json").read_text())["sets"]["harmless"]["records"]
    }
    assert evaluated and not evaluated & {r["prompt"] for r in retain}
    again = run_pipeline(config, out)
    assert again.steps_run == [] and again.steps_reused[:3] == ["data", "pairs", "saes"]

    # `sails-fast eval` / `report` on the run directory: evaluation reused, the report rewritten
    (out / "report" / "report.html").unlink()
    assert cli_main(["eval", str(out)]) == 0
    assert cli_main(["report", str(out)]) == 0
    assert (out / "report" / "report.html").exists()


def test_changed_config_is_refused_unless_forced(tiny_assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_pipeline(tiny_config(*tiny_assets), out, until="select")
    changed = tiny_config(*tiny_assets)
    changed.sails.select.top_k = 5
    with pytest.raises(ValueError, match=r"step\(s\) select computed with another configuration "
                       r"\(sails.select.top_k: 8 -> 5\)"):  # fmt: skip
        run_pipeline(changed, out, until="select")
    # a forced run that dies in the changed step leaves no record of the old config: the rerun goes on
    # without --force (the old selection was going to be replaced anyway)
    with monkeypatch.context() as patch:
        patch.setattr("sails_fast.selection.select.select_features", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            run_pipeline(changed, out, until="select", force=True)
    again = run_pipeline(changed, out, until="select")
    assert again.steps_run == ["select"] and "stats" in again.steps_reused


def test_a_run_recorded_before_a_key_was_fingerprinted_is_reused_when_it_trained_with_the_value(
    tiny_assets, tmp_path
):
    """sails.train.batch_size joined the train fingerprint later: a train step recorded before is not
    'changed' when the config it trained with (train/train_config.json) has today's value, and is refused
    when that shows another, whatever the last run's config.json says (that run may have reused it)."""
    config, out = tiny_config(*tiny_assets), tmp_path / "run"
    run_pipeline(config, out, until="train")
    state_path, trained_with = out / "run_state.json", out / "train" / "train_config.json"
    state = json.loads(state_path.read_text())
    train = state["steps"]["train"]  # as an earlier sails_fast recorded it: no batch_size, another key
    del train["config"]["sails.train.batch_size"]
    train["config_key"] = train["fingerprint"] = "earlier"
    state_path.write_text(json.dumps(state))
    again = run_pipeline(config, out, until="train")
    assert again.steps_run == [] and "train" in again.steps_reused
    assert "sails.train.batch_size" in json.loads(state_path.read_text())["steps"]["train"]["config"]

    # trained with batch 2 by an earlier version, then reused by a run whose config.json says 4
    state_path.write_text(json.dumps(state))
    trained_with.write_text(json.dumps({**json.loads(trained_with.read_text()), "batch_size": 2}))
    with pytest.raises(ValueError, match=r"step\(s\) train computed with another configuration "
                       r"\(sails.train.batch_size: \"<unset>\" -> 4\)"):  # fmt: skip
        run_pipeline(config, out, until="train")


def test_accelerate_fsdp_without_the_config_key_is_an_error(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match=r"accelerate launch with FSDP.*\"parallel\": \"fsdp\""):
        run_pipeline(tiny_config(*tiny_assets), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_every_train_key_that_changes_the_adapter_changes_its_fingerprint():
    base = step_fingerprints(RunConfig())
    for key, value in (("batch_size", 8), ("grad_accum_steps", 2), ("seed", 1)):
        other = step_fingerprints(RunConfig.from_dict({"sails": {"train": {key: value}}}))
        assert other["train"] != base["train"], key
    # how the work is split or shown changes no number: the same fingerprints
    same = (("collect", "batch_size", 2), ("train", "parallel", "fsdp"), ("train", "progress", False),
            ("train", "loss_chunk_tokens", 64))  # fmt: skip
    for section, key, value in same:
        other = step_fingerprints(RunConfig.from_dict({"sails": {section: {key: value}}}))
        assert other == base, (section, key)


def test_fingerprints_chain_downstream():
    base = RunConfig()
    changed = RunConfig.from_dict({"sails": {"subspace": {"rank": 8}}})
    a, b = step_fingerprints(base), step_fingerprints(changed)
    assert [s for s in a if a[s] == b[s]] == ["data", "pairs", "saes", "stats", "select"]


def test_run_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown key"):
        RunConfig.from_dict({"trian": {}})
    with pytest.raises(ValueError, match="unknown key"):
        RunConfig.from_dict({"sails": {"train": {"max_stepz": 3}}})


def test_cli_step_commands_and_sae_flag(tiny_assets, tmp_path, capsys):
    model_dir, sae_dirs, prompts = tiny_assets
    cfg = tiny_config(model_dir, {0: sae_dirs[0]}, prompts).to_dict()
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "cli_run"
    assert (
        cli_main(["select", "--config", str(cfg_path), "--out", str(out), "--sae", f"1={sae_dirs[1]}"]) == 0
    )
    written = json.loads((out / "config.json").read_text())
    assert written["sae"]["specs"] == {"1": str(sae_dirs[1])} and written["sae"]["layers"] == [1]
    assert (out / "selection.safetensors").exists() or any(out.glob("selection*"))
    assert not (out / "train").exists()
    # a bad flag is a clear error, not a traceback
    assert cli_main(["run", "--out", str(out), "--sae", "a=b", "--sae", "c"]) == 2
    assert "--sae" in capsys.readouterr().err
