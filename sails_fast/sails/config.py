"""Validated configuration for the SAILS pipeline steps (select, subspace, init).

Every choice the paper leaves open is a field here (../shared/METHOD.md). Each dataclass validates itself in
`__post_init__` (ValueError naming the field and the allowed values), round-trips through plain dicts with
`to_dict` / `from_dict` (unknown keys rejected) and through JSON files with `save` / `load`.

Class convention for every [C, F] statistic in the pipeline: row `ALIGNED` (0) is the aligned data
(harmful prompt + refusal), row `UNALIGNED` (1) the unaligned data (harmful prompt + compliance).

Layer convention: an SAE "layer l" reads the residual stream after decoder block l (HF
`output_hidden_states[l + 1]`, SAELens `blocks.l.hook_resid_post`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .._config import ConfigBase as _ConfigBase
from .collect import CollectConfig
from .train import TrainConfig

ALIGNED = 0
UNALIGNED = 1
NUM_CLASSES = 2
CLASS_NAMES = ("aligned", "unaligned")

ScoreName = Literal["mean_diff", "relative", "abs_diff", "t_stat"]
Direction = Literal["both", "aligned", "unaligned"]
WriteSideA = Literal["zeros", "small_random"]
BasisRule = Literal["nearest", "preceding"]
DimMismatch = Literal["error", "skip"]

DEFAULT_READ_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
DEFAULT_WRITE_MODULES = ("o_proj", "down_proj")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_names(owner: str, name: str, value: Any, allow_empty: bool = False) -> None:
    if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{owner}.{name}: expected a list of non-empty module names, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"{owner}.{name}: expected at least one module name, got none")


@dataclass
class SelectConfig(_ConfigBase):
    """How SAE features are scored and kept (METHOD.md step 3).

    Fields:
        score: "mean_diff" D = E_aligned[a] - E_unaligned[a]; "relative" (paper v1)
            D / max(E_unaligned[a], eps); "abs_diff" |D|; "t_stat" Welch's t from class means and variances.
        direction: which features count as separating. "both": rank by |score| (aligned-firing and
            unaligned-firing features); "aligned": rank by score, largest first (features firing more on
            aligned data); "unaligned": rank by -score. "abs_diff" carries no sign, so it needs "both".
        top_k: features kept per layer.
        eps: floor on the denominator of "relative" and on the standard error of "t_stat".

    Example:
        >>> SelectConfig(score="t_stat", top_k=32).to_dict()["top_k"]
        32
    """

    score: ScoreName = "mean_diff"
    direction: Direction = "both"
    top_k: int = 64
    eps: float = 1e-6

    def __post_init__(self) -> None:
        self._check_literals()
        if not _is_int(self.top_k) or self.top_k < 1:
            raise ValueError(f"SelectConfig.top_k: expected an integer >= 1, got {self.top_k!r}")
        if not _is_number(self.eps) or self.eps <= 0:
            raise ValueError(f"SelectConfig.eps: expected a finite number > 0, got {self.eps!r}")
        if self.score == "abs_diff" and self.direction != "both":
            raise ValueError(
                f"SelectConfig.direction: score 'abs_diff' has no sign, so direction must be 'both', "
                f"got {self.direction!r} (use score 'mean_diff' with a direction)"
            )


@dataclass
class SubspaceConfig(_ConfigBase):
    """How the selected decoder directions become an orthonormal basis (METHOD.md step 4).

    Fields:
        variance_threshold: tau in (0, 1]; keep the fewest right singular vectors of M whose squared
            singular values reach tau * ||M||_F^2.
        rank: the LoRA rank r; the basis is truncated to r columns or padded to r with a random orthonormal
            complement.
        pooled: False = one basis per SAE layer; True = one basis from all layers' features together.
        seed: seed of the random padding (deterministic across runs).

    Example:
        >>> SubspaceConfig(rank=8, pooled=True).rank
        8
    """

    variance_threshold: float = 0.8
    rank: int = 16
    pooled: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not _is_number(self.variance_threshold) or not 0 < self.variance_threshold <= 1:
            raise ValueError(
                "SubspaceConfig.variance_threshold: expected a number in (0, 1], "
                f"got {self.variance_threshold!r}"
            )
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(f"SubspaceConfig.rank: expected an integer >= 1, got {self.rank!r}")
        if not isinstance(self.pooled, bool):
            raise ValueError(f"SubspaceConfig.pooled: expected true or false, got {self.pooled!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"SubspaceConfig.seed: expected an integer >= 0, got {self.seed!r}")


@dataclass
class InitConfig(_ConfigBase):
    """How LoRA factors are set from the subspace (METHOD.md step 5).

    Fields:
        target_modules: LoRA targets (module leaf names); each must be in `read_modules` or `write_modules`.
        read_modules: modules reading the residual stream (d_in = d): A = U^T, B = 0.
        write_modules: modules writing it (d_out = d): B = U, A = `write_side_A`.
        write_side_A: "zeros" keeps the model exactly unchanged at init; "small_random" draws
            A ~ N(0, write_side_std^2), which perturbs the output by about scaling * std (a deliberate
            trade: B's gradient is zero while A = 0).
        write_side_std: the std of "small_random".
        lora_alpha: LoRA alpha; None means 2 * rank.
        basis_rule: which SAE layer's basis serves a module (see `init_lora_from_subspace`).
            "nearest": the SAE layer nearest the stream position the module touches, ties to the earlier;
            "preceding": the nearest at or before it, else the nearest after.
        on_dim_mismatch: a targeted module whose residual-side width is not d: "error" raises, "skip"
            leaves PEFT's default init there and lists it in the report.
        layer_pattern: regex whose first group is the decoder layer index in a module name.
        seed: seed of "small_random".

    Example:
        >>> InitConfig(target_modules=["q_proj", "o_proj"]).target_modules
        ('q_proj', 'o_proj')
    """

    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    read_modules: tuple[str, ...] = DEFAULT_READ_MODULES
    write_modules: tuple[str, ...] = DEFAULT_WRITE_MODULES
    write_side_A: WriteSideA = "zeros"
    write_side_std: float = 1e-4
    lora_alpha: float | None = None
    basis_rule: BasisRule = "nearest"
    on_dim_mismatch: DimMismatch = "error"
    layer_pattern: str = r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("target_modules", "read_modules", "write_modules"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        self._check_literals()
        _check_names("InitConfig", "target_modules", self.target_modules)
        _check_names("InitConfig", "read_modules", self.read_modules, allow_empty=True)
        _check_names("InitConfig", "write_modules", self.write_modules, allow_empty=True)
        both = sorted(set(self.read_modules) & set(self.write_modules))
        if both:
            raise ValueError(
                f"InitConfig.read_modules: {both} also listed in write_modules; a module is one or the other"
            )
        sided = set(self.read_modules) | set(self.write_modules)
        unsided = [m for m in self.target_modules if m not in sided]
        if unsided:
            raise ValueError(
                f"InitConfig.target_modules: {unsided} are in neither read_modules {list(self.read_modules)} "
                f"nor write_modules {list(self.write_modules)}; add them to one"
            )
        if not _is_number(self.write_side_std) or self.write_side_std <= 0:
            raise ValueError(
                f"InitConfig.write_side_std: expected a finite number > 0, got {self.write_side_std!r}"
            )
        if self.lora_alpha is not None and (not _is_number(self.lora_alpha) or self.lora_alpha <= 0):
            raise ValueError(
                f"InitConfig.lora_alpha: expected a number > 0 or null (= 2 * rank), got {self.lora_alpha!r}"
            )
        try:
            compiled = re.compile(self.layer_pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"InitConfig.layer_pattern: not a valid regex ({err})") from err
        if compiled.groups < 1:
            raise ValueError(
                "InitConfig.layer_pattern: expected a regex with a group capturing the layer index"
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"InitConfig.seed: expected an integer >= 0, got {self.seed!r}")

    def alpha(self, rank: int) -> float:
        """The LoRA alpha to use with `rank`: `lora_alpha`, or 2 * rank when unset."""
        return float(2 * rank if self.lora_alpha is None else self.lora_alpha)

    def side(self, module_name: str) -> Literal["read", "write"]:
        """ "read" or "write" for a module leaf name (e.g. "q_proj"); ValueError for one in neither list."""
        if module_name in self.read_modules:
            return "read"
        if module_name in self.write_modules:
            return "write"
        raise ValueError(
            f"module_name: {module_name!r} is in neither InitConfig.read_modules {list(self.read_modules)} "
            f"nor write_modules {list(self.write_modules)}"
        )


@dataclass
class SailsConfig(_ConfigBase):
    """The whole pipeline's configuration: one section per step.

    Sections: `collect` (CollectConfig, step 3, from `sails_fast.sails.collect`), `select`, `subspace`,
    `init`, `train` (TrainConfig, step 7, from `sails_fast.sails.train`). A missing section takes its
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
