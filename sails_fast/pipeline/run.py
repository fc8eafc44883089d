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
(data files, model and SAE folders: `sails_fast.core.digests`) and its upstream steps' fingerprints.
`run_state.json` (`sails_fast.pipeline.state`) records each finished step's fingerprint and the checksums
of the files it wrote. Before anything is written the run is checked: a step recorded with another config
is refused, naming the changed keys, unless `force=True`; a changed input recomputes what depends on it.
A reused step's files are verified; a missing one is recomputed, a damaged one named. `from_step`
recomputes a step and everything after it; training resumes a checkpoint only when it was made from the
same init, data and config.

Under torch.distributed (`torchrun ... sails-fast run`, `accelerate launch`) every rank runs this with the
same config: generation, statistics, training (DDP) and evaluation are split over the ranks; data, SAEs,
select, subspace and report are computed once by rank 0 and read by the others; only rank 0 writes, and
`run_state.json` records the world size that produced each step. See docs/distributed.md.
"""

from __future__ import annotations

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

from sails_fast.core import distributed
from sails_fast.models.loading import default_device, load_model, resolve_model_path
from sails_fast.pipeline.config import ModelConfig, RunConfig, SAEConfig
from sails_fast.pipeline.data import (
    RETAIN_FILE,
    check_no_leak,
    load_sources,
    read_retain,
    split_sources,
)
from sails_fast.pipeline.data import write_retain as write_retain
from sails_fast.pipeline.fingerprints import (
    STEP_DEPENDS,
    STEPS,
    _step_inputs,
    input_digests,
    step_configs,
    step_fingerprints,
)
from sails_fast.pipeline.state import RunState, flatten, write_json_atomic
from sails_fast.pipeline.training_model import (
    build_peft_model,
    load_trained_adapter,
    shards_training,
    whole_peft_model,
)
from sails_fast.pipeline.training_model import load_training_base as load_training_base

log = logging.getLogger(__name__)


CONFIG_FILE = "config.json"


# a training folder's record of what its checkpoints were made from
TRAIN_KEY_FILE = "run_key.json"


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


def load_saes(
    config: SAEConfig, model_config: ModelConfig, model, tokenizer, out_dir: Path | None = None
) -> dict[int, Any]:
    """{layer: SAEWeights}: loaded from specs, or trained once per layer with sae-lens and cached; where
    each came from is written to `out_dir/saes.json` when `out_dir` is given.

    Embedded SAEs for the embedded model use the trainer's own cached collection (default texts, bf16);
    for any other model they are trained on that model's activations.
    """
    from sails_fast.sae.weights import load_sae

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
        from sails_fast.sae_training.embedded import embedded_sae
        from sails_fast.sae_training.training import SAETrainingConfig

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


def _check_launcher(config: RunConfig) -> None:
    """`accelerate launch --use_fsdp` (or an accelerate config with FSDP) asks for FSDP, which the run takes
    from its own config: say so rather than train with DDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and config.sails.train.parallel != "fsdp":
        raise ValueError(
            "accelerate launch with FSDP (--use_fsdp or an accelerate config): sails-fast does not read "
            'accelerate\'s FSDP settings; set "sails": {"train": {"parallel": "fsdp"}} in the run config'
        )


