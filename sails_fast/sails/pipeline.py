"""The SAILS pipeline end to end, with every step's artifact on disk and reused when nothing it depends
on has changed.

Steps (METHOD.md), each writing into the run directory:

    data      data.json                      prompt ids of every split (the test split is never trained on)
    pairs     pairs.jsonl, retain.jsonl      contrastive pairs (unaligned side generated once,
                                             unaligned_cache.<key>.jsonl) and the retain examples
    saes      saes.json                      where each layer's SAE came from
    stats     stats/layer_<l>.safetensors    FeatureStats per SAE layer (+ token_map.safetensors)
    select    selection.safetensors (+json)  FeatureSelection
    subspace  subspace.safetensors (+json)   Subspace (orthonormal bases)
    init      init.json                      which LoRA module got which basis
    train     train/                         checkpoints, train_log.jsonl, adapter/ (standard PEFT)
    eval      eval_before.json, eval_after.json (+ _full with eval.bases "both"), eval_table.txt
    report    report/                        report.html + PNG plots

Each step has a fingerprint: its own config keys, the content digests of the outside inputs it reads
(data files, model and SAE folders: `sails_fast.sails.inputs`) and its upstream steps' fingerprints.
`run_state.json` (`sails_fast.sails.run_state`) records each finished step's fingerprint and the checksums
of the files it wrote. Before anything is written the run is checked: a step recorded with another config
is refused, naming the changed keys, unless `force=True`; a changed input recomputes what depends on it.
A reused step's files are verified; a missing one is recomputed, a damaged one named. `from_step`
recomputes a step and everything after it; training resumes a checkpoint only when it was made from the
same init, data and config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import inputs as run_inputs
from .run_config import DataConfig, ModelConfig, RunConfig, SAEConfig
from .run_data import RETAIN_FILE, check_no_leak, load_sources, prepare_data, read_retain, split_sources
from .run_data import write_retain as write_retain
from .run_state import STATE_FILE, RunState, flatten, stable_hash, write_json_atomic

log = logging.getLogger(__name__)

STEPS = ("data", "pairs", "saes", "stats", "select", "subspace", "init", "train", "eval", "report")
CONFIG_FILE = "config.json"
# a training folder's record of what its checkpoints were made from
TRAIN_KEY_FILE = "run_key.json"

# the steps whose artifacts each step reads (its fingerprint chains theirs)
STEP_DEPENDS: dict[str, tuple[str, ...]] = {
    "data": (),
    "pairs": ("data",),
    "saes": (),
    "stats": ("pairs", "saes"),
    "select": ("stats",),
    "subspace": ("select", "saes"),
    "init": ("subspace",),
    "train": ("init", "pairs"),
    "eval": ("train", "data"),
    "report": ("eval", "stats", "select", "subspace"),
}
# the outside inputs each step reads itself (upstream ones come through the chain)
STEP_INPUTS: dict[str, tuple[str, ...]] = {
    "data": ("data.harmful", "data.harmless", "data.safe_scary", "data.pairs"),
    "pairs": ("model",),
    "saes": ("model", "sae"),
    "init": ("model",),
    "eval": ("judge",),
}
# config keys that change no result: progress bars, backends, batch sizes, resume
_RESULT_FREE = {"progress", "backend", "batch_size", "judge_batch_size", "resume"}


def _own(section: dict, prefix: str, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    picked = {k: v for k, v in section.items() if k not in _RESULT_FREE and (keys is None or k in keys)}
    return flatten(picked, prefix)


def step_configs(config: RunConfig, judge: str | None = None) -> dict[str, dict[str, Any]]:
    """Each step's own config keys, flattened ("sails.select.top_k": 8): what its fingerprint covers."""
    c = config.to_dict()
    sails, model = c["sails"], c["model"]
    reading_model = _own(model, "model", ("path", "compute_dtype"))
    return {
        "data": _own(c["data"], "data"),
        "pairs": {
            **reading_model,
            **_own(sails["collect"], "sails.collect", ("max_new_tokens", "chat_template")),
        },
        "saes": {**reading_model, **_own(c["sae"], "sae")},
        "stats": _own(sails["collect"], "sails.collect"),
        "select": _own(sails["select"], "sails.select"),
        "subspace": _own(sails["subspace"], "sails.subspace"),
        "init": {**_own(model, "model"), **_own(sails["init"], "sails.init")},
        "train": _own(sails["train"], "sails.train"),
        "eval": {**_own(c["eval"], "eval"), "judge": judge},
        "report": {},
    }


