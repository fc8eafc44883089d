"""The run's configuration: `RunConfig` and its sections, `model` (ModelConfig), `sae` (SAEConfig),
`data` (DataConfig), `sails` (SailsConfig: the method's steps, collect / select / subspace / init / train,
each step's config living with its step) and `eval` (EvalConfig).

Every choice the paper leaves open is a field (../shared/METHOD.md). Each dataclass validates itself in
`__post_init__` (ValueError naming the field and the allowed values), round-trips through plain dicts with
`to_dict` / `from_dict` (unknown keys rejected) and through JSON or YAML files with `save` / `load`.

Layer convention: an SAE "layer l" reads the residual stream after decoder block l (HF
`output_hidden_states[l + 1]`, SAELens `blocks.l.hook_resid_post`). Class convention: see
`sails_fast.core.feature_stats`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sails_fast.core.config import ConfigBase as _ConfigBase
from sails_fast.core.config import read_config_file
from sails_fast.evaluation.config import EvalConfig
from sails_fast.lora_init.config import InitConfig
from sails_fast.models.config import ModelConfig
from sails_fast.pairs.config import CollectConfig
from sails_fast.pipeline.state import write_json_atomic
from sails_fast.selection.config import SelectConfig
from sails_fast.subspace.config import SubspaceConfig
from sails_fast.training.config import TrainConfig


@dataclass
class SailsConfig(_ConfigBase):
    """The whole pipeline's configuration: one section per step.

    Sections: `collect` (CollectConfig, step 3, from `sails_fast.pairs.config`), `select`, `subspace`,
    `init`, `train` (TrainConfig, step 7, from `sails_fast.training`). A missing section takes its
    defaults; unknown keys anywhere raise ValueError.

    Example:
        >>> cfg = SailsConfig.from_dict({"select": {"top_k": 32}, "subspace": {"rank": 8}})
        >>> cfg.save("sails.json"); SailsConfig.load("sails.json") == cfg
        True
    """

    collect: CollectConfig = field(default_factory=CollectConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    subspace: SubspaceConfig = field(default_factory=SubspaceConfig)
    init: InitConfig = field(default_factory=InitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        sections = (
            ("collect", CollectConfig),
            ("select", SelectConfig),
            ("subspace", SubspaceConfig),
            ("init", InitConfig),
            ("train", TrainConfig),
        )
        for name, cls in sections:
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls.from_dict(value))
            elif not isinstance(value, cls):
                raise ValueError(
                    f"SailsConfig.{name}: expected a {cls.__name__} or a dict, got {type(value).__name__}"
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
        allow_overlap: accept evaluated prompts that also appear in the training data (pairs, retain);
            by default such a run is refused, since its held-out numbers would not be held out.
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
    allow_overlap: bool = False

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
        if not isinstance(self.allow_overlap, bool):
            raise ValueError(f"DataConfig.allow_overlap: expected true or false, got {self.allow_overlap!r}")
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
        return cls.from_dict(read_config_file(path, "config: cannot read a run config"))

    def save(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.to_dict())
