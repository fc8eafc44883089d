"""One (method, seed) of the comparison study: build the method's adapted model, train it, measure it."""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sails_fast.pipeline.config import RunConfig
from sails_fast.pipeline.training_model import load_training_base
from sails_fast.selection.config import SelectConfig
from sails_fast.study.baselines import PEFT_INITS
from sails_fast.study.compare_config import CompareConfig, MethodSpec
from sails_fast.subspace.config import SubspaceConfig

# ----- one (method, seed)


@torch.no_grad()
def response_perplexity(
    model: nn.Module, tokenizer, examples: Sequence[tuple[str, str]], *, chat_template: bool, max_length: int,
    batch_size: int = 8,
) -> float:  # fmt: skip
    """exp(mean next-token NLL over the response tokens of (prompt, response) pairs).

    Example:
        >>> pairs = [("Name a fruit.", "An apple.")]
        >>> response_perplexity(model, tok, pairs, chat_template=True, max_length=256)
    """
    from sails_fast.pairs.tokenize import tokenize_example
    from sails_fast.training.sft import response_loss, sft_batch

    if not examples:
        raise ValueError("examples: expected at least one (prompt, response) pair")
    encoded = [
        tokenize_example(tokenizer, p, r, chat_template=chat_template, max_length=max_length)[:2]
        for p, r in examples
    ]
    pad_id = next((int(v) for v in (tokenizer.pad_token_id, tokenizer.eos_token_id) if v is not None), 0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(encoded), batch_size):
            batch = [t.to(device) for t in sft_batch(encoded[i : i + batch_size], pad_id)]
            loss, n = response_loss(model, *batch, chunk_tokens="auto")  # never the full logits
            total, count = total + float(loss), count + n
    finally:
        model.train(was_training)
    return math.exp(total / max(count, 1))


def _probe_config(config: CompareConfig):
    return dataclasses.replace(
        config.run.eval, max_new_tokens=config.probe_max_new_tokens, logit_score=False, progress=False
    )


def probe_safety(model: nn.Module, tokenizer, prompts: Sequence, config: CompareConfig) -> float:
    """Share of `prompts` whose short greedy answer the refusal matcher calls a refusal."""
    from sails_fast.evaluation.generation import generate_responses
    from sails_fast.evaluation.refusal import RefusalMatcher

    responses = generate_responses(model, tokenizer, prompts, _probe_config(config))
    return RefusalMatcher(window=config.run.eval.matcher_window).refusal_rate(responses)