def input_digests(config: RunConfig, sources=None, judge: str | None = None) -> dict[str, str]:
    """{input name: content digest} of everything the run reads from outside its directory."""
    if sources is None:
        sources = load_sources(config.data)
    model_path = resolve_model_path(config.model)
    digests = {
        "data.harmful": run_inputs.digest_records(sources.harmful),
        "data.harmless": run_inputs.digest_records(sources.harmless),
        "data.safe_scary": run_inputs.digest_records(sources.safe_scary),
        "data.pairs": "none" if sources.pairs is None else run_inputs.digest_records(sources.pairs),
        "model": run_inputs.digest_path(model_path),
        "judge": "none" if judge is None else run_inputs.digest_path(judge),
    }
    for layer in config.sae.layers:
        spec = config.sae.specs.get(str(layer)) if config.sae.source == "specs" else None
        if spec is not None:
            from ..sae import check_sae_spec

            try:
                check_sae_spec(spec)
            except ValueError as err:
                raise ValueError(f"sae.specs[{layer}]: {str(err).removeprefix('spec: ')}") from err
        digests[f"sae.{layer}"] = "embedded" if spec is None else run_inputs.digest_path(spec)
    return digests


def _step_inputs(step: str, digests: dict[str, str] | None) -> dict[str, str]:
    """The inputs `step` reads itself, with their digests (or "by path" when digests are not taken)."""
    wanted = STEP_INPUTS.get(step, ())
    if digests is None:
        return {}
    return {k: v for k, v in sorted(digests.items()) if k in wanted or k.split(".")[0] in wanted}


def step_fingerprints(
    config: RunConfig, digests: dict[str, str] | None = None, judge: str | None = None
) -> dict[str, str]:
    """Fingerprint of every step: its own config keys and input digests, chained with its upstream
    steps' fingerprints. Without `digests` the inputs count by their config paths only (the config key)."""
    configs = step_configs(config, judge)
    fp: dict[str, str] = {}
    for step in STEPS:
        fp[step] = stable_hash(
            step, configs[step], _step_inputs(step, digests), [fp[d] for d in STEP_DEPENDS[step]]
        )
    return fp


@dataclass
class RunResult:
    """What `run_pipeline` produced (objects for the steps it ran or loaded), and why steps ran again."""

    out_dir: Path
    steps_run: list[str] = field(default_factory=list)
    steps_reused: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    selection: Any = None
    subspace: Any = None
    train: Any = None
    before: Any = None
    after: Any = None
    report_path: Path | None = None


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _looks_local(path: str) -> bool:
    # a hub id is "name" or "org/name"; anything else that does not exist was meant as a local path
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def resolve_model_path(config: ModelConfig) -> str:
    """A local folder or hub id transformers can load: "embedded" and a .gguf file are converted once
    into a cached folder. ValueError naming model.path for a path that cannot be a model."""
    if config.path == "embedded":
        from ..embedded import embedded_model_path

        return str(embedded_model_path())
    path = Path(config.path).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            from ..embedded import gguf_model_path

            return str(gguf_model_path(path))
        raise ValueError(
            f"model.path: {config.path} is a file; expected a model folder, a .gguf file, 'embedded' "
            "or a hub id"
        )
    if path.is_dir():
        return str(path)
    if _looks_local(config.path):
        raise ValueError(
            f"model.path: {config.path} does not exist (expected a model folder or a .gguf file)"
        )
    return config.path


def _from_pretrained(loader, path: str, **kwargs):
    """loader.from_pretrained with an OSError (no such folder, a hub id that is not cached offline)
    turned into one line naming model.path."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"model.path: cannot load {path!r} ({first}); give a local model folder, a .gguf file or "
            "'embedded' (runs are offline: a hub id loads only from the local hub cache)"
        ) from err


def load_model(config: ModelConfig):
    """(model, tokenizer) in full precision, eval mode, for generation and statistics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(config)
    tokenizer = _from_pretrained(AutoTokenizer, path)
    model = _from_pretrained(AutoModelForCausalLM, path, dtype=getattr(torch, config.compute_dtype))
    return model.to(_device()).eval(), tokenizer


