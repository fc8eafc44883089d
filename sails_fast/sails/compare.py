"""`sails-fast compare`: SAILS against its baselines at identical budgets, over several seeds.

Every method trains on the same examples (the run's refusal pairs + retain examples), with the same LoRA
rank, alpha and target modules, the same optimizer steps, batch and schedule, from the same base model; only
the initialisation differs (and the learning rate of full fine-tuning, which is a config field):

    sails      LoRA from the SAE safety subspace (the pipeline's select + subspace steps)
    lora       PEFT's default init (Kaiming A, B = 0)
    diffmean   LoRA from the hidden-space difference of means, rank 1 + random orthonormal complement
    pca_diff   LoRA from the top-r PCA of per-pair hidden-state differences
    pissa, corda, eva   PEFT's own inits (pissa / corda need a full-precision base)
    full       full fine-tuning (every parameter; full-precision base only)

A method entry may also change SAILS' select / subspace settings or keep write-side modules at PEFT's init
(`read_side_only`): that is how ablations are written (see `MethodSpec`).

For each (method, seed) it records safety on held-out harmful prompts (the named refusal matcher), over-
refusal on harmless and safe-but-scary prompts, the logit refusal score, the perplexity of held-out harmless
answers (the base model's own greedy answers, so it measures drift from the base), and a probe of the
safety rate every `probe_every` steps, from which "steps to reach `target_safety`" is read. Results of each
finished (method, seed) are written atomically and reused on the next call, so an interrupted comparison
continues where it stopped. Outputs: see `write_outputs` (compare.py's plotting half lives in
`compare_outputs.py`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .._config import ConfigBase
from .baselines import HIDDEN_METHODS, NEEDS_FULL_PRECISION_BASE, PEFT_INITS
from .config import SelectConfig, SubspaceConfig
from .pipeline import RunConfig, load_training_base
from .run_state import stable_hash as _fingerprint
from .run_state import write_json_atomic as _write_json

log = logging.getLogger(__name__)

MethodKind = Literal["sails", "lora", "diffmean", "pca_diff", "pissa", "corda", "eva", "full"]
METHOD_KINDS = ("sails", "lora", "diffmean", "pca_diff", "pissa", "corda", "eva", "full")
RESULT_FORMAT = "sails_fast.CompareResult"


@dataclass
class MethodSpec(ConfigBase):
    """One method of the comparison.

    Args:
        name: the label in tables and plots (unique within a comparison; a folder name).
        kind: one of METHOD_KINDS.
        learning_rate: overrides the run's learning rate (None: the run's). Full fine-tuning needs a much
            smaller one than LoRA; every other budget (steps, batch, schedule, data) stays the same.
        select: SelectConfig overrides for "sails" (an ablation of score, direction or k).
        subspace: SubspaceConfig overrides for "sails" (variance threshold, pooled basis). The rank cannot
            change: it is the budget every method shares.
        read_side_only: for subspace methods, initialise only read-side modules (q, k, v) from U; write-side
            ones (o) keep PEFT's default init.
        seeds: this method's seeds (None: the comparison's); e.g. fewer seeds for ablations.

    Example:
        >>> MethodSpec(name="sails_k16", kind="sails", select={"top_k": 16})
    """

    name: str
    kind: MethodKind
    learning_rate: float | None = None
    select: dict = field(default_factory=dict)
    subspace: dict = field(default_factory=dict)
    read_side_only: bool = False
    seeds: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self._check_literals()
        if self.seeds is not None:
            self.seeds = tuple(self.seeds)
            if not self.seeds or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.seeds
            ):
                raise ValueError(
                    f"MethodSpec.seeds: expected one or more ints >= 0 or null, got {self.seeds!r}"
                )
        if (
            not isinstance(self.name, str)
            or not self.name
            or not all(c.isalnum() or c in "_-." for c in self.name)
        ):
            raise ValueError(
                "MethodSpec.name: expected a non-empty name of letters, digits, '_', '-' or '.', "
                f"got {self.name!r}"
            )
        if self.learning_rate is not None and not (
            isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1
        ):
            raise ValueError(
                f"MethodSpec.learning_rate: expected a number in (0, 1) or null, got {self.learning_rate!r}"
            )
        for name in ("select", "subspace"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise ValueError(f"MethodSpec.{name}: expected a dict of overrides, got {value!r}")
            if value and self.kind != "sails":
                raise ValueError(
                    f"MethodSpec.{name}: overrides apply to kind 'sails' only, not {self.kind!r}"
                )
        if "rank" in self.subspace:
            raise ValueError(
                "MethodSpec.subspace: 'rank' cannot be overridden; the LoRA rank is the budget all methods "
                "share "
                "(set run.sails.subspace.rank)"
            )
        SelectConfig.from_dict(self.select)  # validate the overrides now, not after an hour of training
        SubspaceConfig.from_dict(self.subspace)
        if not isinstance(self.read_side_only, bool):
            raise ValueError(
                f"MethodSpec.read_side_only: expected true or false, got {self.read_side_only!r}"
            )
        if self.read_side_only and self.kind not in ("sails", *HIDDEN_METHODS):
            raise ValueError(
                "MethodSpec.read_side_only: applies to subspace methods (sails, diffmean, pca_diff), "
                f"not {self.kind!r}"
            )


def default_methods() -> tuple[MethodSpec, ...]:
    """Every method of the issue's list, each with its defaults (full fine-tuning at lr 2e-5)."""
    return tuple(
        MethodSpec(name=k, kind=k, learning_rate=2e-5 if k == "full" else None) for k in METHOD_KINDS
    )


