"""The memory planner (`sails-fast plan`): its counts against real models and the published sizes, its
CLI, and its predictions against measured peaks of the same steps.

Which measurement backs which claim:
- default tier (CPU): a small random Llama (hidden 256, vocabulary 8192), the pairs, statistics and
  training steps measured with the PyTorch profiler (tensor allocations) on top of the resident weights:
  prediction within 20 %;
- slow tier (CPU): the same on SmolLM2-135M (the embedded model), 4 x 256 tokens: within 20 %;
- gpu tier: the same on SmolLM2-135M on CUDA (torch.cuda.max_memory_allocated), within 20 %; never run
  here (no GPU was lent to this project yet).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer

from sails_fast.cli import main as cli_main
from sails_fast.pipeline.config import RunConfig
from sails_fast.pipeline.memory import GiB, ModelShape, nf4_bytes, plan_memory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import memory_check  # noqa: E402
import memory_table  # noqa: E402

CONFIGS = ROOT / "benchmarks" / "model_configs"


@pytest.mark.parametrize(
    "name, published", [("gemma-2-2b", 2.614e9), ("gemma-2-9b", 9.242e9), ("llama-3.1-8b", 8.030e9)]
)
def test_parameter_counts_match_the_published_models(name, published):
    assert ModelShape.from_pretrained(CONFIGS / name).params() == pytest.approx(published, rel=1e-3)


def test_parameter_counts_match_instantiated_models():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = tiny_tokenizer()
    llama = tiny_llama(tokenizer=tok)
    assert ModelShape.from_config(llama.config.to_dict()).params() == sum(
        p.numel() for p in llama.parameters()
    )
    config = Gemma2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=500,
    )  # fmt: skip
    gemma = Gemma2ForCausalLM(config)
    assert ModelShape.from_config(config.to_dict()).params() == sum(p.numel() for p in gemma.parameters())


def test_nf4_bytes_match_the_nf4_layout():
    from sails_fast.fused.nf4_weight import quantize_nf4

    w = torch.randn(384, 640)
    q = quantize_nf4(w, double_quant=True)
    stored = sum(t.numel() * t.element_size() for t in (q.packed, q.absmax, q.nested_absmax))
    assert nf4_bytes(w.numel()) == stored
    single = quantize_nf4(w, double_quant=False)
    assert nf4_bytes(w.numel(), double_quant=False) == single.packed.numel() + 4 * single.absmax.numel()


def test_the_chunked_loss_is_what_lets_a_9b_model_train_in_16_gib():
    config = RunConfig.load(ROOT / "benchmarks" / "plans" / "paper_setting.json")
    shape = ModelShape.from_pretrained(CONFIGS / "gemma-2-9b")
    chunked = plan_memory(config, shape).steps["train"]
    d = config.to_dict()
    d["sails"]["train"]["loss_chunk_tokens"] = None
    plain = plan_memory(RunConfig.from_dict(d), shape).steps["train"]
    assert chunked.fits(16) and not plain.fits(16)
    # the plain path's loss: 2048 tokens x 256000 words of bf16 logits, their response rows' bf16 copy,
    # and 2 fp32 buffers (log-softmax, its gradient)
    assert plain.parts["logits + loss, or a recomputed block"] == 2048 * 256000 * (2 + 2 + 8)
    assert "| gemma-2-9b |" in memory_table.table()


def test_plan_cli_reads_a_folder_with_only_config_json(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "llama-3.1-8b" / "config.json").read_text())
    cfg = ROOT / "benchmarks" / "plans" / "paper_setting.json"
    assert cli_main(["plan", "--config", str(cfg), "--model", str(folder), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train_peak_bytes"] == out["steps"]["train"]["peak_bytes"] > 5 * GiB
    assert out["stats_peak_bytes"] > out["train_peak_bytes"]  # the bf16 model vs the 4-bit base
    assert set(out["steps"]) == {"pairs", "stats", "train", "eval"}
    assert out["steps"]["train"]["fits"] == {"16GiB": True, "24GiB": True}
    assert cli_main(["plan", "--config", str(cfg), "--model", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "train:" in text and "16 GiB: fits" in text and "checkpointed block inputs" in text


def test_plan_with_fsdp_ranks_shards_only_the_training_base(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "llama-3.1-8b" / "config.json").read_text())
    shape = ModelShape.from_pretrained(folder)
    plans = {}
    for parallel in ("ddp", "fsdp"):
        cfg = {"model": {"path": str(folder), "quantize": "none", "compute_dtype": "bfloat16"},
               "sails": {"train": {"parallel": parallel}}}  # fmt: skip
        (tmp_path / f"{parallel}.json").write_text(json.dumps(cfg))
        args = ["plan", "--config", str(tmp_path / f"{parallel}.json"), "--ranks", "4", "--json"]
        assert cli_main(args) == 0
        plans[parallel] = json.loads(capsys.readouterr().out)["steps"]
    ddp, fsdp = plans["ddp"], plans["fsdp"]
    for step in ("pairs", "stats", "eval"):
        assert fsdp[step] == ddp[step], step
    linear = shape.linear_params() * 2
    saved = ddp["train"]["parts"]["base weights (bfloat16)"] - sum(
        v for k, v in fsdp["train"]["parts"].items() if k not in ddp["train"]["parts"]
    )
    # 3/4 of the layers' weights leave each rank; two layers are whole while they run
    assert saved == pytest.approx(linear * 3 / 4 - 2 * linear / shape.layers, rel=1e-6)
    assert (
        ddp["train"]["parts"]
        == plan_memory(RunConfig.load(tmp_path / "ddp.json"), shape).to_dict()["steps"]["train"]["parts"]
    )  # DDP: every rank holds what one process holds
    assert cli_main(["plan", "--config", str(tmp_path / "fsdp.json"), "--ranks", "0"]) != 0
    assert "ranks: expected an int >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "model, message",
    [("{tmp}/missing", "does not exist"), ("{tmp}", "has no config.json"), ("{tmp}/bad", "not valid JSON")],
)
def test_plan_cli_errors_name_the_path(tmp_path, capsys, model, message):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert cli_main(["plan", "--model", model.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and str(tmp_path) in err


def small_llama(path: Path) -> Path:
    """A random Llama big enough that its tensors, not constant overheads, set the peaks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    config = LlamaConfig(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=8192, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def assert_within_20_percent(rows):
    assert {r["step"] for r in rows} == {"pairs", "stats", "train"}
    for r in rows:
        assert 0.8 <= r["ratio"] <= 1.2, r


def test_prediction_within_20_percent_of_measured_cpu_small_llama(tmp_path):
    config = memory_check.check_config(batch=2, seq=128)
    config.sae.layers = (2,)
    assert_within_20_percent(memory_check.run_check(str(small_llama(tmp_path)), config, torch.device("cpu")))


@pytest.mark.slow
def test_prediction_within_20_percent_of_measured_cpu_smollm2():
    from sails_fast.models.embedded import embedded_model_path

    path = str(embedded_model_path(verbose=False))
    assert_within_20_percent(
        memory_check.run_check(path, memory_check.check_config(4, 256), torch.device("cpu"))
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prediction_within_20_percent_of_measured_cuda_smollm2():
    from sails_fast.models.embedded import embedded_model_path

    path = str(embedded_model_path(verbose=False))
    config = memory_check.check_config(4, 512)
    config.model.compute_dtype = "bfloat16"
    assert_within_20_percent(memory_check.run_check(path, config, torch.device("cuda")))


@pytest.mark.parametrize(
    "dtype, chunk, checkpointing", [("bfloat16", None, False), ("bfloat16", "auto", True)]
)
def test_training_prediction_in_16_bit_with_and_without_chunks_and_checkpointing(
    tmp_path, dtype, chunk, checkpointing
):
    """bf16 compute on the 4-bit base: activations are fp32 all the same (PEFT upcasts the embedding)."""
    config = memory_check.check_config(batch=2, seq=128)
    config.model.compute_dtype = dtype
    config.sails.train.loss_chunk_tokens = chunk
    config.sails.train.gradient_checkpointing = checkpointing
    (row,) = memory_check.run_check(str(small_llama(tmp_path)), config, torch.device("cpu"), ("train",))
    assert 0.8 <= row["ratio"] <= 1.2, row


def test_readme_memory_table_is_the_planners():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- table:memory -->\n", 1)[1].split("\n<!-- /table:memory -->", 1)[0]
    assert block == memory_table.table()
