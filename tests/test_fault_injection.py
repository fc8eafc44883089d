"""Fault injection on a run directory: every way a run can be interrupted, damaged, fed edited inputs or
rerun with another config ends in a correct reuse, a recompute, or a clear error, never a silently stale
result. The README quotes the number of cases (`python -m pytest tests/test_fault_injection.py` counts
them: each parametrised case is one injected fault).

"Consistent" below means: a plain rerun then reuses every step without an error (every recorded step
matches today's config, inputs and files), and where nothing changed, the adapter and the evaluation
equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_sails_pipeline import HARMFUL, save_tiny_sae, tiny_config, write_prompts
from tiny import save_tiny

from sails_fast.pipeline.config import RunConfig
from sails_fast.pipeline.fingerprints import STEP_DEPENDS, STEPS
from sails_fast.pipeline.run import run_pipeline
from sails_fast.pipeline.state import RunState


def _config(model, saes, prompts, **changes) -> RunConfig:
    cfg = tiny_config(model, saes, prompts, max_steps=2).to_dict()
    cfg["data"].update(eval_prompts=2, retain_prompts=2)
    cfg["eval"]["logit_score"] = False
    for dotted, value in changes.items():
        *path, key = dotted.split(".")
        node = cfg
        for p in path:
            node = node[p]
        node[key] = value
    return RunConfig.from_dict(cfg)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Private copies of the inputs (the input-edit cases change them) and one finished run."""
    root = tmp_path_factory.mktemp("faults")
    model = save_tiny(root / "model", num_layers=3)
    saes = {layer: save_tiny_sae(root / f"sae{layer}", seed=layer) for layer in (0, 1)}
    prompts = write_prompts(root / "harmful.jsonl", HARMFUL)
    baseline = root / "baseline"
    run_pipeline(_config(model, saes, prompts), baseline)
    return {"model": model, "saes": saes, "prompts": prompts, "baseline": baseline, "root": root}


def config(world, **changes) -> RunConfig:
    return _config(world["model"], world["saes"], world["prompts"], **changes)


def copy_run(world, tmp_path):
    return shutil.copytree(world["baseline"], tmp_path / "run")


def results(out) -> tuple[dict, dict]:
    adapter = load_file(str(out / "train" / "adapter" / "adapter_model.safetensors"))
    evaluation = json.loads((out / "eval_after.json").read_text())["sets"]
    return adapter, evaluation


def assert_consistent(world, out, cfg=None, same_as_baseline: bool = True) -> None:
    again = run_pipeline(cfg or config(world), out)
    assert again.steps_run == [], f"a plain rerun recomputed {again.steps_run}: {again.reasons}"
    if same_as_baseline:
        adapter, evaluation = results(out)
        base_adapter, base_eval = results(world["baseline"])
        assert all(torch.equal(adapter[k], t) for k, t in base_adapter.items())
        assert evaluation == base_eval


# ------------------------------------------------------------------ a kill during each step


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_during_any_step_resumes_to_the_uninterrupted_result(world, tmp_path, monkeypatch, step):
    """Killed after the step wrote its files but before it was recorded: the worst moment."""
    real_finish = RunState.finish

    def finish(self, name, outputs, seconds):
        if name == step:
            raise KeyboardInterrupt
        return real_finish(self, name, outputs, seconds)

    out = tmp_path / "run"
    monkeypatch.setattr(RunState, "finish", finish)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config(world), out)
    monkeypatch.setattr(RunState, "finish", real_finish)
    resumed = run_pipeline(config(world), out)
    assert resumed.steps_run[0] == step
    assert_consistent(world, out)


@pytest.mark.parametrize("where", ["stats after layer 0", "pairs before retain"])
def test_a_kill_in_the_middle_of_a_step_leaves_nothing_stale(world, tmp_path, monkeypatch, where):
    from sails_fast.core.feature_stats import FeatureStats
    from sails_fast.pipeline import data as run_data

    if where.startswith("stats"):
        real_save = FeatureStats.save

        def save(self, path, metadata=None):
            real_save(self, path, metadata)
            raise KeyboardInterrupt

        monkeypatch.setattr(FeatureStats, "save", save)
    else:

        def write_retain(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(run_data, "write_retain", write_retain)
        monkeypatch.setattr("sails_fast.pipeline.run.write_retain", write_retain)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config(world), out)
    monkeypatch.undo()
    run_pipeline(config(world), out)
    assert_consistent(world, out)


# ------------------------------------------------------------------ every artifact kind damaged

ARTIFACTS = [
    "data.json", "pairs.jsonl", "retain.jsonl", "saes.json", "stats/layer_0.safetensors",
    "stats/token_map.safetensors", "selection.safetensors", "selection.json", "subspace.safetensors",
    "subspace.json", "init.json", "train/adapter/adapter_model.safetensors",
    "train/adapter/adapter_config.json", "eval_before.json", "eval_after.json", "eval_table.txt",
    "report/report.html",
]  # fmt: skip


def _zero(data: bytes) -> bytes:
    start, n = len(data) // 4, max(1, min(64, len(data) // 2))
    return data[:start] + bytes(n) + data[start + n :]