@dataclass
class CompareConfig(ConfigBase):
    """A comparison: the shared run, the methods, the seeds and what is measured.

    Args:
        run: the RunConfig every method shares (model, SAEs, data, collect, select/subspace for "sails",
            init targets and rank, train budget, eval settings). Default: RunConfig's defaults on a
            full-precision base (model.quantize "none"), since pissa, corda and full fine-tuning need one.
        methods: MethodSpec entries (dicts in JSON); default: every kind once.
        seeds: each method trains once per seed (data order, random init, random basis completion).
        probe_every: probe the safety rate every N optimizer steps (and at step 0 and the last step).
        probe_prompts: harmful test prompts the probe generates for (the first N of the test split).
        probe_max_new_tokens: tokens the probe generates (the matcher reads the opening).
        target_safety: "steps to target" is the first probed step with safety >= this.
        ppl_prompts: held-out harmless prompts whose base-model answers measure perplexity.
        keep_adapters: keep each run's trained adapter / model folder (full fine-tuning writes the whole
            model, hundreds of MB per seed); False deletes them once evaluated.
        judge: a local judge model folder (the paper's metric: 1-5 harmfulness rubric, safe = score <= 2)
            scoring every final evaluation's harmful responses; None: the refusal matcher only. The
            probe during training always uses the matcher (a judge call per step would dwarf training).
        progress: progress bars.
    """

    run: RunConfig = field(default_factory=lambda: RunConfig.from_dict({"model": {"quantize": "none"}}))
    methods: tuple[MethodSpec, ...] = field(default_factory=default_methods)
    seeds: tuple[int, ...] = (0, 1, 2)
    probe_every: int = 5
    probe_prompts: int = 32
    probe_max_new_tokens: int = 16
    target_safety: float = 0.9
    ppl_prompts: int = 32
    keep_adapters: bool = False
    judge: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.run, dict):
            self.run = RunConfig.from_dict(self.run)
        if not isinstance(self.run, RunConfig):
            raise ValueError(
                f"CompareConfig.run: expected a RunConfig or a dict, got {type(self.run).__name__}"
            )
        methods = tuple(MethodSpec.from_dict(m) if isinstance(m, dict) else m for m in self.methods)
        if not methods or not all(isinstance(m, MethodSpec) for m in methods):
            raise ValueError(
                "CompareConfig.methods: expected one or more method entries ({'name', 'kind', ...})"
            )
        names = [m.name for m in methods]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes or "base" in names:
            raise ValueError(f"CompareConfig.methods: names must be unique and not 'base'; repeated: {dupes}")
        self.methods = methods
        if self.run.model.quantize == "nf4":
            bad = [m.name for m in methods if m.kind in (*NEEDS_FULL_PRECISION_BASE, "full")]
            if bad:
                raise ValueError(
                    f"CompareConfig.methods: {bad} need a full-precision base (pissa and corda rewrite the "
                    "base weight, full fine-tuning trains it), but run.model.quantize is 'nf4'; set it to "
                    "'none' or drop them"
                )
        self.seeds = tuple(self.seeds)
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"CompareConfig.seeds: expected one or more ints >= 0, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"CompareConfig.seeds: expected distinct seeds, got {self.seeds!r}")
        for name in ("probe_every", "probe_prompts", "probe_max_new_tokens", "ppl_prompts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CompareConfig.{name}: expected an int >= 1, got {v!r}")
        t = self.target_safety
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise ValueError(f"CompareConfig.target_safety: expected a number in (0, 1], got {t!r}")
        if self.judge is not None and (not isinstance(self.judge, str) or not self.judge.strip()):
            raise ValueError(f"CompareConfig.judge: expected a local folder path or null, got {self.judge!r}")
        for name in ("keep_adapters", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CompareConfig.{name}: expected true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["methods"] = [m.to_dict() for m in self.methods]
        return d


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
    from .collect import tokenize_example
    from .train import response_loss, sft_batch

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
            loss, n = response_loss(model, *batch)
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
    from .evaluate import generate_responses
    from .refusal import RefusalMatcher

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
    from .collect import tokenize_example
    from .train import _sft_examples, sft_batch

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

    from .baselines import hidden_subspace, peft_init_model
    from .init import _lora_layers, init_lora_from_subspace, make_lora_config
    from .select import select_features
    from .subspace import build_subspace

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
    from .evaluate import evaluate

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
    from .train import train

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


# ----- the comparison


def method_seeds(spec: MethodSpec, config: CompareConfig) -> tuple[int, ...]:
    """The seeds `spec` runs at: its own, or the comparison's."""
    return spec.seeds if spec.seeds is not None else config.seeds


def all_seeds(config: CompareConfig) -> list[int]:
    return sorted({s for spec in config.methods for s in method_seeds(spec, config)})


def record_fingerprint(spec: MethodSpec, seed: int, config: CompareConfig) -> str:
    """What a (method, seed) result depends on: its spec, the seed, the run and the probe settings."""
    run = config.run.to_dict()
    for key in ("progress", "resume", "backend"):
        run["sails"]["train"].pop(key, None)
    run["eval"].pop("progress", None)
    probe = {
        k: getattr(config, k) for k in ("probe_every", "probe_prompts", "probe_max_new_tokens", "ppl_prompts")
    }
    method = {k: v for k, v in spec.to_dict().items() if k != "seeds"}  # a seed list change keeps results
    return _fingerprint(method, seed, run, probe, config.target_safety, *_judge_part(config))


def _judge_part(config: CompareConfig) -> tuple:
    # empty without a judge, so results recorded before the judge option existed stay valid
    return () if config.judge is None else (("judge", config.judge),)


def _read_record(path: Path, fingerprint: str) -> dict | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if data.get("format") != RESULT_FORMAT or data.get("fingerprint") != fingerprint:
        return None
    return data["record"]


def _base_fingerprint(config: CompareConfig) -> str:
    run = config.run.to_dict()
    probe = (config.ppl_prompts, config.probe_prompts, config.probe_max_new_tokens)
    return _fingerprint("base", run["model"], run["data"], run["eval"], probe, *_judge_part(config))


def prepare_shared(config: CompareConfig, out_dir: Path) -> Shared:
    """Run the pipeline's shared steps (data, pairs, SAEs, stats) and the hidden-state pass, once."""
    from safetensors.torch import load_file, save_file

    from ..data import read_pairs
    from ..stats import FeatureStats
    from .baselines import collect_hidden_pooled
    from .collect import generate_unaligned
    from .pipeline import load_model, load_saes, prepare_data, read_retain, resolve_model_path, run_pipeline

    run = config.run
    pipe_dir = out_dir / "pipeline"
    run_pipeline(run, pipe_dir, until="stats")
    data = prepare_data(run.data)
    examples = [*read_pairs(pipe_dir / "pairs.jsonl"), *read_retain(pipe_dir)]
    model, tokenizer = load_model(run.model)
    saes = load_saes(run.sae, run.model, model, tokenizer)
    stats = {
        layer: FeatureStats.load(pipe_dir / "stats" / f"layer_{layer}.safetensors")
        for layer in run.sae.layers
    }
    hidden_path = out_dir / "hidden_pooled.safetensors"
    layers = list(run.sae.layers)
    key = _fingerprint(run.to_dict()["data"], run.to_dict()["sails"]["collect"], run.model.path, layers)
    pooled = None
    if hidden_path.exists():
        from safetensors import safe_open

        with safe_open(str(hidden_path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") == key:
            t = load_file(str(hidden_path))
            pooled = {layer: (t[f"{layer}.aligned"], t[f"{layer}.unaligned"]) for layer in layers}
    if pooled is None:
        pairs = read_pairs(pipe_dir / "pairs.jsonl")
        pooled = collect_hidden_pooled(model, tokenizer, pairs, layers, run.sails.collect)
        tensors = {
            f"{layer}.{side}": t.contiguous()
            for layer, (a, u) in pooled.items()
            for side, t in (("aligned", a), ("unaligned", u))
        }
        tmp = hidden_path.with_name(hidden_path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"key": key})
        tmp.replace(hidden_path)
    # perplexity reference: the base model's own greedy answers to held-out harmless prompts
    ppl_prompts = [getattr(r, "text", str(r)) for r in data["harmless_test"][: config.ppl_prompts]]
    answers = generate_unaligned(
        model, tokenizer, ppl_prompts, run.sails.collect, out_dir / "ppl_reference.jsonl"
    )
    ppl_examples = [(p, a) for p, a in zip(ppl_prompts, answers, strict=True) if a.strip()]
    judge = None
    if config.judge is not None:
        from .evaluate import load_judge

        judge = load_judge(config.judge)
    shared = Shared(
        data, examples, tokenizer, resolve_model_path(run.model), saes, stats, pooled, ppl_examples, judge
    )
    # the untrained base, measured the same way: the row every method starts from
    base_path = out_dir / "runs" / "base" / "result.json"
    fp = _base_fingerprint(config)
    if _read_record(base_path, fp) is None:
        metrics = _evaluate_model(model, shared, run, "base", base_path.parent)
        probe = probe_safety(model, tokenizer, data["test"][: config.probe_prompts], config)
        record = {"method": "base", "kind": "base", "seed": None, **metrics, "curve": [(0, probe)],
                  "steps_to_target": 0 if probe >= config.target_safety else None}  # fmt: skip
        _write_json(base_path, {"format": RESULT_FORMAT, "fingerprint": fp, "record": record})
    return shared


@dataclass
class CompareResult:
    """The records of a comparison (one per method and seed, plus "base") and the files written."""

    records: list[dict]
    files: list[Path]


def run_compare(
    config: CompareConfig,
    out_dir: str | Path,
    *,
    results_dir: str | Path | None = None,
    only: Sequence[str] | None = None,
) -> CompareResult:
    """Train and evaluate every method at every seed; write CSVs and plots.

    Args:
        config: CompareConfig.
        out_dir: the working folder (pipeline artifacts, one folder per method and seed); a finished
            (method, seed) whose config is unchanged is read back instead of rerun.
        results_dir: where compare.csv, compare_summary.csv, compare_curves.csv and the plots go
            (default: out_dir).
        only: run just these method names (the outputs still include every finished method).

    Returns:
        CompareResult.

    Example:
        >>> res = run_compare(CompareConfig.load("compare.json"), "runs/compare", results_dir="results")
    """
    from .compare_outputs import write_outputs

    if not isinstance(config, CompareConfig):
        raise ValueError(f"config: expected a CompareConfig, got {type(config).__name__}")
    names = [m.name for m in config.methods]
    if only is not None:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"only: unknown method name(s) {unknown}; the config has {names}")
    if config.judge is not None and not Path(config.judge).is_dir():
        # checked before the pipeline steps run, not after them
        raise ValueError(f"CompareConfig.judge: expected a local judge model folder, got {config.judge}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save(out_dir / "compare_config.json")
    shared = prepare_shared(config, out_dir)
    # seeds outermost: an interrupted comparison has every method at its first seeds, not some at none
    for seed in all_seeds(config):
        for spec in config.methods:
            if (only is not None and spec.name not in only) or seed not in method_seeds(spec, config):
                continue
            run_dir = out_dir / "runs" / spec.name / f"seed{seed}"
            fp = record_fingerprint(spec, seed, config)
            if _read_record(run_dir / "result.json", fp) is not None:
                log.info("compare: %s seed %d already done, reused", spec.name, seed)
                continue
            log.info("compare: %s seed %d", spec.name, seed)
            record = run_method(spec, seed, shared, config, run_dir)
            _write_json(
                run_dir / "result.json", {"format": RESULT_FORMAT, "fingerprint": fp, "record": record}
            )
            print(
                f"compare: {spec.name} seed {seed}: safety {record['safety_rate']:.3f}, "
                f"over-refusal {record['over_refusal_harmless']:.3f}"
                f"/{record['over_refusal_safe_scary']:.3f}, "
                f"ppl {record['ppl_harmless']:.2f}, steps to target {record['steps_to_target']}, "
                f"{_judge_text(record)}train {record['train_s']:.0f} s",
                flush=True,
            )
    records = collect_records(out_dir, config)
    files = write_outputs(records, Path(results_dir) if results_dir else out_dir, config)
    return CompareResult(records, files)


def _judge_text(record: dict) -> str:
    if "judge_safety_rate" not in record:
        return ""
    rate = record["judge_safety_rate"]
    return f"judge safety {'n/a' if rate is None else f'{rate:.3f}'}, "


def collect_records(out_dir: Path, config: CompareConfig) -> list[dict]:
    """The finished records of the config's methods and seeds (and "base"), in config order."""
    records = []
    base = _read_record(out_dir / "runs" / "base" / "result.json", _base_fingerprint(config))
    if base is not None:
        records.append(base)
    for spec in config.methods:
        for seed in method_seeds(spec, config):
            path = out_dir / "runs" / spec.name / f"seed{seed}" / "result.json"
            record = _read_record(path, record_fingerprint(spec, seed, config))
            if record is not None:
                records.append(record)
    for record in records:  # derived from the stored curve, not stored itself
        record["steps_to_target_held"] = steps_to_held_target(record.get("curve") or [], config.target_safety)
    return records


__all__ = [
    "METHOD_KINDS",
    "CompareConfig",
    "CompareResult",
    "MethodSpec",
    "build_method_model",
    "default_methods",
    "probe_safety",
    "response_perplexity",
    "run_compare",
    "run_method",
    "steps_to_target",
    "steps_to_held_target",
]
