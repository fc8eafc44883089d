"""Predicted vs measured peak memory of each pipeline step, on the machine at hand.

Runs each step's real code path once on a model (default: the embedded SmolLM2-135M) at a given batch and
sequence length and measures its peak memory: on CUDA `torch.cuda.max_memory_allocated`, on CPU the
allocations the PyTorch profiler records (every tensor allocation and free, in time order), each on top
of the bytes of the tensors already resident (weights, SAEs) counted one by one. Beside each measured row
it prints the planner's prediction (`sails_fast.pipeline.memory.plan_memory`) for the same settings and
their ratio; `--check` exits 1 when a ratio leaves [0.8, 1.2].

    python benchmarks/memory_check.py                    # SmolLM2-135M, CPU, fp32
    python benchmarks/memory_check.py --model PATH --batch 4 --seq 512 --check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from collections.abc import Callable

import torch


def tensor_bytes(*modules) -> int:
    """Bytes of the distinct storages of the modules' parameters and buffers."""
    seen, total = set(), 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            s = t.untyped_storage()
            key = (s.device.type, s.data_ptr())
            if key not in seen:
                seen.add(key)
                total += s.nbytes()
    return total


def measure_peak(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while fn() runs, above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    # each op's own net allocation (children excluded), frees as [memory] events, in time order
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def quant_state_bytes(model) -> int:
    """Bytes of bitsandbytes' 4-bit quantisation state (absmax, nested absmax, code), not parameters."""
    total, seen = 0, set()
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        while qs is not None:
            for t in (getattr(qs, "absmax", None), getattr(qs, "code", None)):
                if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
            qs = getattr(qs, "state2", None)
    return total


def long_text(tokens: int, seed: int) -> str:
    """A text of at least `tokens` tokens for any BPE vocabulary (one word per token or more)."""
    import random

    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(tokens))


def measure_stats(model, tokenizer, config, device) -> dict[str, int]:
    """collect_feature_stats over pairs long enough that every example fills collect.max_length."""
    from sails_fast.data.records import ContrastivePair
    from sails_fast.sae.weights import SAEWeights
    from sails_fast.statistics.collect import collect_feature_stats

    d, F = model.config.hidden_size, 8 * model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    saes = {}
    for layer in config.sae.layers:
        w = torch.randn(d, F, generator=g) / d**0.5
        saes[layer] = SAEWeights(w.to(device), torch.zeros(F, device=device), w.t().contiguous().to(device),
                                 torch.zeros(d, device=device), activation="topk", k=32)  # fmt: skip
    n = config.sails.collect.batch_size  # pairs: 2 x batch_size examples, two full forwards
    L = config.sails.collect.max_length
    pairs = [
        ContrastivePair(
            prompt=long_text(8, i),
            aligned=long_text(L, 2 * i),
            unaligned=long_text(L, 2 * i + 1),
            source="check",
            unaligned_from="generated",
        )
        for i in range(n)
    ]
    collect = dataclasses.replace(config.sails.collect, layers=tuple(config.sae.layers), progress=False)
    resident = tensor_bytes(model) + sum(tensor_bytes_of(s) for s in saes.values())
    peak = measure_peak(lambda: collect_feature_stats(model, tokenizer, saes, pairs, collect), device)
    return {"resident": resident, "step": peak}


def tensor_bytes_of(sae) -> int:
    return sum(t.numel() * t.element_size() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))


def measure_train(model_path, tokenizer, config, device) -> dict[str, int]:
    """One optimizer step of the training loop's code (`_optimizer_step`, AdamW's first step included) on
    the 4-bit base with the run's LoRA targets, rank, checkpointing and loss chunking, batch_size rows of
    max_length tokens, all but the first a response token."""
    from peft import LoraConfig, get_peft_model

    from sails_fast.models.loading import load_base_4bit
    from sails_fast.training.data_parallel import StepLoss
    from sails_fast.training.loop import _optimizer, _optimizer_step

    train, init = config.sails.train, config.sails.init
    dtype = getattr(torch, config.model.compute_dtype)
    base = load_base_4bit(
        model_path, compute_dtype=dtype, gradient_checkpointing=train.gradient_checkpointing
    )
    rank = config.sails.subspace.rank
    peft_model = get_peft_model(
        base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(init.target_modules))
    )
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer(params, train, 10)
    g = torch.Generator().manual_seed(0)
    vocab = peft_model.get_input_embeddings().weight.shape[0]
    micro = [
        [
            (torch.randint(10, vocab, (train.max_length,), generator=g).tolist(), 1)
            for _ in range(train.batch_size)
        ]
    ]
    resident = tensor_bytes(peft_model) + quant_state_bytes(peft_model)

    step_loss = StepLoss(peft_model, train.loss_chunk_tokens)
    n_tok = sum(len(ids) - n_prompt for ids, n_prompt in micro[0])

    def step():
        _optimizer_step(step_loss, micro, n_tok, 0, device, params, train, optimizer, scheduler)

    return {"resident": resident, "step": measure_peak(step, device)}