def load_saes(
    config: SAEConfig, model_config: ModelConfig, model, tokenizer, out_dir: Path | None = None
) -> dict[int, Any]:
    """{layer: SAEWeights}: loaded from specs, or trained once per layer with sae-lens and cached; where
    each came from is written to `out_dir/saes.json` when `out_dir` is given.

    Embedded SAEs for the embedded model use the trainer's own cached collection (default texts, bf16);
    for any other model they are trained on that model's activations.
    """
    from ..sae import load_sae

    saes, provenance = {}, {}
    for layer in config.layers:
        if config.source == "specs":
            spec = config.specs[str(layer)]
            try:
                saes[layer] = load_sae(spec)
            except ValueError as err:
                raise ValueError(f"sae.specs[{layer}]: {str(err).removeprefix('spec: ')}") from err
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
    if out_dir is not None:
        write_json_atomic(out_dir / "saes.json", provenance)
    return saes


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"out_dir: cannot write to {out_dir} ({err.strerror or err})") from err


def _previous_config(out_dir: Path) -> dict[str, Any] | None:
    try:
        return flatten(json.loads((out_dir / CONFIG_FILE).read_text()), "")
    except (OSError, ValueError):
        return None


def _outputs(out_dir: Path, step: str, config: RunConfig) -> list[Path]:
    """The files `step` writes (for a folder: the files in it now)."""
    o = out_dir
    files = lambda folder: sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    fixed = {
        "data": [o / "data.json"],
        "pairs": [o / "pairs.jsonl", o / RETAIN_FILE],
        "saes": [o / "saes.json"],
        "stats": [
            *(o / "stats" / f"layer_{layer}.safetensors" for layer in config.sae.layers),
            o / "stats" / "token_map.safetensors",
        ],  # fmt: skip
        "select": [o / "selection.safetensors", o / "selection.json"],
        "subspace": [o / "subspace.safetensors", o / "subspace.json"],
        "init": [o / "init.json"],
        "train": files(o / "train" / "adapter"),
        "eval": sorted(o.glob("eval_*.json")) + [o / "eval_table.txt"],
        "report": files(o / "report"),
    }
    return fixed[step]


