"""How pairs are tokenised and completed, and how their statistics are collected: `CollectConfig` (the config
file's `sails.collect` section), shared by the pairs and statistics steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sails_fast.core.config import ConfigBase

POOLINGS = ("response_mean", "token")


HOOK_POINTS = ("residual",)


@dataclass
class CollectConfig(ConfigBase):
    """How feature statistics are collected (and how the unaligned side is generated).

    Args:
        layers: decoder-block indices to hook; empty = every layer that has an SAE. When given, it must
            name exactly the layers of the `saes` dict.
        batch_size: examples per forward pass (each pair gives two examples).
        max_length: most tokens per example (prompt + response); longer ones are truncated with a warning.
        pooling: "response_mean" weights each response token 1/len(response), so every example counts
            once (mean over tokens, then over examples); "token" weights every response token 1.
        hook_point: "residual" = the output of decoder block l (the residual stream after block l).
        chat_template: wrap the prompt in the tokenizer's chat template (with the generation prompt).
        max_new_tokens: greedy completion length for `generate_unaligned`.
        backend: passed to `sae_feature_stats` ("auto", "triton", "torch").
        progress: show a tqdm progress bar.

    Example:
        >>> CollectConfig(layers=(5, 10), batch_size=16, pooling="response_mean")
    """

    layers: tuple[int, ...] = ()
    batch_size: int = 8
    max_length: int = 512
    pooling: Literal["response_mean", "token"] = "response_mean"
    hook_point: Literal["residual"] = "residual"
    chat_template: bool = True
    max_new_tokens: int = 128
    backend: Literal["auto", "triton", "torch"] = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        for layer in self.layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"layers: expected non-negative ints, got {self.layers!r}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers: expected distinct layer indices, got {self.layers!r}")
        for name in ("batch_size", "max_length", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if self.max_length < 2:
            raise ValueError(
                f"max_length: expected >= 2 (a prompt token and a response token), got {self.max_length}"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {POOLINGS}, got {self.pooling!r}")
        if self.hook_point not in HOOK_POINTS:
            raise ValueError(f"hook_point: expected one of {HOOK_POINTS}, got {self.hook_point!r}")
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {self.backend!r}")
        for name in ("chat_template", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
