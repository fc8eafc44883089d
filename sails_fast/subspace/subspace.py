"""Step 5: an orthonormal residual-stream basis from the selected features' decoder directions.

METHOD.md step 4. For the m selected features (one layer, or all layers when pooled):

    M [m, d]   rows W_dec[i] / ||W_dec[i]||                      (unit-normalised decoder rows)
    M = P S V^T                                                   (SVD, uncentred: directions, not spread)
    r_S        fewest components with sum_{j<r_S} s_j^2 >= tau * ||M||_F^2
    U          QR of V[:, :r_S] (columns orthonormal), signs fixed so each column's largest entry is > 0
    rank r     U[:, :r] when r_S >= r; else U padded with r - r_S random orthonormal columns, orthogonal to
               the kept ones, from a generator seeded by `SubspaceConfig.seed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sails_fast.core.artifacts import load_artifact, save_artifact
from sails_fast.selection.select import FeatureSelection
from sails_fast.subspace.config import SubspaceConfig

KIND = "sails_fast.Subspace"


# key of the single basis when `pooled`: the basis serves every layer
POOLED = -1


@dataclass
class SubspaceBasis:
    """One orthonormal basis and where it came from.

    Attributes:
        U [d, r] fp32: orthonormal columns (U^T U = I), the first `n_components` from the SVD, the rest
            random padding.
        singular_values [min(m, d)] fp32: of M, descending.
        explained [min(m, d)] fp32: s_j^2 / ||M||_F^2 per component.
        n_components: r_S, components needed to reach the variance threshold (before truncation/padding).
        n_kept: SVD components in U (min(r_S, r)); columns after that are padding.
        feature_ids: SAE layer -> [m_l] int64 latent ids whose decoder rows built M, in row order
            (layers ascending, so M's rows are the concatenation over layers).
        loadings [m, r] fp32: M U, row i = the i-th feature's unit decoder direction in U's coordinates
            (the cosine between that direction and each column); how each column traces back to features.
    """

    U: torch.Tensor
    singular_values: torch.Tensor
    explained: torch.Tensor
    n_components: int
    n_kept: int
    feature_ids: dict[int, torch.Tensor]
    loadings: torch.Tensor

    def top_features(self, column: int, n: int = 5) -> list[tuple[int, int, float]]:
        """The n features whose unit decoder directions load most on column `column` of U (by |loading|).

        Returns:
            [(SAE layer, latent id, loading)], largest |loading| first.

        Example:
            >>> sub.bases[10].top_features(0, n=3)   # e.g. [(10, 4123, 0.81), (10, 77, -0.64), ...]
        """
        if not 0 <= column < self.rank:
            raise ValueError(f"column: expected an index in [0, {self.rank}), got {column}")
        rows = [(layer, int(i)) for layer in sorted(self.feature_ids) for i in self.feature_ids[layer]]
        col = self.loadings[:, column]
        order = torch.sort(col.abs(), descending=True, stable=True).indices[:n]
        return [(*rows[int(i)], float(col[i])) for i in order]

    @property
    def explained_kept(self) -> float:
        """Share of ||M||_F^2 captured by the kept SVD components."""
        return float(self.explained[: self.n_kept].sum())

    @property
    def rank(self) -> int:
        return self.U.shape[1]


@dataclass
class Subspace:
    """Bases for LoRA init: one per SAE layer, or one pooled basis (key `POOLED`).

    Example:
        >>> sub = build_subspace(saes, selection, SubspaceConfig(rank=16))
        >>> sub.bases[10].U.shape          # torch.Size([d, 16])
        >>> sub.bases[10].n_components     # r_S, before truncation / padding
    """

    bases: dict[int, SubspaceBasis]
    config: SubspaceConfig
    d_model: int

    @property
    def pooled(self) -> bool:
        return self.config.pooled

    @property
    def sae_layers(self) -> list[int]:
        """The SAE layers the bases were built from (for pooled: every layer that fed the one basis)."""
        return sorted({layer for b in self.bases.values() for layer in b.feature_ids})

    def save(self, path: str | Path, config: dict | None = None) -> None:
        """Write as an artifact. `config` is the reuse key; by default {"subspace": self.config.to_dict()}."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"subspace": self.config.to_dict(), "d_model": self.d_model, "bases": {}}
        for key, b in self.bases.items():
            tensors[f"basis{key}.U"] = b.U
            tensors[f"basis{key}.singular_values"] = b.singular_values
            tensors[f"basis{key}.explained"] = b.explained
            tensors[f"basis{key}.loadings"] = b.loadings
            for layer, ids in b.feature_ids.items():
                tensors[f"basis{key}.feature_ids.layer{layer}"] = ids
            meta["bases"][str(key)] = {
                "n_components": b.n_components,
                "n_kept": b.n_kept,
                "layers": sorted(b.feature_ids),
            }
        save_artifact(path, KIND, tensors, config=config or {"subspace": self.config.to_dict()}, meta=meta)

    @classmethod
    def load(cls, path: str | Path) -> Subspace:
        """Read a subspace written by `save`; a damaged file or another kind raises ValueError naming it."""
        art = load_artifact(path, KIND)
        t = art.tensors
        try:
            bases = {}
            for key, m in art.meta["bases"].items():
                bases[int(key)] = SubspaceBasis(
                    U=t[f"basis{key}.U"],
                    singular_values=t[f"basis{key}.singular_values"],
                    explained=t[f"basis{key}.explained"],
                    n_components=int(m["n_components"]),
                    n_kept=int(m["n_kept"]),
                    feature_ids={
                        int(layer): t[f"basis{key}.feature_ids.layer{layer}"] for layer in m["layers"]
                    },
                    loadings=t[f"basis{key}.loadings"],
                )
            sub = cls(
                bases=bases,
                config=SubspaceConfig.from_dict(art.meta["subspace"]),
                d_model=int(art.meta["d_model"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"path: {path} is not a consistent Subspace artifact ({err})") from err
        return sub


def _decoder(sae: Any, layer: int) -> torch.Tensor:
    W_dec = sae if isinstance(sae, torch.Tensor) else getattr(sae, "W_dec", None)
    if not isinstance(W_dec, torch.Tensor) or W_dec.dim() != 2:
        raise ValueError(
            f"saes[{layer}]: expected an SAEWeights (W_dec [F, d]) or a [F, d] tensor, "
            f"got {type(sae).__name__}"
        )
    return W_dec


def _fix_signs(U: torch.Tensor) -> torch.Tensor:
    # singular vectors are defined up to sign; pin it so the basis does not depend on the LAPACK build
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(U.shape[1])])
    signs[signs == 0] = 1
    return U * signs


def orthonormal_complement(U: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n random orthonormal columns orthogonal to the orthonormal columns of U [d, k] (needs k + n <= d).

    Gaussian columns, projected off span(U) twice (one pass leaves rounding-sized leakage), then QR.
    Returns [d, n] in U's dtype.
    """
    d, k = U.shape
    if k + n > d:
        raise ValueError(f"n: {k} + {n} columns do not fit in dimension {d}")
    G = torch.randn(d, n, generator=generator, dtype=torch.float64).to(U.dtype)
    for _ in range(2):
        G = G - U @ (U.T @ G)
    Q, R = torch.linalg.qr(G)
    # QR's sign convention varies with the backend; make diag(R) positive for a deterministic result
    return Q * torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones(()))


def _generator(seed: int, key: int) -> torch.Generator:
    # one stream per basis, so a layer's padding does not depend on which other layers were selected
    return torch.Generator().manual_seed(seed * 1_000_003 + key + 1)


def _basis(
    M: torch.Tensor, config: SubspaceConfig, generator: torch.Generator, ids: dict[int, torch.Tensor]
) -> SubspaceBasis:
    _, svals, Vh = torch.linalg.svd(M, full_matrices=False)
    energy = svals**2
    explained = energy / energy.sum()
    # fewest components reaching tau; the tiny slack keeps tau = 1.0 reachable despite rounding
    cum = torch.cumsum(explained, dim=0)
    r_S = int((cum < config.variance_threshold - 1e-12).sum()) + 1
    r_S = min(r_S, int((svals > svals[0] * 1e-10).sum()))
    n_kept = min(r_S, config.rank)
    U, _ = torch.linalg.qr(Vh[:n_kept].T)
    U = _fix_signs(U)
    if n_kept < config.rank:
        U = torch.cat([U, orthonormal_complement(U, config.rank - n_kept, generator)], dim=1)
    return SubspaceBasis(
        U=U.float().contiguous(),
        singular_values=svals.float(),
        explained=explained.float(),
        n_components=r_S,
        n_kept=n_kept,
        feature_ids={layer: i.clone() for layer, i in ids.items()},
        loadings=(M @ U).float().contiguous(),
    )


def build_subspace(saes: dict[int, Any], selection: FeatureSelection, config: SubspaceConfig) -> Subspace:
    """Turn the selected features' decoder rows into orthonormal bases of the LoRA rank.

    Args:
        saes: SAE layer index -> SAEWeights (or a bare W_dec tensor) with W_dec [F, d]; every selected layer
            must be present and all d must agree.
        selection: FeatureSelection from `select_features`.
        config: SubspaceConfig (variance_threshold, rank, pooled, seed).

    Returns:
        Subspace whose `bases` map each selected layer (or `POOLED`) to a SubspaceBasis with U [d, rank].

    Raises:
        ValueError: a missing SAE layer, an SAE width F different from the selection's, mixed d,
            rank > d, a zero decoder row.

    Example:
        >>> selection = select_features({10: stats10}, SelectConfig())
        >>> sub = build_subspace({10: sae10}, selection, SubspaceConfig())
        >>> U = sub.bases[10].U                   # [d, 16], U.T @ U == I
    """
    if not isinstance(config, SubspaceConfig):
        raise ValueError(f"config: expected a SubspaceConfig, got {type(config).__name__}")
    if not isinstance(selection, FeatureSelection) or not selection.layers:
        raise ValueError("selection: expected a FeatureSelection with at least one layer")
    rows: dict[int, torch.Tensor] = {}
    d_model = None
    for layer, sel in sorted(selection.layers.items()):
        if layer not in saes:
            raise ValueError(f"saes: no SAE for selected layer {layer}; got layers {sorted(saes)}")
        W_dec = _decoder(saes[layer], layer)
        width, d = W_dec.shape
        if width != sel.num_features:
            raise ValueError(
                f"saes[{layer}]: W_dec has {width} latents but the selection was made over {sel.num_features}"
            )
        if d_model is None:
            d_model = d
        elif d != d_model:
            raise ValueError(f"saes[{layer}]: W_dec width d = {d} differs from another layer's d = {d_model}")
        R = W_dec.detach()[sel.ids.to(W_dec.device)].to("cpu", torch.float64)
        norms = R.norm(dim=1)
        if (norms == 0).any():
            bad = sel.ids[norms == 0].tolist()
            raise ValueError(
                f"saes[{layer}]: selected latents {bad} have an all-zero decoder row (no direction)"
            )
        rows[layer] = R / norms[:, None]
    assert d_model is not None
    if config.rank > d_model:
        raise ValueError(f"config.rank: {config.rank} exceeds the residual width d = {d_model}")
    ids = {layer: selection.layers[layer].ids for layer in sorted(selection.layers)}
    if config.pooled:
        M = torch.cat([rows[layer] for layer in sorted(rows)], dim=0)
        bases = {POOLED: _basis(M, config, _generator(config.seed, POOLED), ids)}
    else:
        bases = {
            layer: _basis(rows[layer], config, _generator(config.seed, layer), {layer: ids[layer]})
            for layer in sorted(rows)
        }
    return Subspace(bases=bases, config=config, d_model=d_model)