def run_pipeline(
    config: RunConfig,
    out_dir: str | Path,
    *,
    until: str = "report",
    force: bool = False,
    judge: str | None = None,
    from_step: str | None = None,
) -> RunResult:
    """Run the SAILS steps in order up to `until`, reusing every step whose inputs and config are unchanged.

    Args:
        config: the run's RunConfig (written to `out_dir/config.json` once the checks pass).
        out_dir: the run directory (created).
        until: the last step to run, one of STEPS.
        force: recompute steps recorded with another configuration, and steps whose files are damaged,
            instead of raising ValueError.
        judge: optional local judge model folder for the evaluation (1-5 harmfulness rubric).
        from_step: recompute this step and every later one (training starts over), whatever is recorded.
    Returns:
        RunResult (`reasons`: why each recomputed step ran again).

    Example:
        >>> cfg = RunConfig.from_dict({"sails": {"train": {"max_steps": 50}}})
        >>> res = run_pipeline(cfg, "runs/smollm2")
    """
    from ..data import build_refusal_pairs, read_pairs, write_pairs
    from ..stats import FeatureStats
    from .collect import collect_feature_stats, complete_pairs
    from .select import FeatureSelection, select_features
    from .subspace import Subspace, build_subspace

    if until not in STEPS:
        raise ValueError(f"until: expected one of {STEPS}, got {until!r}")
    if from_step is not None and from_step not in STEPS:
        raise ValueError(f"from_step: expected one of {STEPS}, got {from_step!r}")
    out_dir = Path(out_dir)
    wanted = STEPS[: STEPS.index(until) + 1]

    # everything is read and checked before anything is written
    sources = load_sources(config.data)
    data = split_sources(sources, config.data)
    check_no_leak(data, sources, config.data)
    digests = input_digests(config, sources, judge)
    state = RunState(
        out_dir, steps=STEPS, depends=STEP_DEPENDS, configs=step_configs(config, judge),
        config_keys=step_fingerprints(config, judge=judge),
        fingerprints=step_fingerprints(config, digests, judge),
        inputs={s: _step_inputs(s, digests) for s in STEPS}, force=force, from_step=from_step,
    )  # fmt: skip
    state.check(wanted, _previous_config(out_dir))
    _check_writable(out_dir)
    config.save(out_dir / CONFIG_FILE)
    result = RunResult(out_dir=out_dir)

    def step(name: str, compute: Callable[[], Any], load: Callable[[], Any]) -> Any:
        if state.reusable(name, _outputs(out_dir, name, config)):
            result.steps_reused.append(name)
            return load()
        if name in state.reasons:
            result.reasons[name] = state.reasons[name]
            log.warning("%s: recomputing (%s)", name, state.reasons[name])
        start = time.perf_counter()
        value = compute()
        seconds = time.perf_counter() - start
        state.finish(name, _outputs(out_dir, name, config), seconds)
        result.steps_run.append(name)
        result.seconds[name] = round(seconds, 2)
        return value

    ids = {k: [getattr(r, "id", None) for r in v] for k, v in data.items()}
    data_json = out_dir / "data.json"
    if data_json.is_file() and _read_json_or_none(data_json) not in (None, ids):
        # the splits are recomputed every run; a data.json that disagrees with them is stale
        state.reasons.setdefault("data", "the splits no longer match data.json")
    step("data", lambda: write_json_atomic(data_json, ids), lambda: None)
    if "pairs" not in wanted:
        return result

    model, tokenizer = load_model(config.model)
    model_path = resolve_model_path(config.model)

    def make_pairs():
        if sources.pairs is not None:
            pairs = list(sources.pairs)
        else:
            pairs = build_refusal_pairs(
                data["train"], templates=config.data.refusal_templates, seed=config.data.seed
            )
        # generation caches let a killed run resume; they belong to one model, data and config
        caches = _generation_caches(out_dir, state.content_key("pairs"))
        pairs = complete_pairs(model, tokenizer, pairs, config.sails.collect, caches["unaligned"])
        pairs = [p for p in pairs if p.unaligned is not None]
        write_pairs(pairs, out_dir / "pairs.jsonl")
        write_retain(model, tokenizer, data["retain"], config.sails.collect, out_dir, caches["retain"])
        return pairs

    pairs = step("pairs", make_pairs, lambda: read_pairs(out_dir / "pairs.jsonl"))
    retain = read_retain(out_dir)
    if "saes" not in wanted:
        return result

    # SAEs are cached outside the run (embedded) or read from their specs, so loading is the step itself
    saes = step(
        "saes",
        lambda: load_saes(config.sae, config.model, model, tokenizer, out_dir),
        lambda: load_saes(config.sae, config.model, model, tokenizer),
    )
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
    peft_model = _build_peft_model(config, model_path, result.subspace, out_dir, step)
    if "train" not in wanted:
        return result

    def make_train():
        from .train import train

        _clear_stale_training(out_dir / "train", state.content_key("train"), restart=state.rerun("train"))
        return train(peft_model, tokenizer, [*pairs, *retain], config.sails.train, out_dir / "train")

    result.train = step(
        "train", make_train, lambda: _load_trained_adapter(peft_model, out_dir / "train" / "adapter")
    )
    if "eval" not in wanted:
        return result

    def make_eval():
        for stale in out_dir.glob("eval_*.json"):
            stale.unlink()
        return _evaluate(peft_model, tokenizer, data, config, model_path, out_dir, judge)

    result.before, result.after = step("eval", make_eval, lambda: _load_eval(out_dir))
    if "report" not in wanted:
        return result

    from .report import report

    def make_report():
        shutil.rmtree(out_dir / "report", ignore_errors=True)
        return report(out_dir, tokenizer=tokenizer)

    result.report_path = step("report", make_report, lambda: out_dir / "report" / "report.html")
    return result


def _read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _generation_caches(out_dir: Path, key: str) -> dict[str, Path]:
    """This key's cache files for the unaligned completions and the retain answers; any other key's
    (another model, data or config) are removed."""
    caches = {kind: out_dir / f"{kind}_cache.{key}.jsonl" for kind in ("unaligned", "retain")}
    for kind, keep in caches.items():
        for stale in out_dir.glob(f"{kind}_cache*.jsonl"):
            if stale != keep:
                stale.unlink()
    return caches


