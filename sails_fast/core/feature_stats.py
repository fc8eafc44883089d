"""FeatureStats: per-class SAE feature statistics, accumulated over a token stream.

Only [classes x latents] accumulators are kept, never a [tokens x latents] matrix. They are filled by
`sails_fast.sae_feature_stats` (streaming, batch after batch) and read by feature selection.

Class convention for every [C, F] statistic in the pipeline: row `ALIGNED` (0) is the aligned data
(harmful prompt + refusal), row `UNALIGNED` (1) the unaligned data (harmful prompt + compliance).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

FORMAT_VERSION = 1
# the classes of every [C, F] statistic (see the module docstring)
ALIGNED, UNALIGNED = 0, 1
NUM_CLASSES = 2
CLASS_NAMES = ("aligned", "unaligned")


_SUM_FIELDS = ("weight_sum", "token_count", "act_sum", "act_sq_sum", "active_count")


@dataclass
class FeatureStats:
    """Per-class statistics of F SAE latents over the tokens seen so far.

    Attributes (C classes, F latents; fp32 unless said):
        weight_sum [C]: sum of token weights per class.
        token_count [C] int64: tokens per class.
        act_sum [C, F]: sum of w * a.  act_sq_sum [C, F]: sum of w * a^2.
        active_count [C, F] int64: tokens with a > 0.
        act_max [C, F]: largest activation (-inf where a class has no tokens).
        act_argmax [C, F] int64: index of that token in the whole stream (-1 where none); the first
            occurrence wins ties.
        tokens_seen: tokens passed in so far (labelled -1 or not): the offset of the next batch's indices.

    Example:
        >>> stats = FeatureStats.empty(num_classes=2, num_features=4608)
        >>> sae_feature_stats(x, sae, labels, out=stats)   # repeat per batch
        >>> stats.mean()[0] - stats.mean()[1]              # [F] mean difference
    """

    weight_sum: torch.Tensor
    token_count: torch.Tensor
    act_sum: torch.Tensor
    act_sq_sum: torch.Tensor
    active_count: torch.Tensor
    act_max: torch.Tensor
    act_argmax: torch.Tensor
    tokens_seen: int = 0

    def __post_init__(self) -> None:
        C, F = self.act_sum.shape
        expected = {
            "weight_sum": ((C,), torch.float32),
            "token_count": ((C,), torch.int64),
            "act_sum": ((C, F), torch.float32),
            "act_sq_sum": ((C, F), torch.float32),
            "active_count": ((C, F), torch.int64),
            "act_max": ((C, F), torch.float32),
            "act_argmax": ((C, F), torch.int64),
        }
        for name, (shape, dtype) in expected.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{name}: expected {list(shape)} {dtype}, got {list(t.shape)} {t.dtype}")

    @classmethod
    def empty(cls, num_classes: int, num_features: int, device: torch.device | str = "cpu") -> FeatureStats:
        """Zeroed accumulators for `num_classes` x `num_features`."""
        if num_classes < 1:
            raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
        if num_features < 1:
            raise ValueError(f"num_features: expected >= 1, got {num_features}")
        C, F = num_classes, num_features
        zf = lambda *s: torch.zeros(*s, dtype=torch.float32, device=device)
        zi = lambda *s: torch.zeros(*s, dtype=torch.int64, device=device)
        return cls(
            weight_sum=zf(C),
            token_count=zi(C),
            act_sum=zf(C, F),
            act_sq_sum=zf(C, F),
            active_count=zi(C, F),
            act_max=torch.full((C, F), float("-inf"), device=device),
            act_argmax=torch.full((C, F), -1, dtype=torch.int64, device=device),
        )

    @property
    def num_classes(self) -> int:
        return self.act_sum.shape[0]

    @property
    def num_features(self) -> int:
        return self.act_sum.shape[1]

    @property
    def device(self) -> torch.device:
        return self.act_sum.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tokens_seen"}

    def to(self, device: torch.device | str) -> FeatureStats:
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return FeatureStats(**moved, tokens_seen=self.tokens_seen)

    def mean(self) -> torch.Tensor:
        """[C, F] weighted mean activation, E_w[a]; 0 for a class with no weight."""
        return self.act_sum / self.weight_sum.clamp_min(1e-30)[:, None]

    def var(self) -> torch.Tensor:
        """[C, F] weighted variance E_w[a^2] - E_w[a]^2, clamped at 0 against rounding."""
        second = self.act_sq_sum / self.weight_sum.clamp_min(1e-30)[:, None]
        return (second - self.mean() ** 2).clamp_min(0.0)

    def frequency(self) -> torch.Tensor:
        """[C, F] share of the class's tokens on which the latent is active (a > 0)."""
        return self.active_count.double() / self.token_count.clamp_min(1).double()[:, None]

    def _check_compatible(self, other: FeatureStats, name: str = "other") -> None:
        if (other.num_classes, other.num_features) != (self.num_classes, self.num_features):
            raise ValueError(
                f"{name}: shape [C={other.num_classes}, F={other.num_features}] does not match "
                f"[C={self.num_classes}, F={self.num_features}]"
            )

    @torch.no_grad()
    def merge(self, other: FeatureStats) -> FeatureStats:
        """Fold in `other`, taken as the tokens that came after ours. In place; returns self."""
        self._check_compatible(other)
        other = other.to(self.device)
        for name in _SUM_FIELDS:
            getattr(self, name).add_(getattr(other, name))
        # strictly larger wins, so on a tie the earlier (our) token stays the argmax
        take = other.act_max > self.act_max
        self.act_argmax = torch.where(take, other.act_argmax + self.tokens_seen, self.act_argmax)
        self.act_max = torch.maximum(self.act_max, other.act_max)
        self.tokens_seen += other.tokens_seen
        return self

    @torch.no_grad()
    def all_reduce(self) -> FeatureStats:
        """Combine across torch.distributed ranks (rank order = stream order). No-op in a single process.

        Sums are summed, maxima maxed; argmax indices are shifted by the tokens of lower ranks, and on a tie
        the lowest global index wins. In place; returns self.
        """
        import torch.distributed as dist

        from sails_fast.core import distributed

        if not distributed.active():  # no process group, or inside distributed.local_only()
            return self
        world = dist.get_world_size()
        seen = torch.tensor([self.tokens_seen], dtype=torch.int64, device=self.device)
        all_seen = [torch.zeros_like(seen) for _ in range(world)]
        dist.all_gather(all_seen, seen)
        offset = int(sum(s.item() for s in all_seen[: dist.get_rank()]))
        for name in _SUM_FIELDS:
            dist.all_reduce(getattr(self, name), op=dist.ReduceOp.SUM)
        local_max = self.act_max.clone()
        dist.all_reduce(self.act_max, op=dist.ReduceOp.MAX)
        sentinel = torch.iinfo(torch.int64).max
        candidate = torch.where(
            (local_max == self.act_max) & (self.act_argmax >= 0), self.act_argmax + offset, sentinel
        )
        dist.all_reduce(candidate, op=dist.ReduceOp.MIN)
        self.act_argmax = torch.where(candidate == sentinel, -1, candidate)
        self.tokens_seen = int(sum(s.item() for s in all_seen))
        return self

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """Write safetensors with a JSON header (format, shape, tokens_seen, `metadata`), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        header = {
            "format": "sails_fast.FeatureStats",
            "version": FORMAT_VERSION,
            "num_classes": self.num_classes,
            "num_features": self.num_features,
            "tokens_seen": self.tokens_seen,
            "metadata": metadata or {},
        }
        tmp = path.with_name(path.name + ".tmp")
        tensors = {k: v.contiguous().cpu() for k, v in self.tensors().items()}
        save_file(tensors, str(tmp), {"header": json.dumps(header)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> FeatureStats:
        """Read a file written by `save`. A file that is not one raises ValueError naming the path."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = json.loads((f.metadata() or {}).get("header", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"path: {path} is not a readable FeatureStats file ({err})") from err
        if header.get("format") != "sails_fast.FeatureStats":
            raise ValueError(f"path: {path} holds no FeatureStats header")
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(f"path: {path} has FeatureStats format version {header.get('version')}, "
                             f"this library reads {FORMAT_VERSION}")  # fmt: skip
        stats = cls(**tensors, tokens_seen=int(header["tokens_seen"]))
        return stats.to(device)

    @staticmethod
    def read_metadata(path: str | Path) -> dict:
        """The `metadata` dict stored by `save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return json.loads((f.metadata() or {}).get("header", "{}")).get("metadata", {})
