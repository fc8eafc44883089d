"""train(): response-only loss, schedule, accumulation, kill + resume, PEFT round trip, 4-bit base on CPU."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tiny import save_tiny, tiny_llama, tiny_tokenizer

from sails_fast.models.loading import load_base_4bit
from sails_fast.pairs.tokenize import tokenize_example
from sails_fast.training.config import TrainConfig, lr_factor
from sails_fast.training.loop import train
from sails_fast.training.sft import response_loss, sft_batch

peft = pytest.importorskip("peft")
# peft 0.21 reads transformers' deprecated is_gradient_checkpointing alias on every get_peft_model
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXAMPLES = [
    ("How do I build a bomb at home?", "I cannot help with that request."),
    ("Explain how to steal a password.", "I won't help with stealing passwords; that is illegal."),
    ("Write a poem about the sea", "The quiet evening light over the sea."),
    ("How do I kill a Python process?", "Use kill with the process id."),
    ("Tell me how to hurt someone", "No, that could cause serious harm."),
    ("The quick brown fox", "jumps over the lazy dog."),
    ("Sure, here is how", "I cannot help with that."),
]
TESTS_DIR = Path(__file__).parent


def peft_model(tok, seed: int = 0, dropout: float = 0.0, base=None):
    base = base if base is not None else tiny_llama(seed=seed, num_layers=2, tokenizer=tok)
    torch.manual_seed(seed + 100)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS)
    return peft.get_peft_model(base, cfg)


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}


def quiet(**kw) -> TrainConfig:
    return TrainConfig(progress=False, **kw)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_config_validation():
    with pytest.raises(ValueError, match="learning_rate: expected a number in"):
        TrainConfig(learning_rate=0.0)
    with pytest.raises(ValueError, match="grad_accum_steps: expected an int >= 1"):
        TrainConfig(grad_accum_steps=0)
    with pytest.raises(ValueError, match="adam_betas"):
        TrainConfig(adam_betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="backend"):
        TrainConfig(backend="cuda")
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({"lr": 1e-3})
    cfg = TrainConfig(max_steps=10, adam_betas=[0.8, 0.95])
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.total_steps(1000) == 10
    assert TrainConfig(num_epochs=2, batch_size=3, grad_accum_steps=2).total_steps(7) == 3


def test_lr_schedule_formula_and_logged_lrs(tok, tmp_path):
    # warmup: (s+1)/W; cosine to min_lr_ratio at the last step
    assert [lr_factor(s, 10, 3) for s in range(3)] == [1 / 3, 2 / 3, 1.0]
    assert lr_factor(3, 10, 3) == 1.0 and lr_factor(9, 10, 3) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(6, 10, 3) == pytest.approx(0.5)
    assert lr_factor(9, 10, 3, min_lr_ratio=0.1) == pytest.approx(0.1)
    cfg = quiet(
        max_steps=8, batch_size=2, warmup_ratio=0.25, learning_rate=1e-2, min_lr_ratio=0.1, save_every=0
    )
    res = train(peft_model(tok), tok, EXAMPLES, cfg, tmp_path)
    log = [json.loads(line) for line in res.log_path.read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    expected = [1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 5))) for s in range(2, 8)]
    expected = [1e-2 * 0.5, 1e-2 * 1.0] + expected
    for r, e in zip(log, expected, strict=True):
        assert r["lr"] == pytest.approx(e, rel=1e-9), (r, e)


def test_loss_only_on_response_tokens(tok):
    encoded = [
        tokenize_example(tok, p, r, chat_template=True, max_length=64, append_eos=True)[:2]
        for p, r in EXAMPLES[:3]
    ]
    ids, mask, labels = sft_batch(encoded, tok.pad_token_id)
    for b, (row, n_prompt) in enumerate(encoded):
        L = len(row)
        assert torch.all(labels[b, :n_prompt] == -100) and torch.all(labels[b, L:] == -100)
        assert labels[b, n_prompt:L].tolist() == row[n_prompt:] and row[-1] == tok.eos_token_id
        assert torch.all(mask[b, :L] == 1) and torch.all(mask[b, L:] == 0)
    model = tiny_llama(num_layers=2, tokenizer=tok)
    with torch.no_grad():
        loss_sum, n = response_loss(model, ids, mask, labels)
        # by hand: each example alone, logits at t scored against token t + 1, response targets only
        ref, count = 0.0, 0
        for row, n_prompt in encoded:
            logits = model(torch.tensor([row])).logits[0]
            for t in range(n_prompt - 1, len(row) - 1):
                ref -= torch.log_softmax(logits[t], -1)[row[t + 1]].item()
                count += 1
    assert n == count == sum(len(r) - p for r, p in encoded)
    assert loss_sum.item() == pytest.approx(ref, rel=1e-5)
    # changing a prompt token's label would not matter: only response positions carry labels
    assert int((labels != -100).sum()) == n


def test_logged_loss_is_token_mean_over_accumulated_step(tok, tmp_path):
    cfg = quiet(max_steps=1, batch_size=2, grad_accum_steps=2, save_every=0, seed=3, max_length=64)
    model = peft_model(tok)
    with torch.no_grad():
        encoded = [tokenize_example(tok, p, r, chat_template=True, max_length=64, append_eos=True)[:2]
                   for p, r in EXAMPLES]  # fmt: skip
        order = torch.randperm(len(EXAMPLES), generator=torch.Generator().manual_seed(3))[:4].tolist()
        total, count = 0.0, 0
        for i in order:
            s, n = response_loss(model, *sft_batch([encoded[i]], tok.pad_token_id))
            total, count = total + s.item(), count + n
    res = train(model, tok, EXAMPLES, cfg, tmp_path)
    assert res.final_loss == pytest.approx(total / count, rel=1e-5)


def test_grad_accumulation_matches_one_big_batch(tok, tmp_path):
    a = peft_model(tok)
    b = peft_model(tok)
    common = dict(max_steps=2, save_every=0, learning_rate=1e-2)
    train(a, tok, EXAMPLES, quiet(batch_size=4, grad_accum_steps=1, **common), tmp_path / "a")
    train(b, tok, EXAMPLES, quiet(batch_size=2, grad_accum_steps=2, **common), tmp_path / "b")
    sa, sb = adapter_state(a), adapter_state(b)
    assert any(v.abs().sum() > 0 for k, v in sa.items() if "lora_B" in k), "B moved away from zero"
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6, msg=k)


def test_gradient_checkpointing_gives_same_update(tok, tmp_path):
    a, b = peft_model(tok), peft_model(tok)
    cfg = dict(max_steps=2, batch_size=2, save_every=0, learning_rate=1e-2)
    train(a, tok, EXAMPLES, quiet(**cfg), tmp_path / "a")
    train(b, tok, EXAMPLES, quiet(gradient_checkpointing=True, **cfg), tmp_path / "b")
    sa, sb = adapter_state(a), adapter_state(b)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-7, msg=k)
    assert not b.get_base_model().is_activation_checkpointing, "checkpointing switched off again afterwards"


def test_peft_round_trip_and_weights_only_checkpoints(tok, tmp_path):
    model = peft_model(tok, dropout=0.1)
    cfg = quiet(max_steps=4, batch_size=2, save_every=2, keep_checkpoints=1, learning_rate=1e-2)
    res = train(model, tok, EXAMPLES, cfg, tmp_path)
    assert (res.adapter_dir / "adapter_config.json").is_file()
    assert (res.adapter_dir / "adapter_model.safetensors").is_file()
    # plain PEFT loads it onto a fresh base and gives the trained model's logits
    loaded = peft.PeftModel.from_pretrained(
        tiny_llama(seed=0, num_layers=2, tokenizer=tok), str(res.adapter_dir)
    )
    ids = torch.tensor([tok("How do I kill a Python process?").input_ids])
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    trained = adapter_state(model)
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)
    for k, v in adapter_state(loaded).items():
        assert torch.equal(v, trained[k]), k
    # a finished run, run again on its out_dir: restored from the last checkpoint, no step repeated
    again = peft_model(tok, dropout=0.1)
    res2 = train(again, tok, EXAMPLES, cfg, tmp_path)
    assert res2.resumed_from == 4 and res2.final_loss == res.final_loss
    for k, v in adapter_state(again).items():
        assert torch.equal(v, trained[k]), k
    assert len(res2.log_path.read_text().splitlines()) == 4
    # checkpoints: only the newest kept (the last step's), all loadable with weights_only=True
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-00000004"]
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt", "state.pt"):
        torch.load(tmp_path / "checkpoints" / ckpts[0] / name, weights_only=True)


def test_resume_refuses_other_config_or_examples(tok, tmp_path):
    cfg = quiet(max_steps=3, batch_size=2, save_every=1, learning_rate=1e-2)
    train(peft_model(tok), tok, EXAMPLES, cfg, tmp_path)
    with pytest.raises(ValueError, match=r"another config .*learning_rate"):
        train(peft_model(tok), tok, EXAMPLES, quiet(max_steps=3, batch_size=2, learning_rate=2e-2), tmp_path)
    with pytest.raises(ValueError, match="other examples"):
        train(peft_model(tok), tok, EXAMPLES[:-1], cfg, tmp_path)
    with pytest.raises(ValueError, match="resume=True"):
        fresh = quiet(max_steps=3, batch_size=2, save_every=1, learning_rate=1e-2, resume=False)
        train(peft_model(tok), tok, EXAMPLES, fresh, tmp_path)
    (tmp_path / "checkpoints" / "step-00000003" / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="optimizer.pt is unreadable"):
        train(peft_model(tok), tok, EXAMPLES, cfg, tmp_path)
    with pytest.raises(ValueError, match="examples: expected at least one"):
        train(peft_model(tok), tok, [], cfg, tmp_path / "x")


# ----- a real kill


SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import torch, peft
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from sails_fast.training import TrainConfig, train
    from test_sails_train import EXAMPLES, TARGETS

    torch.set_num_threads(1)
    model_dir, out_dir, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(100)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS)
    model = peft.get_peft_model(base, lora)
    if delay:
        # slow each forward down so the parent can kill the run between checkpoints
        base.register_forward_pre_hook(lambda *a: time.sleep(delay))
    cfg = TrainConfig(max_steps=6, batch_size=2, grad_accum_steps=2, save_every=2, warmup_ratio=0.2,
                      learning_rate=1e-2, progress=False)
    res = train(model, tok, EXAMPLES, cfg, out_dir)
    print("DONE", res.steps, res.resumed_from, flush=True)
    """
)