def _clear_stale_training(train_dir: Path, key: str, restart: bool) -> None:
    """Keep `train_dir`'s checkpoints only when they were made from today's init, data and train config
    (so an interrupted run resumes); otherwise remove them, so training starts over."""
    key_file = train_dir / TRAIN_KEY_FILE
    recorded = _read_json_or_none(key_file)
    if train_dir.exists() and (restart or recorded != {"key": key}):
        log.warning("train: %s holds training from another init, data or config; starting over", train_dir)
        shutil.rmtree(train_dir)
    write_json_atomic(key_file, {"key": key})


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


def _build_peft_model(config: RunConfig, model_path: str, subspace, out_dir: Path, step) -> Any:
    """The training model: base (4-bit NF4 or full precision) + LoRA initialised from the subspace.

    The init is deterministic and cheap: applied on every run, and recorded (init.json) as a step."""
    from peft import get_peft_model

    from .init import init_lora_from_subspace, make_lora_config

    base = load_training_base(config, model_path)
    lora_config = make_lora_config(config.sails.init, rank=config.sails.subspace.rank)
    peft_model = get_peft_model(base, lora_config)

    def make_init():
        report = init_lora_from_subspace(peft_model, subspace, config.sails.init)
        write_json_atomic(out_dir / "init.json", dataclasses.asdict(report))
        return report

    step("init", make_init, lambda: init_lora_from_subspace(peft_model, subspace, config.sails.init))
    return peft_model


def _load_trained_adapter(peft_model, adapter_dir: Path):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    return adapter_dir


def _describe_base(model_config: ModelConfig, quantized: bool) -> dict[str, Any]:
    return {
        "model": model_config.path,
        "weights": "4-bit NF4 (bitsandbytes)" if quantized else "full precision",
        "compute_dtype": model_config.compute_dtype,
    }


def _evaluate(peft_model, tokenizer, data: dict, config: RunConfig, model_path: str, out_dir: Path, judge):
    """Before / after on the training base (and on the full-precision base with eval.bases "both");
    each result records its base in meta["base"]."""
    from .evaluate import compare, evaluate_before_after

    sets = dict(harmful=data["test"], harmless=data["harmless_test"], safe_but_scary=data["safe_scary_test"])
    quantized = config.model.quantize == "nf4"
    before, after = evaluate_before_after(peft_model, tokenizer, **sets, config=config.eval, judge=judge)
    for r in (before, after):
        r.meta["base"] = _describe_base(config.model, quantized)
    before.save(out_dir / "eval_before.json")
    after.save(out_dir / "eval_after.json")
    table = [f"base: {before.meta['base']['weights']}", compare(before, after)]
    if config.eval.bases == "both" and quantized:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        full = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, config.model.compute_dtype)
        )
        full = PeftModel.from_pretrained(full.to(_device()), str(out_dir / "train" / "adapter")).eval()
        full_before, full_after = evaluate_before_after(
            full, tokenizer, **sets, config=config.eval, judge=judge
        )
        for r in (full_before, full_after):
            r.meta["base"] = _describe_base(config.model, False)
        full_before.save(out_dir / "eval_before_full.json")
        full_after.save(out_dir / "eval_after_full.json")
        table += ["", "base: full precision (the same adapter)", compare(full_before, full_after)]
    (out_dir / "eval_table.txt").write_text("\n".join(table) + "\n")
    return before, after


def _load_eval(out_dir: Path):
    from .evaluate import EvalResult

    return EvalResult.load(out_dir / "eval_before.json"), EvalResult.load(out_dir / "eval_after.json")


def config_schema() -> dict[str, Any]:
    """The default RunConfig as a dict: a starting point for a user's config file."""
    return RunConfig().to_dict()


__all__ = [
    "CONFIG_FILE",
    "STATE_FILE",
    "STEPS",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "RunResult",
    "SAEConfig",
    "config_schema",
    "load_model",
    "prepare_data",
    "read_retain",
    "run_pipeline",
    "step_fingerprints",
]