def steps_to_target(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first probed step whose safety rate is >= target, or None when no probe reached it.

    Example:
        >>> steps_to_target([(0, 0.1), (5, 0.8), (10, 0.95)], 0.9)
        10
    """
    return next((step for step, rate in curve if rate >= target), None)


def steps_to_held_target(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first probed step from which every later probe stays >= target (None if the last is below).

    `steps_to_target` counts a spike that falls back; this one only counts a level that holds.

    Example:
        >>> steps_to_held_target([(0, 0.1), (2, 0.95), (4, 0.8), (6, 0.92), (8, 0.96)], 0.9)
        6
    """
    held = None
    for step, rate in curve:
        if rate < target:
            held = None
        elif held is None:
            held = step
    return held


@dataclass
class Shared:
    """What every (method, seed) run reads: prepared once per comparison."""

    data: dict
    examples: list
    tokenizer: Any
    model_path: str
    saes: dict
    stats: dict
    pooled: dict
    ppl_examples: list
    judge: tuple | None = None  # (model, tokenizer), loaded once


def _calibration_batches(shared: Shared, run: RunConfig, device) -> list[dict[str, torch.Tensor]]:
    """The training examples as LM batches (labels -100 outside responses), for CorDA / EVA statistics."""
    from sails_fast.pairs.tokenize import tokenize_example
    from sails_fast.training.sft import _sft_examples, sft_batch

    tok = shared.tokenizer
    train = run.sails.train
    encoded = [
        tokenize_example(tok, p, r, chat_template=train.chat_template, max_length=train.max_length)[:2]
        for p, r in _sft_examples(shared.examples)
    ]
    pad_id = next((int(v) for v in (tok.pad_token_id, tok.eos_token_id) if v is not None), 0)
    batches = []
    for i in range(0, len(encoded), train.batch_size):
        ids, mask, labels = (t.to(device) for t in sft_batch(encoded[i : i + train.batch_size], pad_id))
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def build_method_model(spec: MethodSpec, seed: int, shared: Shared, run: RunConfig) -> tuple[nn.Module, dict]:
    """The trainable model for one method and seed, and a dict describing its init."""
    from peft import get_peft_model

    from sails_fast.lora_init.init import _lora_layers, init_lora_from_subspace, make_lora_config
    from sails_fast.selection.select import select_features
    from sails_fast.study.baselines import hidden_subspace, peft_init_model
    from sails_fast.subspace.subspace import build_subspace

    torch.manual_seed(seed)  # PEFT's random inits (Kaiming A) draw from the global generator
    base = load_training_base(run, shared.model_path)
    rank = run.sails.subspace.rank
    lora_config = make_lora_config(run.sails.init, rank=rank)
    quantized = run.model.quantize == "nf4"
    info: dict[str, Any] = {"kind": spec.kind}
    if spec.kind == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        return base, info
    if spec.kind in PEFT_INITS:
        device = next(base.parameters()).device
        model = peft_init_model(
            spec.kind, base, lora_config, lambda: _calibration_batches(shared, run, device), quantized
        )
        return model, info
    if spec.kind == "sails":
        select = SelectConfig.from_dict({**run.sails.select.to_dict(), **spec.select})
        sub_config = SubspaceConfig.from_dict({**run.sails.subspace.to_dict(), **spec.subspace, "seed": seed})
        subspace = build_subspace(shared.saes, select_features(shared.stats, select), sub_config)
        info["n_components"] = {str(k): b.n_components for k, b in subspace.bases.items()}
    else:
        subspace = hidden_subspace(shared.pooled, spec.kind, rank, seed=seed)
    model = get_peft_model(base, lora_config)
    init_lora_from_subspace(model, subspace, run.sails.init)
    if spec.read_side_only:
        reset = []
        for name, module in _lora_layers(model, "default"):
            if run.sails.init.side(name.rsplit(".", 1)[-1]) == "write":
                module.reset_lora_parameters("default", True)
                reset.append(name)
        info["write_side_reset"] = len(reset)
    return model, info


def _trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _eval_metrics(result, ppl: float) -> dict[str, float | None]:
    sets = result.sets
    get = lambda name, attr: getattr(sets[name], attr) if name in sets else None  # noqa: E731
    judged = result.judge
    judge_metrics = {} if judged is None else {
        "judge_safety_rate": judged.safety_rate,
        "judge_mean_harm": judged.mean_harm,
        "judge_parse_failures": judged.parse_failures,
    }  # fmt: skip
    return {
        "safety_rate": get("harmful", "refusal_rate"),
        "over_refusal_harmless": get("harmless", "refusal_rate"),
        "over_refusal_safe_scary": get("safe_but_scary", "refusal_rate"),
        "logit_score_harmful": get("harmful", "logit_score_mean"),
        "logit_score_harmless": get("harmless", "logit_score_mean"),
        "logit_score_safe_scary": get("safe_but_scary", "logit_score_mean"),
        "ppl_harmless": ppl,
        **judge_metrics,
    }


def _evaluate_model(model, shared: Shared, run: RunConfig, label: str, out_dir: Path) -> dict:
    from sails_fast.evaluation.run import evaluate

    result = evaluate(
        model, shared.tokenizer, harmful=shared.data["test"], harmless=shared.data["harmless_test"],
        safe_but_scary=shared.data["safe_scary_test"], config=run.eval, label=label, judge=shared.judge,
    )  # fmt: skip
    result.save(out_dir / "eval.json")
    ppl = response_perplexity(
        model, shared.tokenizer, shared.ppl_examples, chat_template=run.sails.train.chat_template,
        max_length=run.sails.train.max_length, batch_size=run.eval.batch_size,
    )  # fmt: skip
    return {**_eval_metrics(result, ppl), "matcher": result.matcher.get("id")}


def run_method(spec: MethodSpec, seed: int, shared: Shared, config: CompareConfig, out_dir: Path) -> dict:
    """Build, train (probing safety on the way) and evaluate one method at one seed; returns its record."""
    from sails_fast.training.loop import train

    run = config.run
    out_dir.mkdir(parents=True, exist_ok=True)
    model, info = build_method_model(spec, seed, shared, run)
    probe_set = shared.data["test"][: config.probe_prompts]
    train_config = dataclasses.replace(
        run.sails.train,
        seed=seed,
        learning_rate=spec.learning_rate or run.sails.train.learning_rate,
        save_every=0,  # the comparison resumes per (method, seed), not mid-run
        progress=config.progress,
    )
    total = train_config.total_steps(len(shared.examples))
    curve = [(0, probe_safety(model, shared.tokenizer, probe_set, config))]

    def on_step(step: int, m: nn.Module) -> None:
        if step % config.probe_every == 0 or step == total:
            curve.append((step, probe_safety(m, shared.tokenizer, probe_set, config)))

    if (out_dir / "train").exists():
        shutil.rmtree(out_dir / "train")  # an interrupted run starts again from its init
    start = time.perf_counter()
    trained = train(
        model, shared.tokenizer, shared.examples, train_config, out_dir / "train", on_step=on_step
    )
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = _evaluate_model(model, shared, run, spec.name, out_dir)
    eval_s = time.perf_counter() - start
    if not config.keep_adapters:
        shutil.rmtree(trained.adapter_dir, ignore_errors=True)
    return {
        "method": spec.name,
        "kind": spec.kind,
        "seed": seed,
        **metrics,
        "steps_to_target": steps_to_target(curve, config.target_safety),
        "target_safety": config.target_safety,
        "steps": trained.steps,
        "final_loss": trained.final_loss,
        "learning_rate": train_config.learning_rate,
        "trainable_params": _trainable_params(model),
        "train_s": round(train_s, 1),
        "eval_s": round(eval_s, 1),
        "curve": curve,
        "init": info,
    }