def _check_enough_examples(data: dict) -> None:
    """Every rank needs a share of the training prompts; raised alike on every rank (same data)."""
    world = distributed.world_size()
    if world > 1 and len(data["train"]) < world:
        raise ValueError(
            f"data: {len(data['train'])} training prompts for {world} ranks; every rank needs at least one "
            f"(start at most {len(data['train'])} processes, or raise data.train_prompts)"
        )


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
    if until not in STEPS:
        raise ValueError(f"until: expected one of {STEPS}, got {until!r}")
    if from_step is not None and from_step not in STEPS:
        raise ValueError(f"from_step: expected one of {STEPS}, got {from_step!r}")
    out_dir = Path(out_dir)
    wanted = STEPS[: STEPS.index(until) + 1]
    if distributed.init_from_env():
        # ranks launched with different settings would compute different things: refuse on every rank
        settings = {"out_dir": str(out_dir), "until": until, "force": force, "from_step": from_step}
        distributed.check_same("the run's config", {**flatten(config.to_dict(), ""), **settings})

    _check_launcher(config)
    # everything is read and checked before anything is written
    sources = load_sources(config.data)
    data = split_sources(sources, config.data)
    check_no_leak(data, sources, config.data)
    _check_enough_examples(data)
    digests = input_digests(config, sources, judge)
    state = RunState(
        out_dir, steps=STEPS, depends=STEP_DEPENDS, configs=step_configs(config, judge),
        config_keys=step_fingerprints(config, judge=judge),
        fingerprints=step_fingerprints(config, digests, judge),
        inputs={s: _step_inputs(s, digests) for s in STEPS}, force=force, from_step=from_step,
        config_files={"train": ("train/train_config.json", "sails.train")},
    )  # fmt: skip

    def check_and_start():
        state.check(wanted, _previous_config(out_dir))
        _check_writable(out_dir)
        config.save(out_dir / CONFIG_FILE)
        state.start()

    distributed.on_main(check_and_start)
    run = _Run(config, out_dir, state, sources, data, judge)
    for name in wanted:
        getattr(run, f"{name}_step")()
    return run.result


