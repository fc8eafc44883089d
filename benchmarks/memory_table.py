"""The README's memory table: predicted peak device memory of each step for Gemma-2-2B, Gemma-2-9B and
Llama-3.1-8B at the paper's setting (LoRA r 16 on q, k, v, o; NF4; sequence 512; batch 4; checkpointing
on; bf16 compute; one 16384-latent SAE), with the 16 / 24 GiB verdicts, and training with the plain
[tokens x vocab] logits beside the chunked loss. Prints Markdown; every number is `sails-fast plan`'s:

    python benchmarks/memory_table.py
    sails-fast plan --config benchmarks/plans/paper_setting.json \\
        --model benchmarks/model_configs/gemma-2-9b --sae-latents 16384
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sails_fast.pipeline.config import RunConfig
from sails_fast.pipeline.memory import BUDGETS_GIB, GiB, ModelShape, plan_memory

HERE = Path(__file__).resolve().parent
MODELS = ("gemma-2-2b", "gemma-2-9b", "llama-3.1-8b")
SAE_LATENTS = 16384


def table() -> str:
    config = RunConfig.load(HERE / "plans" / "paper_setting.json")
    plain_train = dataclasses.replace(config.sails.train, loss_chunk_tokens=None)
    plain = dataclasses.replace(config, sails=dataclasses.replace(config.sails, train=plain_train))
    head = "| model | pairs | stats | train | eval | train, plain logits | fits 16 GiB | fits 24 GiB |"
    rows = [head, "|---|---|---|---|---|---|---|---|"]
    for name in MODELS:
        shape = ModelShape.from_pretrained(HERE / "model_configs" / name)
        plan = plan_memory(config, shape, sae_latents=SAE_LATENTS)
        train_plain = plan_memory(plain, shape, sae_latents=SAE_LATENTS).steps["train"]
        cells = [f"{plan.steps[s].peak_bytes / GiB:.1f}" for s in ("pairs", "stats", "train", "eval")]
        cells.append(f"{train_plain.peak_bytes / GiB:.1f}")
        for g in BUDGETS_GIB:
            failing = [s for s, p in plan.steps.items() if not p.fits(g)]
            cells.append("all steps" if not failing else "no: " + ", ".join(failing))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print("Predicted peak device memory, GiB (CUDA: tensors + context + allocator slack)\n")
    print(table())