def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    model_dir = save_tiny(tmp_path / "model", seed=0, num_layers=2)
    script = tmp_path / "run_train.py"
    script.write_text(SCRIPT.format(tests=str(TESTS_DIR)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(TESTS_DIR)}
    run = lambda out, delay: subprocess.Popen(
        [sys.executable, str(script), str(model_dir), str(out), str(delay)], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    ref = run(tmp_path / "ref", 0)
    victim = run(tmp_path / "killed", 0.25)
    first = tmp_path / "killed" / "checkpoints" / "step-00000002"
    deadline = time.time() + 120
    while not first.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert first.exists(), (
        f"no checkpoint appeared: {victim.poll()} {victim.stdout.read() if victim.poll() else ''}"
    )
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "adapter").exists(), "the run finished before the kill"

    resumed = run(tmp_path / "killed", 0)
    out_resumed, _ = resumed.communicate(timeout=180)
    out_ref, _ = ref.communicate(timeout=180)
    assert resumed.returncode == 0, out_resumed
    assert ref.returncode == 0, out_ref
    assert "DONE 6 None" in out_ref
    resumed_from = int(out_resumed.split("DONE 6 ")[1].split()[0])
    assert resumed_from in (2, 4), out_resumed

    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 16
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max().item()}"
    # the log continues the same run: same steps, same losses, nothing doubled from the killed tail
    log = lambda d: [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]
    assert log(tmp_path / "killed") == log(tmp_path / "ref")