class _Run:
    """One run's steps, in order: each computes its artifacts, or loads them when `state` says they are
    reusable, and keeps what later steps read (the model, pairs, SAEs, statistics, the PEFT model)."""

    def __init__(self, config: RunConfig, out_dir: Path, state: RunState, sources, data: dict, judge):
        self.config, self.out_dir, self.state = config, out_dir, state
        self.sources, self.data, self.judge = sources, data, judge
        self.result = RunResult(out_dir=out_dir)
        self.model = self.tokenizer = self.model_path = None
        self.pairs, self.retain, self.saes, self.stats, self.peft_model = [], [], {}, {}, None

    def step(
        self, name: str, compute: Callable[[], Any], load: Callable[[], Any], shared: bool = False
    ) -> Any:
        """load() when the step's recorded outputs are reusable, else compute() and record the step.

        Under torch.distributed rank 0 decides and records; with `shared` every rank takes part in compute()
        (split work and collectives; rank 0 writes), otherwise rank 0 computes and the others load() what
        it wrote."""
        state, result, outputs = self.state, self.result, _outputs(self.out_dir, name, self.config)
        main = distributed.is_main()
        # rank 0 checks the recorded files (a damaged one is an error on every rank) and decides for all
        if distributed.broadcast(distributed.on_main(lambda: state.reusable(name, outputs))):
            result.steps_reused.append(name)
            return load()
        if name in state.reasons:
            result.reasons[name] = state.reasons[name]
            log.warning("%s: recomputing (%s)", name, state.reasons[name])
        start = time.perf_counter()
        value = compute() if shared else distributed.on_main(compute)
        seconds = time.perf_counter() - start
        distributed.on_main(lambda: state.finish(name, _outputs(self.out_dir, name, self.config), seconds))
        if not shared and not main:
            value = load()
        # later steps' keys (generation caches, training checkpoints) read the recorded contents
        state.done = distributed.broadcast(state.done)
        result.steps_run.append(name)
        result.seconds[name] = round(seconds, 2)
        return value

    def data_step(self) -> None:
        ids = {k: [getattr(r, "id", None) for r in v] for k, v in self.data.items()}
        data_json = self.out_dir / "data.json"
        if data_json.is_file() and _read_json_or_none(data_json) not in (None, ids):
            # the splits are recomputed every run; a data.json that disagrees with them is stale
            self.state.reasons.setdefault("data", "the splits no longer match data.json")
        self.step("data", lambda: write_json_atomic(data_json, ids), lambda: None)

    def pairs_step(self) -> None:
        from sails_fast.data import build_refusal_pairs, read_pairs, write_pairs
        from sails_fast.pairs.generation import complete_pairs

        config, out_dir = self.config, self.out_dir
        self.model, self.tokenizer = load_model(config.model)
        self.model_path = resolve_model_path(config.model)

        def make_pairs():
            if self.sources.pairs is not None:
                pairs = list(self.sources.pairs)
            else:
                pairs = build_refusal_pairs(
                    self.data["train"], templates=config.data.refusal_templates, seed=config.data.seed
                )
            # generation caches let a killed run resume; they belong to one model, data and config
            caches = _generation_caches(out_dir, self.state.content_key("pairs"))
            pairs = complete_pairs(
                self.model, self.tokenizer, pairs, config.sails.collect, caches["unaligned"]
            )
            pairs = [p for p in pairs if p.unaligned is not None]
            if distributed.is_main():
                write_pairs(pairs, out_dir / "pairs.jsonl")
            retain = self.data["retain"]
            write_retain(self.model, self.tokenizer, retain, config.sails.collect, out_dir, caches["retain"])
            return pairs

        self.pairs = self.step("pairs", make_pairs, lambda: read_pairs(out_dir / "pairs.jsonl"), shared=True)
        self.retain = read_retain(out_dir)

    def saes_step(self) -> None:
        # SAEs are cached outside the run (embedded) or read from their specs, so loading is the step itself
        config, model, tokenizer = self.config, self.model, self.tokenizer
        self.saes = self.step(
            "saes",
            lambda: load_saes(config.sae, config.model, model, tokenizer, self.out_dir),
            lambda: load_saes(config.sae, config.model, model, tokenizer),
        )

    def stats_step(self) -> None:
        from sails_fast.core.feature_stats import FeatureStats
        from sails_fast.statistics.collect import collect_feature_stats

        config, stats_dir = self.config, self.out_dir / "stats"

        def make_stats():
            from sails_fast.report.token_map import build_token_map

            stats = collect_feature_stats(
                self.model, self.tokenizer, self.saes, self.pairs, config.sails.collect
            )
            if not distributed.is_main():
                return stats
            stats_dir.mkdir(exist_ok=True)
            for layer, s in stats.items():
                s.save(
                    stats_dir / f"layer_{layer}.safetensors",
                    {"layer": layer, "world_size": distributed.group_size()},
                )
            # maps FeatureStats' argmax token indices back to (pair, position), for the report's snippets
            token_map = build_token_map(self.tokenizer, self.pairs, config.sails.collect)
            token_map.save(stats_dir / "token_map.safetensors")
            return stats

        def load_stats():
            return {
                layer: FeatureStats.load(stats_dir / f"layer_{layer}.safetensors")
                for layer in config.sae.layers
            }

        self.stats = self.step("stats", make_stats, load_stats, shared=True)

    def select_step(self) -> None:
        from sails_fast.selection.select import FeatureSelection, select_features

        select_config, path = self.config.sails.select, self.out_dir / "selection"

        def make_selection():
            selection = select_features(self.stats, select_config)
            selection.save(path, config=select_config.to_dict())
            return selection

        self.result.selection = self.step("select", make_selection, lambda: FeatureSelection.load(path))

    def subspace_step(self) -> None:
        from sails_fast.subspace.subspace import Subspace, build_subspace

        subspace_config, path = self.config.sails.subspace, self.out_dir / "subspace"

        def make_subspace():
            subspace = build_subspace(self.saes, self.result.selection, subspace_config)
            subspace.save(path, config=subspace_config.to_dict())
            return subspace

        self.result.subspace = self.step("subspace", make_subspace, lambda: Subspace.load(path))

    def init_step(self) -> None:
        # the statistics model is not needed past this point; the training base is loaded on its own
        self.model = None
        self.peft_model = build_peft_model(
            self.config, self.model_path, self.result.subspace, self.out_dir, self.step
        )

    def train_step(self) -> None:
        train_dir = self.out_dir / "train"

        def make_train():
            from sails_fast.training.loop import train

            key, restart = self.state.content_key("train"), self.state.rerun("train")
            distributed.on_main(lambda: _clear_stale_training(train_dir, key, restart=restart))
            examples = [*self.pairs, *self.retain]
            return train(self.peft_model, self.tokenizer, examples, self.config.sails.train, train_dir)

        def load_train():
            if shards_training(self.config):  # the model is dropped below: eval loads its own
                return train_dir / "adapter"
            return load_trained_adapter(self.peft_model, train_dir / "adapter")

        self.result.train = self.step("train", make_train, load_train, shared=True)
        if shards_training(self.config):
            self.peft_model = None  # sharded by training (or, reused, in host memory): eval loads its own

    def eval_step(self) -> None:
        out_dir = self.out_dir

        def make_eval():
            for stale in out_dir.glob("eval_*.json") if distributed.is_main() else []:
                stale.unlink()
            peft_model = self.peft_model
            if peft_model is None:  # after sharded training: every rank evaluates a whole model
                peft_model = whole_peft_model(self.config, self.model_path, out_dir / "train" / "adapter")
            return _evaluate(
                peft_model, self.tokenizer, self.data, self.config, self.model_path, out_dir, self.judge
            )

        self.result.before, self.result.after = self.step(
            "eval", make_eval, lambda: _load_eval(out_dir), shared=True
        )

    def report_step(self) -> None:
        from sails_fast.report.html import report

        out_dir = self.out_dir

        def make_report():
            shutil.rmtree(out_dir / "report", ignore_errors=True)
            return report(out_dir, tokenizer=self.tokenizer)

        self.result.report_path = self.step("report", make_report, lambda: out_dir / "report" / "report.html")


