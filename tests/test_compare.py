"""`sails-fast compare`: configs, metrics helpers, and a whole comparison on a tiny Llama."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from test_sails_pipeline import write_tiny_assets

from sails_fast.cli import main as cli_main
from sails_fast.study import compare as compare_mod
from sails_fast.study import compare_config as compare_config_mod
from sails_fast.study.compare import prepare_shared, record_fingerprint, run_compare
from sails_fast.study.compare_config import CompareConfig, MethodSpec
from sails_fast.study.compare_methods import build_method_model, steps_to_held_target, steps_to_target
from sails_fast.study.compare_outputs import format_summary, summarize

# ----- configs


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"name": "x", "kind": "dora"}, "kind"),
        ({"name": "", "kind": "lora"}, "name"),
        ({"name": "a/b", "kind": "lora"}, "name"),
        ({"name": "x", "kind": "lora", "select": {"top_k": 4}}, "kind 'sails' only"),
        ({"name": "x", "kind": "sails", "subspace": {"rank": 4}}, "rank"),
        ({"name": "x", "kind": "sails", "select": {"top_k": 0}}, "top_k"),
        ({"name": "x", "kind": "sails", "select": {"bogus": 1}}, "unknown keys"),
        ({"name": "x", "kind": "lora", "read_side_only": True}, "subspace methods"),
        ({"name": "x", "kind": "full", "learning_rate": 2.0}, "learning_rate"),
        ({"name": "x", "kind": "lora", "seeds": []}, "seeds"),
    ],
)
def test_method_spec_rejects_bad_entries(spec, match):
    with pytest.raises(ValueError, match=match):
        MethodSpec.from_dict(spec)


def test_compare_config_round_trips_and_validates(tmp_path):
    config = CompareConfig()
    assert [m.kind for m in config.methods] == list(compare_config_mod.METHOD_KINDS)
    config.save(tmp_path / "c.json")
    again = CompareConfig.load(tmp_path / "c.json")
    assert again.to_dict() == config.to_dict()
    nf4 = {"run": {"model": {"quantize": "nf4"}}}
    with pytest.raises(ValueError, match="full-precision base"):
        CompareConfig.from_dict({**nf4, "methods": [{"name": "p", "kind": "pissa"}]})
    CompareConfig.from_dict({**nf4, "methods": [{"name": "e", "kind": "eva"}]})  # eva runs on 4-bit
    with pytest.raises(ValueError, match="unique"):
        CompareConfig.from_dict({"methods": [{"name": "a", "kind": "lora"}, {"name": "a", "kind": "sails"}]})
    with pytest.raises(ValueError, match="unique and not 'base'"):
        CompareConfig.from_dict({"methods": [{"name": "base", "kind": "lora"}]})
    with pytest.raises(ValueError, match="seeds"):
        CompareConfig.from_dict({"seeds": [0, 0]})
    with pytest.raises(ValueError, match="target_safety"):
        CompareConfig.from_dict({"target_safety": 0})
    with pytest.raises(ValueError, match="unknown keys"):
        CompareConfig.from_dict({"steps": 3})
    for bad in ("", "  ", 3):
        with pytest.raises(ValueError, match="CompareConfig.judge"):
            CompareConfig.from_dict({"judge": bad})
    with pytest.raises(ValueError, match="judge model folder"):
        run_compare(CompareConfig(judge=str(tmp_path / "missing")), tmp_path / "never")
    assert not (tmp_path / "never").exists()  # refused before any work


def test_steps_to_target_and_summary():
    assert steps_to_target([(0, 0.0), (2, 0.89), (4, 0.9), (6, 1.0)], 0.9) == 4
    assert steps_to_target([(0, 0.0), (2, 0.5)], 0.9) is None
    assert steps_to_held_target([(0, 0.0), (2, 0.95), (4, 0.8), (6, 0.9), (8, 1.0)], 0.9) == 6
    assert steps_to_held_target([(0, 0.0), (2, 0.95), (4, 0.8)], 0.9) is None
    assert steps_to_held_target([(0, 0.95), (2, 0.95)], 0.9) == 0
    records = [
        {
            "method": "a",
            "kind": "lora",
            "seed": 0,
            "safety_rate": 0.5,
            "steps_to_target": 4,
            "steps_to_target_held": 6,
        },
        {
            "method": "a",
            "kind": "lora",
            "seed": 1,
            "safety_rate": 0.7,
            "steps_to_target": None,
            "steps_to_target_held": None,
        },
        {
            "method": "b",
            "kind": "sails",
            "seed": 0,
            "safety_rate": 1.0,
            "steps_to_target": 2,
            "steps_to_target_held": None,
        },
    ]
    summary = summarize(records)
    a = summary[0]
    assert a["method"] == "a" and a["seeds"] == 2 and a["reached_target"] == 1
    assert a["safety_rate_mean"] == pytest.approx(0.6)
    assert a["safety_rate_std"] == pytest.approx(0.1414214, abs=1e-6)
    assert a["steps_to_target_mean"] == 4 and a["steps_to_target_n"] == 1
    assert summary[1]["safety_rate_std"] == 0.0
    table = format_summary(summary)
    assert "| a | 2 | 0.600 ± 0.141 |" in table
    assert "(1/2 reached)" in table and "| 6.0 ± 0.0 (1/2 held) |" in table
    assert table.splitlines()[0].endswith("| held from step |") and table.endswith("| not held |")
    # a summary written before the held column existed renders without it
    old = [{k: v for k, v in row.items() if not k.startswith("steps_to_target_held")} for row in summary]
    assert "held" not in format_summary(old)


# ----- a whole comparison on a tiny model


@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model_dir, sae_dirs, prompts = write_tiny_assets(root)
    config = CompareConfig.from_dict(
        {
            "run": {
                "model": {"path": str(model_dir), "quantize": "none"},
                "sae": {
                    "layers": [0, 1],
                    "source": "specs",
                    "specs": {str(k): str(v) for k, v in sae_dirs.items()},
                },
                "data": {
                    "harmful": str(prompts),
                    "train_prompts": 10,
                    "eval_prompts": 4,
                    "retain_prompts": 3,
                },
                "sails": {
                    "collect": {"batch_size": 4, "max_length": 48, "max_new_tokens": 6, "progress": False},
                    "select": {"top_k": 8},
                    "subspace": {"rank": 4},
                    "train": {"max_steps": 2, "batch_size": 4, "progress": False},
                },
                "eval": {"max_new_tokens": 4, "progress": False},
            },
            "methods": [
                {"name": "sails", "kind": "sails"},
                {"name": "lora", "kind": "lora"},
                {"name": "diffmean", "kind": "diffmean"},
                {"name": "pca_diff", "kind": "pca_diff"},
                {"name": "sails_read_only", "kind": "sails", "read_side_only": True},
                {"name": "full", "kind": "full", "learning_rate": 1e-4, "seeds": [0]},
            ],
            "seeds": [0, 1],
            "probe_every": 1,
            "probe_prompts": 3,
            "probe_max_new_tokens": 3,
            "ppl_prompts": 4,
            "progress": False,
        }
    )
    out, results = root / "out", root / "results"
    result = run_compare(config, out, results_dir=results)
    return config, out, results, result


def test_compare_trains_every_method_at_equal_budgets(tiny_compare):
    config, out, results, result = tiny_compare
    records = result.records
    assert [r["method"] for r in records].count("base") == 1
    trained = [r for r in records if r["method"] != "base"]
    assert len(trained) == 5 * 2 + 1
    assert {r["steps"] for r in trained} == {2}
    lora_params = {r["trainable_params"] for r in trained if r["kind"] != "full"}
    assert len(lora_params) == 1  # rank 4 on q, k, v, o of 3 layers, whatever the init
    assert lora_params == {3 * (4 * (64 + 64) + 4 * (64 + 32) * 2 + 4 * (64 + 64))}
    full = next(r for r in trained if r["kind"] == "full")
    assert full["trainable_params"] > 20 * lora_params.pop() and full["learning_rate"] == 1e-4
    for r in trained:
        assert [step for step, _ in r["curve"]] == [0, 1, 2]
        assert r["steps_to_target_held"] == steps_to_held_target(r["curve"], config.target_safety)
        assert 0.0 <= r["safety_rate"] <= 1.0 and r["ppl_harmless"] > 1.0
        assert r["matcher"] and r["logit_score_harmful"] is not None
        assert not (out / "runs" / r["method"] / f"seed{r['seed']}" / "train" / "adapter").exists()
    # seeds change the run: PEFT's random init and the data order
    lora = [r for r in trained if r["method"] == "lora"]
    assert lora[0]["final_loss"] != lora[1]["final_loss"]


def test_compare_writes_csvs_and_plots(tiny_compare):
    config, out, results, result = tiny_compare
    for name in ("compare.csv", "compare_summary.csv", "compare_curves.csv", "compare.png",
                 "compare_curves.png", "compare_config.json", "compare_env.json"):  # fmt: skip
        assert (results / name).stat().st_size > 0, name
    rows = list(csv.DictReader((results / "compare.csv").open()))
    assert len(rows) == len(result.records)
    summary = {r["method"]: r for r in csv.DictReader((results / "compare_summary.csv").open())}
    assert summary["lora"]["seeds"] == "2" and summary["full"]["seeds"] == "1"
    mean = sum(float(r["safety_rate"]) for r in rows if r["method"] == "sails") / 2
    assert float(summary["sails"]["safety_rate_mean"]) == pytest.approx(mean, abs=1e-6)
    curves = list(csv.DictReader((results / "compare_curves.csv").open()))
    assert len(curves) == 1 + 11 * 3


def test_compare_reuses_finished_runs_and_reruns_changed_ones(tiny_compare, monkeypatch):
    config, out, results, result = tiny_compare

    def fail(*args, **kwargs):
        raise AssertionError("a finished (method, seed) was trained again")

    monkeypatch.setattr(compare_mod, "run_method", fail)
    again = run_compare(config, out)
    assert again.records == result.records
    # another probe schedule is another experiment: its fingerprint differs, so it would be rerun
    changed = CompareConfig.from_dict({**config.to_dict(), "probe_every": 2})
    spec = config.methods[0]
    assert record_fingerprint(spec, 0, changed) != record_fingerprint(spec, 0, config)
    with pytest.raises(AssertionError, match="trained again"):
        run_compare(changed, out, only=["lora"])
    with pytest.raises(ValueError, match="unknown method"):
        run_compare(config, out, only=["dora"])


def test_read_side_only_keeps_peft_init_on_write_modules(tiny_compare):
    config, out, _, _ = tiny_compare
    shared = prepare_shared(config, out)
    spec = next(m for m in config.methods if m.read_side_only)
    model, info = build_method_model(spec, 0, shared, config.run)
    full_init, _ = build_method_model(config.methods[0], 0, shared, config.run)
    assert info["write_side_reset"] == 3
    layer = model.base_model.model.model.layers[2].self_attn
    ref = full_init.base_model.model.model.layers[2].self_attn
    torch.testing.assert_close(layer.q_proj.lora_A["default"].weight, ref.q_proj.lora_A["default"].weight)
    # o_proj: PEFT's init (Kaiming A, B = 0) instead of B = U, A = 0
    assert layer.o_proj.lora_B["default"].weight.abs().sum() == 0
    assert layer.o_proj.lora_A["default"].weight.abs().sum() > 0
    assert ref.o_proj.lora_A["default"].weight.abs().sum() == 0


def test_cli_compare(tiny_compare, tmp_path, capsys):
    config, out, _, _ = tiny_compare
    assert cli_main(["compare", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert CompareConfig.from_dict(printed).to_dict() == CompareConfig().to_dict()
    path = tmp_path / "c.json"
    config.save(path)
    # everything is already done in `out`: the command reuses it and prints the summary
    assert (
        cli_main(["compare", "--config", str(path), "--out", str(out), "--results", str(tmp_path / "r")]) == 0
    )
    text = capsys.readouterr().out
    assert "| sails | 2 |" in text and (tmp_path / "r" / "compare.csv").exists()
    assert cli_main(["compare", "--config", str(path), "--out", str(out), "--methods", "dora"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert cli_main(["compare", "--config", str(path), "--out", str(out), "--seeds", "x"]) == 2
    missing = str(tmp_path / "no_judge")
    assert cli_main(["compare", "--config", str(path), "--out", str(out), "--judge", missing]) == 2
    assert "judge model folder" in capsys.readouterr().err
    assert cli_main(["compare"]) == 2


def _make_tables():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "make_tables.py"
    spec = importlib.util.spec_from_file_location("make_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_is_rendered_from_the_summary_csv(tiny_compare):
    _, _, results, result = tiny_compare
    rows = list(csv.DictReader((results / "compare_summary.csv").open()))
    assert _make_tables().compare_table(rows) == format_summary(summarize(result.records))


@pytest.mark.parametrize("name, seeds", [("smollm2.json", 3), ("smollm2_20steps.json", 1)])
def test_the_committed_comparison_configs_are_valid(name, seeds):
    from pathlib import Path

    config = CompareConfig.load(Path(__file__).resolve().parent.parent / "benchmarks" / "compare" / name)
    assert {m.kind for m in config.methods} == set(compare_config_mod.METHOD_KINDS)
    assert len(config.seeds) == seeds
    assert config.run.model.quantize == "none" and config.run.model.path == "embedded"


def test_compare_with_a_judge_scores_every_final_evaluation(tiny_compare, tmp_path, monkeypatch, capsys):
    import shutil

    from test_evaluate import _rigged_judge
    from tiny import tiny_tokenizer

    from sails_fast.evaluation import judge as evaluate_mod

    config, out, _, _ = tiny_compare
    judge_dir = out.parent / "model"  # any existing folder; loading is rigged below
    loaded = []

    def rigged_load_judge(path, dtype=None):
        loaded.append(str(path))
        tok = tiny_tokenizer()
        return _rigged_judge(tok, "2"), tok  # scores every response 2: safe

    monkeypatch.setattr(evaluate_mod, "load_judge", rigged_load_judge)
    d = config.to_dict()
    d["run"]["eval"]["judge_max_new_tokens"] = 1  # the rigged judge writes "2" at every step
    d.update(methods=[{"name": "lora", "kind": "lora"}], seeds=[0], judge=str(judge_dir))
    judged = CompareConfig.from_dict(d)
    # judging is part of what a result depends on: the unjudged records are not reused for it
    spec = judged.methods[0]
    assert record_fingerprint(spec, 0, judged) != record_fingerprint(spec, 0, config)
    work = tmp_path / "out"
    shutil.copytree(out, work)  # the pipeline steps are reused; base and lora are evaluated again
    result = run_compare(judged, work, results_dir=tmp_path / "results")
    assert loaded == [str(judge_dir)]  # loaded once for the whole comparison
    assert [r["method"] for r in result.records] == ["base", "lora"]
    for r in result.records:
        assert (r["judge_safety_rate"], r["judge_mean_harm"], r["judge_parse_failures"]) == (1.0, 2.0, 0)
    lora_eval = json.loads((work / "runs" / "lora" / "seed0" / "eval.json").read_text())
    assert lora_eval["judge"]["scores"] and set(lora_eval["judge"]["scores"]) == {2}
    rows = list(csv.DictReader((tmp_path / "results" / "compare.csv").open()))
    assert [float(r["judge_safety_rate"]) for r in rows] == [1.0, 1.0]
    summary = list(csv.DictReader((tmp_path / "results" / "compare_summary.csv").open()))
    assert summary[1]["judge_mean_harm_mean"] == "2.0"
    table = format_summary(summarize(result.records))
    head, _, base_line, lora_line = table.splitlines()
    assert head.split("|")[4].strip() == "judge safety" and lora_line.split("|")[4].strip() == "1.000 ± 0.000"
    assert _make_tables().compare_table(summary) == table
    assert "judge safety 1.000" in capsys.readouterr().out
    # without a judge, no judge columns
    assert "judge_safety_rate" not in (out.parent / "results" / "compare.csv").read_text().splitlines()[0]
