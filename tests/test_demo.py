"""The demo's code path end to end on a tiny model (default tier), and the real demo (slow tier)."""

from __future__ import annotations

import pytest
from test_sails_pipeline import tiny_assets, tiny_config  # noqa: F401  (fixture)

from sails_fast.pipeline.demo import DEMO_LAYER, demo_config, run_demo


def test_demo_code_path_on_a_tiny_model(tiny_assets, tmp_path, capsys):  # noqa: F811
    result = run_demo(tmp_path / "demo", config=tiny_config(*tiny_assets))
    out = capsys.readouterr().out
    assert "before" in out and "after" in out, out
    assert "refusal rate" in out and "wall time" in out and "peak memory" in out
    assert result.report_path is not None and result.report_path.exists()


def test_demo_config_is_the_embedded_default():
    config = demo_config()
    assert config.model.path == "embedded" and config.model.quantize == "nf4"
    assert config.sae.source == "embedded" and config.sae.layers == (DEMO_LAYER,)
    assert config.data.harmful == "advbench"
    quick = demo_config(quick=True)
    assert quick.sails.train.max_steps < config.sails.train.max_steps


@pytest.mark.slow
def test_real_demo_quick(tmp_path, capsys):
    """SmolLM2-135M-Instruct from the wheel, an SAE trained with sae-lens, AdvBench: the quick budget."""
    result = run_demo(tmp_path / "demo", quick=True)
    assert result.after is not None and result.report_path.exists()
    out = capsys.readouterr().out
    assert "wall time" in out
