"""The subspace step's config (METHOD.md step 4): rank rule, pooling across layers, seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sails_fast.core.config import ConfigBase as _ConfigBase
from sails_fast.core.config import _is_int, _is_number

BasisRule = Literal["nearest", "preceding"]


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