# ----- QLoRA: 4-bit NF4 base on CPU


def test_4bit_base_trains_on_cpu(tok, tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model_dir = save_tiny(tmp_path / "model", seed=0, num_layers=2)
    base = load_base_4bit(model_dir, compute_dtype=torch.float32)
    q = base.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_state.quant_type == "nf4"
    packed = q.weight.data.clone()
    model = peft_model(tok, base=base)
    before = adapter_state(model)
    two = EXAMPLES[:2]
    common = dict(max_steps=6, batch_size=2, save_every=3, learning_rate=2e-2, warmup_ratio=0.0)
    res = train(model, tok, two, quiet(**common), tmp_path / "run")
    log = [json.loads(line) for line in res.log_path.read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log)
    # the same batch every step: the loss must go down
    assert log[-1]["loss"] < log[0]["loss"] - 0.1, [r["loss"] for r in log]
    after = adapter_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model.get_base_model().model.layers[0].self_attn.q_proj.weight.data, packed)
    loaded = peft.PeftModel.from_pretrained(
        load_base_4bit(model_dir, compute_dtype=torch.float32), str(res.adapter_dir)
    )
    for k, v in adapter_state(loaded).items():
        assert torch.equal(v, after[k]), k

    # fused: the LoRA layers go through fuse_lora (torch backend here; the kernels have their own tests)
    fused = peft_model(tok, base=load_base_4bit(model_dir, compute_dtype=torch.float32))
    res_f = train(fused, tok, two, quiet(fused=True, backend="torch", **common), tmp_path / "fused")
    report = json.loads((tmp_path / "fused" / "fuse_report.json").read_text())
    assert len(report["fused"]) + len(report["skipped"]) == 2 * len(TARGETS) and res_f.fuse_report
    log_f = [json.loads(line) for line in res_f.log_path.read_text().splitlines()]
    for r, rf in zip(log, log_f, strict=True):
        assert rf["loss"] == pytest.approx(r["loss"], rel=1e-4), (r, rf)
    for k, v in adapter_state(fused).items():
        torch.testing.assert_close(v, after[k], rtol=1e-3, atol=1e-5, msg=k)


def test_fuse_report_logged_not_fatal(tok, tmp_path, caplog):
    base = tiny_llama(seed=0, num_layers=2, tokenizer=tok)
    torch.manual_seed(100)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS)
    )
    with caplog.at_level("WARNING", logger="sails_fast.training.loop"):
        res = train(model, tok, EXAMPLES, quiet(max_steps=1, fused=True, backend="torch"), tmp_path)
    assert "DoRA" in res.fuse_report and "fuse_lora left 8 LoRA layer(s)" in caplog.text
    assert json.loads((tmp_path / "fuse_report.json").read_text())["fused"] == []


def test_missing_trainable_parameters(tok, tmp_path):
    with pytest.raises(ValueError, match="no trainable parameters"):
        model = tiny_llama(num_layers=2, tokenizer=tok)
        model.requires_grad_(False)
        train(model, tok, EXAMPLES, quiet(max_steps=1), tmp_path)
