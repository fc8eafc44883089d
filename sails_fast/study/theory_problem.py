"""The theory check's synthetic world: a known safety subspace, entangled concepts, paired examples and an
SAE-like dictionary (docs/theory.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

METHODS: tuple[str, ...] = ("sae", "pca_diff", "diffmean_rank1", "diffmean_completed")


DTYPE = torch.float64


# magnitudes of active concepts are U(0.5, 1.5): mean 1, second moment 1 + 1/12
_MAG_LO, _MAG_HI = 0.5, 1.5


_MAG_MEAN = 1.0


_MAG_SQ = 1.0 + 1.0 / 12.0


@dataclass(frozen=True)
class TheoryConfig:
    """The synthetic world. Every field is validated; a bad value raises ValueError naming it.

    Args:
        hidden_dim: d, the hidden size.
        safety_rank: r, the dimension of the true safety subspace S* (and the rank the estimators target).
        n_unrelated: q, unrelated concepts; needs r <= q <= d - r (q >= r gives every safety atom a
            distinct partner; q <= d - r keeps the concept map injective, so the encoder can unmix).
        entanglement: e in [0, 1), the norm of each unrelated concept direction's component inside S*.
        polysemanticity: p in [0, 1], how far each safety atom of the dictionary is rotated towards its
            partner unrelated concept (angle p * pi / 4 in concept space; 0 = monosemantic).
        safety_shift: per safety concept, |P(fire | aligned) - P(fire | unaligned)|, length r; None gives
            linspace(0.6, 0.3, r) (strong to weak concepts).
        safety_rate: mean firing probability of a safety concept over the two classes.
        unrelated_rate: firing probability of an unrelated concept (the same in both classes).
        noise: standard deviation of the isotropic Gaussian noise added to every hidden state.

    Example:
        >>> TheoryConfig(hidden_dim=32, safety_rank=3, n_unrelated=16, entanglement=0.5).safety_rank
        3
    """

    hidden_dim: int = 64
    safety_rank: int = 4
    n_unrelated: int = 32
    entanglement: float = 0.5
    polysemanticity: float = 0.0
    safety_shift: tuple[float, ...] | None = None
    safety_rate: float = 0.5
    unrelated_rate: float = 0.05
    noise: float = 0.1

    def __post_init__(self) -> None:
        d, r, q = self.hidden_dim, self.safety_rank, self.n_unrelated
        if not (isinstance(d, int) and d >= 2):
            raise ValueError(f"hidden_dim: expected an int >= 2, got {d!r}")
        if not (isinstance(r, int) and 1 <= r < d):
            raise ValueError(f"safety_rank: expected an int in [1, hidden_dim - 1] = [1, {d - 1}], got {r!r}")
        if not (isinstance(q, int) and r <= q <= d - r):
            raise ValueError(
                f"n_unrelated: expected an int in [safety_rank, hidden_dim - safety_rank] = [{r}, {d - r}], "
                f"got {q!r}"
            )
        if not (0.0 <= self.entanglement < 1.0):
            raise ValueError(f"entanglement: expected a float in [0, 1), got {self.entanglement!r}")
        if not (0.0 <= self.polysemanticity <= 1.0):
            raise ValueError(f"polysemanticity: expected a float in [0, 1], got {self.polysemanticity!r}")
        shift = self.shifts()
        if len(shift) != r or not all(0.0 < s <= 1.0 for s in shift):
            raise ValueError(
                f"safety_shift: expected {r} values in (0, 1] (one per safety concept), "
                f"got {self.safety_shift!r}"
            )
        lo, hi = self.safety_rate - max(shift) / 2, self.safety_rate + max(shift) / 2
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(
                f"safety_rate: safety_rate +- safety_shift / 2 must stay in [0, 1], got "
                f"{self.safety_rate!r} with a largest shift of {max(shift)!r}"
            )
        if not (0.0 < self.unrelated_rate <= 1.0):
            raise ValueError(f"unrelated_rate: expected a float in (0, 1], got {self.unrelated_rate!r}")
        if not (self.noise >= 0.0):
            raise ValueError(f"noise: expected a float >= 0, got {self.noise!r}")

    def shifts(self) -> tuple[float, ...]:
        """The resolved safety_shift (the default spread when the field is None)."""
        if self.safety_shift is not None:
            return tuple(float(s) for s in self.safety_shift)
        r = self.safety_rank
        return tuple(0.6 - 0.3 * i / max(r - 1, 1) for i in range(r))


@dataclass(frozen=True)
class SyntheticProblem:
    """A drawn world: the truth and the dictionary. Build with `make_problem`.

    Attributes:
        config: the TheoryConfig it was drawn from.
        basis: [d, r] orthonormal basis of the true safety subspace S*.
        concepts: [r + q, d] unit concept directions, safety concepts first (rows 0..r-1).
        dictionary: [r + q, d] unit decoder rows (atom j is meant for concept j).
        encoder: [d, r + q] the dictionary's pseudo-inverse; features are relu(h @ encoder).
        partner: [r] index of the unrelated concept mixed into each safety atom when p > 0.
        rate_aligned, rate_unaligned: [r + q] firing probability of each concept per class.
    """

    config: TheoryConfig
    basis: torch.Tensor
    concepts: torch.Tensor
    dictionary: torch.Tensor
    encoder: torch.Tensor
    partner: torch.Tensor
    rate_aligned: torch.Tensor
    rate_unaligned: torch.Tensor


@dataclass(frozen=True)
class PairedData:
    """Paired hidden states (row i of each is the same prompt) and the concept activations behind them.

    Attributes:
        h_aligned, h_unaligned: [n, d] hidden states.
        z_aligned, z_unaligned: [n, r + q] concept activations (ground truth, for tests).
    """

    h_aligned: torch.Tensor
    h_unaligned: torch.Tensor
    z_aligned: torch.Tensor
    z_unaligned: torch.Tensor

    def head(self, n: int) -> PairedData:
        """The first n pairs (the sweep draws the largest sample once and takes prefixes)."""
        if not (isinstance(n, int) and 1 <= n <= self.h_aligned.shape[0]):
            raise ValueError(f"n: expected an int in [1, {self.h_aligned.shape[0]}], got {n!r}")
        return PairedData(self.h_aligned[:n], self.h_unaligned[:n], self.z_aligned[:n], self.z_unaligned[:n])


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def polysemantic_dictionary(
    concepts: torch.Tensor, safety_rank: int, partner: torch.Tensor, polysemanticity: float
) -> torch.Tensor:
    """Dictionary atoms mixing each safety concept with a partner unrelated concept.

    Atom s = normalise(cos(phi) v_s + sin(phi) v_partner[s]) and atom partner[s] =
    normalise(cos(phi) v_partner[s] - sin(phi) v_s), phi = polysemanticity * pi / 4: a rotation in concept
    space, so the dictionary spans the same space and stays invertible for every p in [0, 1]. Other atoms
    are the concept directions themselves.

    Args:
        concepts: [n, d] unit concept directions, safety concepts first.
        safety_rank: r, the number of safety concepts.
        partner: [r] int64 index of each safety concept's partner (distinct, all >= r).
        polysemanticity: p in [0, 1].

    Returns:
        [n, d] unit atoms.

    Example:
        >>> c = torch.eye(4, dtype=torch.float64)
        >>> polysemantic_dictionary(c, 1, torch.tensor([2]), 1.0)[0]
        tensor([0.7071, 0.0000, 0.7071, 0.0000], dtype=torch.float64)
    """
    if not (0.0 <= polysemanticity <= 1.0):
        raise ValueError(f"polysemanticity: expected a float in [0, 1], got {polysemanticity!r}")
    if partner.shape != (safety_rank,) or len(set(partner.tolist())) != safety_rank:
        raise ValueError(f"partner: expected {safety_rank} distinct indices, got {partner.tolist()}")
    if int(partner.min()) < safety_rank or int(partner.max()) >= concepts.shape[0]:
        raise ValueError(
            f"partner: indices must lie in [{safety_rank}, {concepts.shape[0] - 1}] (unrelated concepts), "
            f"got {partner.tolist()}"
        )
    phi = polysemanticity * math.pi / 4
    c, s = math.cos(phi), math.sin(phi)
    atoms = concepts.clone()
    safe = concepts[:safety_rank]
    other = concepts[partner]
    atoms[:safety_rank] = c * safe + s * other
    atoms[partner] = c * other - s * safe
    return _unit_rows(atoms)


def make_problem(config: TheoryConfig | None = None, seed: int = 0) -> SyntheticProblem:
    """Draw a world: safety subspace, concept directions, class firing rates and the dictionary.

    The random draws depend on the seed only, not on entanglement or polysemanticity, so problems built
    with one seed and different e or p are the same world with more or less entanglement.

    Args:
        config: the TheoryConfig (default: TheoryConfig()).
        seed: seed of the torch generator.

    Returns:
        SyntheticProblem (float64 tensors on CPU).

    Example:
        >>> p = make_problem(TheoryConfig(hidden_dim=16, safety_rank=2, n_unrelated=8), seed=1)
        >>> p.basis.shape, p.dictionary.shape
        (torch.Size([16, 2]), torch.Size([10, 16]))
    """
    config = config or TheoryConfig()
    d, r, q, e = config.hidden_dim, config.safety_rank, config.n_unrelated, config.entanglement
    g = torch.Generator().manual_seed(int(seed))
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))
    basis, comp = rot[:, :r], rot[:, r:]
    w = _unit_rows(torch.randn(q, d - r, generator=g, dtype=DTYPE)) @ comp.T  # [q, d], orthogonal to S*
    s = _unit_rows(torch.randn(q, r, generator=g, dtype=DTYPE)) @ basis.T  # [q, d], inside S*
    unrelated = math.sqrt(1.0 - e * e) * w + e * s
    concepts = torch.cat([basis.T, unrelated], dim=0)  # [r + q, d]

    # partners: r distinct unrelated concepts, chosen at random
    partner = r + torch.randperm(q, generator=g)[:r]
    # half the safety concepts fire more on aligned answers (refusal), half on unaligned ones (harm)
    sign = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(r)], dtype=DTYPE)
    shift = torch.tensor(config.shifts(), dtype=DTYPE)
    rate_a = torch.full((r + q,), config.unrelated_rate, dtype=DTYPE)
    rate_u = rate_a.clone()
    rate_a[:r] = config.safety_rate + sign * shift / 2
    rate_u[:r] = config.safety_rate - sign * shift / 2

    dictionary = polysemantic_dictionary(concepts, r, partner, config.polysemanticity)
    return SyntheticProblem(
        config=config,
        basis=basis,
        concepts=concepts,
        dictionary=dictionary,
        encoder=torch.linalg.pinv(dictionary),
        partner=partner,
        rate_aligned=rate_a,
        rate_unaligned=rate_u,
    )


def with_polysemanticity(problem: SyntheticProblem, polysemanticity: float) -> SyntheticProblem:
    """The same world with its dictionary rebuilt at another polysemanticity.

    Args:
        problem: a SyntheticProblem.
        polysemanticity: p in [0, 1].

    Returns:
        SyntheticProblem sharing every tensor but dictionary and encoder.

    Example:
        >>> p = with_polysemanticity(make_problem(), 0.5)
        >>> p.config.polysemanticity
        0.5
    """
    config = replace(problem.config, polysemanticity=polysemanticity)
    r = config.safety_rank
    dictionary = polysemantic_dictionary(problem.concepts, r, problem.partner, polysemanticity)
    return replace(problem, config=config, dictionary=dictionary, encoder=torch.linalg.pinv(dictionary))


def sample_pairs(problem: SyntheticProblem, n: int, seed: int = 0) -> PairedData:
    """Draw n paired examples: z ~ Bernoulli(rate) * U(0.5, 1.5) per concept, h = z V + noise.

    Args:
        problem: the world.
        n: number of pairs (n aligned and n unaligned hidden states).
        seed: seed of the torch generator; the draws do not depend on e or p.

    Returns:
        PairedData with h_* [n, d] and z_* [n, r + q].

    Example:
        >>> data = sample_pairs(make_problem(), 8)
        >>> data.h_aligned.shape
        torch.Size([8, 64])
    """
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    g = torch.Generator().manual_seed(int(seed))
    m, d = problem.concepts.shape

    def draw(rate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fire = torch.rand(n, m, generator=g, dtype=DTYPE) < rate
        mag = _MAG_LO + (_MAG_HI - _MAG_LO) * torch.rand(n, m, generator=g, dtype=DTYPE)
        z = fire * mag
        noise = problem.config.noise * torch.randn(n, d, generator=g, dtype=DTYPE)
        return z, z @ problem.concepts + noise

    z_a, h_a = draw(problem.rate_aligned)
    z_u, h_u = draw(problem.rate_unaligned)
    return PairedData(h_a, h_u, z_a, z_u)


def _check_pair(h_aligned: torch.Tensor, h_unaligned: torch.Tensor, paired: bool) -> None:
    if h_aligned.dim() != 2 or h_aligned.shape[0] < 1:
        raise ValueError(f"h_aligned: expected a [n, d] tensor with n >= 1, got {list(h_aligned.shape)}")
    if h_unaligned.dim() != 2 or h_unaligned.shape[1] != h_aligned.shape[1] or h_unaligned.shape[0] < 1:
        raise ValueError(
            f"h_unaligned: expected [n, {h_aligned.shape[1]}] like h_aligned, got {list(h_unaligned.shape)}"
        )
    if paired and h_unaligned.shape[0] != h_aligned.shape[0]:
        raise ValueError(
            f"h_unaligned: per-example differences need pairs, got {h_unaligned.shape[0]} rows vs "
            f"h_aligned's {h_aligned.shape[0]}"
        )
