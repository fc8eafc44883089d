"""The LoRA-init step's config (METHOD.md step 5): which modules get the basis, which side, what scale."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from sails_fast.core.config import ConfigBase as _ConfigBase
from sails_fast.core.config import _check_names, _is_int, _is_number
from sails_fast.subspace.config import BasisRule

WriteSideA = Literal["zeros", "small_random"]


DimMismatch = Literal["error", "skip"]


DEFAULT_READ_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


DEFAULT_WRITE_MODULES = ("o_proj", "down_proj")


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