def _read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _generation_caches(out_dir: Path, key: str) -> dict[str, Path]:
    """This key's cache files for the unaligned completions and the retain answers; any other key's
    (another model, data or config) are removed."""
    caches = {kind: out_dir / f"{kind}_cache.{key}.jsonl" for kind in ("unaligned", "retain")}
    for kind in caches if distributed.is_main() else ():
        for stale in out_dir.glob(f"{kind}_cache*.jsonl"):
            # the per-rank files of a distributed run (<name>.rank<r>.jsonl) belong to the key too
            if not stale.name.startswith(f"{kind}_cache.{key}."):
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


def _describe_base(model_config: ModelConfig, quantized: bool) -> dict[str, Any]:
    return {
        "model": model_config.path,
        "weights": "4-bit NF4 (bitsandbytes)" if quantized else "full precision",
        "compute_dtype": model_config.compute_dtype,
    }


def _evaluate(peft_model, tokenizer, data: dict, config: RunConfig, model_path: str, out_dir: Path, judge):
    """Before / after on the training base (and on the full-precision base with eval.bases "both");
    each result records its base in meta["base"]. Every rank evaluates its share; rank 0 writes."""
    from sails_fast.evaluation.results import compare
    from sails_fast.evaluation.run import evaluate_before_after

    sets = dict(harmful=data["test"], harmless=data["harmless_test"], safe_but_scary=data["safe_scary_test"])
    quantized = config.model.quantize == "nf4"
    before, after = evaluate_before_after(peft_model, tokenizer, **sets, config=config.eval, judge=judge)
    for r in (before, after):
        r.meta["base"] = _describe_base(config.model, quantized)
    full = None
    if config.eval.bases == "both" and quantized:
        full = _evaluate_full_base(config, model_path, tokenizer, sets, out_dir, judge)
    if distributed.is_main():
        before.save(out_dir / "eval_before.json")
        after.save(out_dir / "eval_after.json")
        table = [f"base: {before.meta['base']['weights']}", compare(before, after)]
        if full is not None:
            full[0].save(out_dir / "eval_before_full.json")
            full[1].save(out_dir / "eval_after_full.json")
            table += ["", "base: full precision (the same adapter)", compare(*full)]
        (out_dir / "eval_table.txt").write_text("\n".join(table) + "\n")
    return before, after


def _evaluate_full_base(config: RunConfig, model_path: str, tokenizer, sets: dict, out_dir: Path, judge):
    """The trained adapter on the full-precision base: (before, after)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sails_fast.evaluation.run import evaluate_before_after

    full = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, config.model.compute_dtype))
    full = PeftModel.from_pretrained(full.to(default_device()), str(out_dir / "train" / "adapter")).eval()
    results = evaluate_before_after(full, tokenizer, **sets, config=config.eval, judge=judge)
    for r in results:
        r.meta["base"] = _describe_base(config.model, False)
    return results


def _load_eval(out_dir: Path):
    from sails_fast.evaluation.results import EvalResult

    return EvalResult.load(out_dir / "eval_before.json"), EvalResult.load(out_dir / "eval_after.json")


def config_schema() -> dict[str, Any]:
    """The default RunConfig as a dict: a starting point for a user's config file."""
    return RunConfig().to_dict()
