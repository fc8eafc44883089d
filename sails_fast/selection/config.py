"""The feature-selection step's config (METHOD.md step 3): which score, which direction, how many features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sails_fast.core.config import ConfigBase as _ConfigBase
from sails_fast.core.config import _is_int, _is_number

ScoreName = Literal["mean_diff", "relative", "abs_diff", "t_stat"]


Direction = Literal["both", "aligned", "unaligned"]


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
