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

Under torchrun the shared steps run split over the ranks (as `sails-fast run` does), then the (method,
seed) cells still to do are dealt round-robin to the ranks, each cell trained and evaluated by one rank on
its own device; rank 0 writes the tables and plots once every cell is done.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sails_fast.core import distributed
from sails_fast.pipeline.state import flatten
from sails_fast.pipeline.state import stable_hash as _fingerprint
from sails_fast.pipeline.state import write_json_atomic as _write_json
from sails_fast.study.compare_config import RESULT_FORMAT, CompareConfig, MethodSpec
from sails_fast.study.compare_methods import (
    Shared,
    _evaluate_model,
    probe_safety,
    run_method,
    steps_to_held_target,
)

log = logging.getLogger(__name__)


# ----- the comparison


def method_seeds(spec: MethodSpec, config: CompareConfig) -> tuple[int, ...]:
    """The seeds `spec` runs at: its own, or the comparison's."""
    return spec.seeds if spec.seeds is not None else config.seeds


def all_seeds(config: CompareConfig) -> list[int]:
    return sorted({s for spec in config.methods for s in method_seeds(spec, config)})


def record_fingerprint(spec: MethodSpec, seed: int, config: CompareConfig) -> str:
    """What a (method, seed) result depends on: its spec, the seed, the run and the probe settings."""
    run = config.run.to_dict()
    for key in ("progress", "resume", "backend", "loss_chunk_tokens"):  # change no result
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

    from sails_fast.core.feature_stats import FeatureStats
    from sails_fast.data import read_pairs
    from sails_fast.models.loading import load_model, resolve_model_path
    from sails_fast.pairs.generation import generate_unaligned
    from sails_fast.pipeline.data import prepare_data, read_retain
    from sails_fast.pipeline.run import load_saes, run_pipeline
    from sails_fast.study.baselines import collect_hidden_pooled

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

    def read_pooled():
        if not hidden_path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(hidden_path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != key:
            return None
        t = load_file(str(hidden_path))
        return {layer: (t[f"{layer}.aligned"], t[f"{layer}.unaligned"]) for layer in layers}

    def write_pooled():
        if read_pooled() is not None:
            return
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

    # the hidden-state pass runs once (rank 0); every rank reads its file
    distributed.on_main(write_pooled)
    pooled = read_pooled()
    # perplexity reference: the base model's own greedy answers to held-out harmless prompts
    ppl_prompts = [getattr(r, "text", str(r)) for r in data["harmless_test"][: config.ppl_prompts]]
    answers = generate_unaligned(
        model, tokenizer, ppl_prompts, run.sails.collect, out_dir / "ppl_reference.jsonl"
    )
    ppl_examples = [(p, a) for p, a in zip(ppl_prompts, answers, strict=True) if a.strip()]
    judge = None
    if config.judge is not None:
        from sails_fast.evaluation.judge import load_judge

        judge = load_judge(config.judge)
    shared = Shared(
        data, examples, tokenizer, resolve_model_path(run.model), saes, stats, pooled, ppl_examples, judge
    )
    # the untrained base, measured the same way: the row every method starts from (by rank 0)
    distributed.on_main(lambda: _measure_base(model, shared, config, out_dir))
    return shared


def _measure_base(model, shared: Shared, config: CompareConfig, out_dir: Path) -> None:
    run, data, tokenizer = config.run, shared.data, shared.tokenizer
    base_path = out_dir / "runs" / "base" / "result.json"
    fp = _base_fingerprint(config)
    if _read_record(base_path, fp) is None:
        metrics = _evaluate_model(model, shared, run, "base", base_path.parent)
        probe = probe_safety(model, tokenizer, data["test"][: config.probe_prompts], config)
        record = {"method": "base", "kind": "base", "seed": None, **metrics, "curve": [(0, probe)],
                  "steps_to_target": 0 if probe >= config.target_safety else None}  # fmt: skip
        _write_json(base_path, {"format": RESULT_FORMAT, "fingerprint": fp, "record": record})


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
    from sails_fast.study.compare_outputs import write_outputs

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
    if distributed.init_from_env():
        settings = {**flatten(config.to_dict(), ""), "out_dir": str(out_dir), "only": only}
        distributed.check_same("the comparison's config", settings)

    def start():
        out_dir.mkdir(parents=True, exist_ok=True)
        config.save(out_dir / "compare_config.json")

    distributed.on_main(start)
    shared = prepare_shared(config, out_dir)
    # rank 0 decides what is left, the ranks take turns; each cell runs on one rank alone
    todo = distributed.broadcast(_cells_to_run(config, out_dir, only) if distributed.is_main() else None)
    mine = todo[distributed.rank() :: distributed.world_size()]
    with distributed.local_only():
        for spec, seed in mine:
            _run_cell(spec, seed, shared, config, out_dir)
    # cells take as long as training does: this wait has no collective timeout
    distributed.barrier(long=True)
    records = collect_records(out_dir, config)
    files = (
        write_outputs(records, Path(results_dir) if results_dir else out_dir, config)
        if distributed.is_main()
        else []
    )
    return CompareResult(records, files)


def _cells_to_run(
    config: CompareConfig, out_dir: Path, only: Sequence[str] | None
) -> list[tuple[MethodSpec, int]]:
    """The (method, seed) cells without a result for today's config, seeds outermost (an interrupted
    comparison has every method at its first seeds, not some at none)."""
    todo = []
    for seed in all_seeds(config):
        for spec in config.methods:
            if (only is not None and spec.name not in only) or seed not in method_seeds(spec, config):
                continue
            run_dir = out_dir / "runs" / spec.name / f"seed{seed}"
            if _read_record(run_dir / "result.json", record_fingerprint(spec, seed, config)) is not None:
                log.info("compare: %s seed %d already done, reused", spec.name, seed)
                continue
            todo.append((spec, seed))
    return todo


def _run_cell(spec: MethodSpec, seed: int, shared: Shared, config: CompareConfig, out_dir: Path) -> None:
    """Train and evaluate one (method, seed); its result.json is written atomically when it is done."""
    run_dir = out_dir / "runs" / spec.name / f"seed{seed}"
    fp = record_fingerprint(spec, seed, config)
    log.info("compare: %s seed %d", spec.name, seed)
    record = run_method(spec, seed, shared, config, run_dir)
    _write_json(run_dir / "result.json", {"format": RESULT_FORMAT, "fingerprint": fp, "record": record})
    where = f"[{distributed.describe()}] " if distributed.describe() else ""
    print(
        f"{where}compare: {spec.name} seed {seed}: safety {record['safety_rate']:.3f}, "
        f"over-refusal {record['over_refusal_harmless']:.3f}"
        f"/{record['over_refusal_safe_scary']:.3f}, "
        f"ppl {record['ppl_harmless']:.2f}, steps to target {record['steps_to_target']}, "
        f"{_judge_text(record)}train {record['train_s']:.0f} s",
        flush=True,
    )


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