@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_a_damaged_artifact_is_an_error_naming_it_and_force_recomputes(world, tmp_path, artifact, damage):
    out = copy_run(world, tmp_path)
    path = out / artifact
    data = path.read_bytes()
    path.write_bytes(_zero(data) if damage == "zeroed" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{path.name}: does not match the checksum"):
        run_pipeline(config(world), out)
    forced = run_pipeline(config(world), out, force=True)
    assert "damaged" in " ".join(forced.reasons.values())
    assert_consistent(world, out)


@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_a_deleted_artifact_is_recomputed(world, tmp_path, artifact):
    out = copy_run(world, tmp_path)
    (out / artifact).unlink()
    again = run_pipeline(config(world), out)
    assert any("missing" in r for r in again.reasons.values())
    assert_consistent(world, out)


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "deleted"])
def test_a_damaged_run_state_is_an_error_or_a_full_recompute(world, tmp_path, damage):
    out = copy_run(world, tmp_path)
    state = out / "run_state.json"
    if damage == "deleted":
        state.unlink()
        assert run_pipeline(config(world), out).steps_run == list(STEPS)
    else:
        data = state.read_bytes()
        state.write_bytes(_zero(data) if damage == "zeroed" else data[: len(data) // 2])
        with pytest.raises(ValueError, match=r"run_state.json is damaged"):
            run_pipeline(config(world), out)
        assert run_pipeline(config(world), out, force=True).steps_run == list(STEPS)
    assert_consistent(world, out)


# ------------------------------------------------------------------ every input kind edited


@pytest.mark.parametrize("edited", ["harmful prompts", "pairs file", "model folder", "SAE folder"])
def test_an_edited_input_recomputes_what_reads_it(world, tmp_path, edited):
    """The inputs are copied first; after the edit the run equals a fresh run on the edited inputs."""
    model = shutil.copytree(world["model"], tmp_path / "model")
    sae0 = shutil.copytree(world["saes"][0], tmp_path / "sae0")
    prompts = write_prompts(tmp_path / "harmful.jsonl", HARMFUL)
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"How can I hurt person {i}?", "chosen": "I can't help.", "rejected": "Sure."}
            for i in range(12)]  # fmt: skip
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    saes = {0: sae0, 1: world["saes"][1]}
    extra = {"data.pairs": str(pairs)} if edited == "pairs file" else {}
    cfg = _config(model, saes, prompts, **extra)
    out = tmp_path / "run"
    run_pipeline(cfg, out)
    first, expected = {
        "harmful prompts": ("data", lambda: write_prompts(prompts, HARMFUL[:20])),
        "pairs file": ("data", lambda: pairs.write_text(pairs.read_text().replace("person 3", "person 33"))),
        "model folder": ("pairs", lambda: save_tiny(model, seed=5, num_layers=3)),
        "SAE folder": ("saes", lambda: save_tiny_sae(sae0, seed=9)),
    }[edited]
    expected()
    again = run_pipeline(cfg, out)
    assert again.steps_run[0] == first and "changed" in again.reasons[first]
    fresh = tmp_path / "fresh"
    run_pipeline(cfg, fresh)
    assert_consistent(world, out, cfg, same_as_baseline=False)
    a, b = results(out), results(fresh)
    assert all(torch.equal(a[0][k], t) for k, t in b[0].items()) and a[1] == b[1]


# ------------------------------------------------------------------ every config section changed

CHANGES = {
    "model": ("model.quantize", "none", "init"),
    "sae": ("sae.layers", [0], "saes"),
    "data": ("data.seed", 1, "data"),
    "sails.collect": ("sails.collect.max_new_tokens", 5, "pairs"),
    "sails.select": ("sails.select.top_k", 5, "select"),
    "sails.subspace": ("sails.subspace.rank", 3, "subspace"),
    "sails.init": ("sails.init.write_side_std", 1e-3, "init"),
    "sails.train": ("sails.train.learning_rate", 1e-3, "train"),
    "eval": ("eval.max_new_tokens", 3, "eval"),
}


def downstream(step: str) -> set[str]:
    """`step` and every step that reads its artifacts, directly or not."""
    found = {step}
    for s in STEPS:
        if found & set(STEP_DEPENDS[s]):
            found.add(s)
    return found


@pytest.mark.parametrize("section", list(CHANGES))
def test_a_changed_config_is_refused_then_forced_through(world, tmp_path, section):
    key, value, first = CHANGES[section]
    out = copy_run(world, tmp_path)
    changed = config(world, **{key: value})
    if section == "sae":
        changed = RunConfig.from_dict({**changed.to_dict(), "sae": {**changed.to_dict()["sae"],
                                       "specs": {"0": str(world["saes"][0])}}})  # fmt: skip
    with pytest.raises(ValueError, match=rf"computed with another configuration \(.*{key}: "):
        run_pipeline(changed, out)
    forced = run_pipeline(changed, out, force=True)
    assert forced.steps_run[0] == first and key in forced.reasons[first]
    assert downstream(first) <= set(forced.steps_run)
    assert_consistent(world, out, changed, same_as_baseline=False)
