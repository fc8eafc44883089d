"""Step fingerprints: each step's own config keys, the content digests of the outside inputs it reads,
chained with its upstream steps' fingerprints."""

from __future__ import annotations

from typing import Any

from sails_fast.core.digests import digest_path
from sails_fast.models.loading import resolve_model_path
from sails_fast.pipeline.config import RunConfig
from sails_fast.pipeline.data import (
    load_sources,
)
from sails_fast.pipeline.data import write_retain as write_retain
from sails_fast.pipeline.state import flatten, stable_hash


def digest_records(records) -> str:
    """Prompt records or pairs by content (any order)."""
    from sails_fast.data import fingerprint

    return f"records:{fingerprint(records)}"


STEPS = ("data", "pairs", "saes", "stats", "select", "subspace", "init", "train", "eval", "report")


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


# config keys that change no result beyond rounding: progress bars, backends, batch sizes of inference,
# resume, the loss chunk (summation order), how training is split over ranks
_RESULT_FREE = {
    "progress", "backend", "batch_size", "judge_batch_size", "resume", "loss_chunk_tokens", "parallel",
}  # fmt: skip
# training's batch size is its optimizer step's size (with grad_accum_steps): it changes the adapter
_TRAIN_RESULT_FREE = _RESULT_FREE - {"batch_size"}


def _own(
    section: dict, prefix: str, keys: tuple[str, ...] | None = None, free: set[str] = _RESULT_FREE
) -> dict[str, Any]:
    picked = {k: v for k, v in section.items() if k not in free and (keys is None or k in keys)}
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
        "train": _own(sails["train"], "sails.train", free=_TRAIN_RESULT_FREE),
        "eval": {**_own(c["eval"], "eval"), "judge": judge},
        "report": {},
    }


def input_digests(config: RunConfig, sources=None, judge: str | None = None) -> dict[str, str]:
    """{input name: content digest} of everything the run reads from outside its directory."""
    if sources is None:
        sources = load_sources(config.data)
    model_path = resolve_model_path(config.model)
    digests = {
        "data.harmful": digest_records(sources.harmful),
        "data.harmless": digest_records(sources.harmless),
        "data.safe_scary": digest_records(sources.safe_scary),
        "data.pairs": "none" if sources.pairs is None else digest_records(sources.pairs),
        "model": digest_path(model_path),
        "judge": "none" if judge is None else digest_path(judge),
    }
    for layer in config.sae.layers:
        spec = config.sae.specs.get(str(layer)) if config.sae.source == "specs" else None
        if spec is not None:
            from sails_fast.sae.weights import check_sae_spec

            try:
                check_sae_spec(spec)
            except ValueError as err:
                raise ValueError(f"sae.specs[{layer}]: {str(err).removeprefix('spec: ')}") from err
        digests[f"sae.{layer}"] = "embedded" if spec is None else digest_path(spec)
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