def measure_pairs(model, tokenizer, config, device, tmp) -> dict[str, int]:
    """generate_unaligned of batch_size prompts cut to collect.max_length tokens."""
    from sails_fast.pairs.generation import generate_unaligned

    collect = dataclasses.replace(config.sails.collect, progress=False, chat_template=False)
    prompts = [long_text(collect.max_length + 8, 100 + i) for i in range(collect.batch_size)]
    resident = tensor_bytes(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the prompts are cut on purpose
        peak = measure_peak(
            lambda: generate_unaligned(model, tokenizer, prompts, collect, tmp / "c.jsonl"), device
        )
    return {"resident": resident, "step": peak}


def run_check(model_path: str, config, device: torch.device, steps=("pairs", "stats", "train")) -> list[dict]:
    """Measured and predicted peaks of `steps` (rows: step, measured, predicted, ratio)."""
    import tempfile
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sails_fast.pipeline.memory import ModelShape, plan_memory

    plan = plan_memory(config, ModelShape.from_pretrained(model_path), device=device.type)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows = []
    measured = {}
    if {"pairs", "stats"} & set(steps):
        dtype = getattr(torch, config.model.compute_dtype)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        with tempfile.TemporaryDirectory() as tmp:
            if "pairs" in steps:
                measured["pairs"] = measure_pairs(model, tokenizer, config, device, Path(tmp))
        if "stats" in steps:
            measured["stats"] = measure_stats(model, tokenizer, config, device)
        del model
    if "train" in steps:
        measured["train"] = measure_train(model_path, tokenizer, config, device)
    for step, m in measured.items():
        predicted = plan.steps[step]
        total = m["resident"] + m["step"]
        rows.append({
            "step": step, "measured_bytes": total,
            "measured_resident": m["resident"], "measured_step": m["step"],
            "predicted_bytes": predicted.tensor_bytes, "ratio": predicted.tensor_bytes / total,
        })  # fmt: skip
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="embedded", help='a local model folder, or "embedded" (SmolLM2-135M)'
    )
    parser.add_argument("--config", help="a run config file (JSON / YAML); default: the CPU check's settings")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", default="pairs,stats,train")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a prediction is off by more than 20 %%"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    config = check_config(args.batch, args.seq, args.config)
    path = args.model
    if path == "embedded":
        from sails_fast.models.embedded import embedded_model_path

        path = str(embedded_model_path(verbose=False))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    rows = run_check(path, config, device, tuple(args.steps.split(",")))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"peak memory on {device.type} (tensors), {path}: measured vs predicted")
        for r in rows:
            print(f"  {r['step']:<6} measured {r['measured_bytes'] / 2**20:9.1f} MiB "
                  f"(resident {r['measured_resident'] / 2**20:.1f} + step {r['measured_step'] / 2**20:.1f}) "
                  f"predicted {r['predicted_bytes'] / 2**20:9.1f} MiB   ratio {r['ratio']:.2f}")  # fmt: skip
        print(f"({time.perf_counter() - start:.0f} s)")
    bad = [r for r in rows if not 0.8 <= r["ratio"] <= 1.2]
    return 1 if args.check and bad else 0


def check_config(batch: int, seq: int, path: str | None = None):
    """The run config the check measures: a file's, or the CPU check's (fp32 compute, NF4, LoRA r 16 on
    q, k, v, o, checkpointing on, chunked loss; `batch` rows of `seq` tokens in every step)."""
    from sails_fast.pipeline.config import RunConfig

    if path is not None:
        return RunConfig.load(path)
    return RunConfig.from_dict({
        "model": {"compute_dtype": "float32", "quantize": "nf4"},
        "sae": {"layers": [15]},
        "sails": {
            "collect": {"batch_size": batch, "max_length": seq, "max_new_tokens": 32},
            "subspace": {"rank": 16},
            "init": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "train": {"batch_size": batch, "max_length": seq, "gradient_checkpointing": True},
        },
    })  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
