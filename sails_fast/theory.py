"""The paper's identification theorem, checked on synthetic data with a known safety subspace.

SAILS (arXiv 2512.23260) argues that identifying the safety subspace directly in the entangled hidden
space has an error floor, while identification through monosemantic SAE features can be made arbitrarily
accurate. This module builds a world where the truth is known and measures both, in projector Frobenius
distance ||P_hat - P*||_F. Pure torch, CPU, float64, seeded; no Triton. Derivations: docs/theory.md.

The world (`make_problem`):

- a safety subspace S* of dimension r in R^d with orthonormal basis E [d, r];
- r safety concepts with directions E^T (orthonormal inside S*), and q unrelated concepts with unit
  directions v_u = sqrt(1 - e^2) w_u + e s_u, w_u a random unit vector orthogonal to S*, s_u one inside it.
  The entanglement e = ||P* v_u|| makes the concept map V [r + q, d] non-orthogonal (polysemantic in the
  hidden basis) while keeping it injective (r + q <= d);
- paired examples (same prompt, aligned vs unaligned answer): concept j fires with a class-dependent
  probability and a magnitude ~ U(0.5, 1.5); only the safety concepts change rate between classes (half
  fire more on aligned answers, "refusal" concepts, half more on unaligned ones, "harm" concepts);
  h = z V + noise * N(0, I_d);
- a dictionary (the SAE's decoder rows) whose atoms are the concept directions (monosemantic), or, with
  polysemanticity p > 0, each safety atom rotated towards a partner unrelated concept by the angle
  p * pi / 4 in concept space (p = 1: every safety atom is an equal mix of two concepts). The encoder is
  relu(h D^+), exact unmixing for a monosemantic dictionary.

What the math says (docs/theory.md), and what tests/test_theory.py checks at fixed seeds:

- rank-1 difference of means (`diff_of_means_direction`): ||uu^T - P*||_F^2 = r - 1 + 2 ||(I - P*) u||^2,
  so its error is >= sqrt(r - 1) for every sample size, and tends to exactly sqrt(r - 1) (the population
  mean difference lies in S*). Completing u to rank r with random directions (`complete_basis`) is worse
  on average: sqrt(2 (r - 1) (1 - (r - 1) / (d - 1))) in expectation of the square.
- PCA of the per-pair differences (`pca_of_differences`, rank r): consistent (error -> 0) when e = 0, but
  for 0 < e < 1 the unrelated concepts' variance couples S* with its complement (a block proportional to
  e sqrt(1 - e^2)), the top-r eigenspace of the population second moment tilts away from S*, and the
  error tends to a floor no sample size removes: it rises from 0, peaks near e = 0.5 and falls again as
  the unrelated concepts move inside S*. In the default world that floor stays below sqrt(r - 1).
- the SAE route (`sae_subspace`, METHOD.md steps 2-4 in miniature): with monosemantic atoms its error is
  exactly 0 once the top-k selection is right, which happens with probability -> 1 as samples grow, so
  the error -> 0 at any entanglement; with polysemantic atoms the selected rows are tilted out of S* and
  the error tends to the floor of the tilted atoms (`population_errors(...)["sae"]`), growing with p;
  in the default world it overtakes PCA's floor once the atoms are rotated by about 10 to 12 degrees.

Example:
    >>> from sails_fast.theory import TheoryConfig, make_problem, sample_pairs, estimate_all
    >>> problem = make_problem(TheoryConfig(entanglement=0.6), seed=0)
    >>> data = sample_pairs(problem, 2048, seed=0)
    >>> errs = estimate_all(problem, data, seed=0)
    >>> errs["sae"] < 1e-9 and errs["diffmean_rank1"] >= 3**0.5
    True
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, replace

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


def projector_distance(basis_hat: torch.Tensor, basis_true: torch.Tensor) -> float:
    """||U U^T - W W^T||_F for orthonormal bases U [d, a] and W [d, b] (ranks may differ).

    Equals sqrt(a + b - 2 ||U^T W||_F^2); computed from the projectors themselves, which keeps an exact
    match at ~1e-15 rather than the ~1e-8 the trace form leaves after cancellation.

    Args:
        basis_hat: [d, a] orthonormal columns (the estimate).
        basis_true: [d, b] orthonormal columns (the truth).

    Returns:
        The distance, a float in [0, sqrt(a + b)].

    Example:
        >>> e = torch.eye(4, dtype=torch.float64)
        >>> round(projector_distance(e[:, :1], e[:, :4]), 6)  # rank 1 inside rank 4: sqrt(3)
        1.732051
    """
    for name, b in (("basis_hat", basis_hat), ("basis_true", basis_true)):
        if b.dim() != 2 or b.shape[1] < 1:
            raise ValueError(f"{name}: expected a [d, rank] tensor with rank >= 1, got {list(b.shape)}")
        gram = b.T.double() @ b.double()
        tol = 1e-6 if b.dtype == torch.float64 else 1e-4
        if (gram - torch.eye(b.shape[1], dtype=DTYPE)).abs().max() > tol:
            raise ValueError(f"{name}: columns are not orthonormal (max |U^T U - I| > {tol})")
    if basis_hat.shape[0] != basis_true.shape[0]:
        raise ValueError(
            f"basis_hat: expected {basis_true.shape[0]} rows like basis_true, got {basis_hat.shape[0]}"
        )
    u, w = basis_hat.double(), basis_true.double()
    return float(torch.linalg.matrix_norm(u @ u.T - w @ w.T))


def diff_of_means_direction(h_aligned: torch.Tensor, h_unaligned: torch.Tensor) -> torch.Tensor:
    """The rank-1 "refusal direction": normalise(mean(h_aligned) - mean(h_unaligned)).

    Args:
        h_aligned: [n_a, d] hidden states of the aligned class.
        h_unaligned: [n_u, d] hidden states of the unaligned class.

    Returns:
        [d, 1] unit column.

    Example:
        >>> diff_of_means_direction(torch.ones(3, 2), torch.zeros(3, 2)).squeeze(1)
        tensor([0.7071, 0.7071])
    """
    _check_pair(h_aligned, h_unaligned, paired=False)
    mu = h_aligned.mean(0) - h_unaligned.mean(0)
    norm = mu.norm()
    if not norm > 0:
        raise ValueError("h_aligned: class means are identical, the difference of means has no direction")
    return (mu / norm).unsqueeze(1)


def complete_basis(basis: torch.Tensor, rank: int, seed: int = 0) -> torch.Tensor:
    """Pad an orthonormal basis to `rank` columns with a random orthonormal complement.

    Args:
        basis: [d, a] orthonormal columns, a <= rank.
        rank: target rank, <= d.
        seed: seed of the complement's Gaussian draw.

    Returns:
        [d, rank]: the input columns first, then random directions orthogonal to them.

    Example:
        >>> u = torch.eye(5, dtype=torch.float64)[:, :1]
        >>> complete_basis(u, 3).shape
        torch.Size([5, 3])
    """
    d, a = basis.shape
    if not (isinstance(rank, int) and a <= rank <= d):
        raise ValueError(f"rank: expected an int in [{a}, {d}] (basis columns to hidden size), got {rank!r}")
    if rank == a:
        return basis
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(d, rank - a, generator=g, dtype=DTYPE).to(basis.dtype)
    # project out the given columns twice: one pass leaves ~eps * cond of them behind
    for _ in range(2):
        x = x - basis @ (basis.T @ x)
    q, _ = torch.linalg.qr(x)
    return torch.cat([basis, q], dim=1)


def pca_of_differences(
    h_aligned: torch.Tensor, h_unaligned: torch.Tensor, rank: int, center: bool = False
) -> torch.Tensor:
    """Top-`rank` principal directions of the per-pair differences h_aligned[i] - h_unaligned[i].

    Uncentred by default (the second moment, which keeps the mean difference, the strongest safety
    signal); center=True takes the covariance instead.

    Args:
        h_aligned: [n, d] hidden states, row i paired with h_unaligned[i].
        h_unaligned: [n, d].
        rank: number of directions, in [1, min(n, d)].
        center: subtract the mean difference before the SVD.

    Returns:
        [d, rank] orthonormal columns.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> pca_of_differences(torch.randn(10, 6, generator=g), torch.zeros(10, 6), 2).shape
        torch.Size([6, 2])
    """
    _check_pair(h_aligned, h_unaligned, paired=True)
    n, d = h_aligned.shape
    if not (isinstance(rank, int) and 1 <= rank <= min(n, d)):
        raise ValueError(f"rank: expected an int in [1, min(n, d)] = [1, {min(n, d)}], got {rank!r}")
    delta = h_aligned - h_unaligned
    if center:
        delta = delta - delta.mean(0, keepdim=True)
    # eigh of the [d, d] second moment rather than an SVD of [n, d]: n grows, d does not
    _, evecs = torch.linalg.eigh(delta.T @ delta)
    return evecs[:, -rank:].flip(1).contiguous()


def subspace_from_directions(
    directions: torch.Tensor, variance_threshold: float, rank: int | None = None, seed: int = 0
) -> torch.Tensor:
    """METHOD.md step 4: unit-normalise rows, SVD (uncentred), keep the top r_S right singular vectors that
    explain at least `variance_threshold` of ||M||_F^2, QR; then optionally reconcile with `rank`
    (truncate to the top `rank`, or pad with a random orthonormal complement).

    Args:
        directions: [m, d] decoder rows (any norm; zero rows are rejected).
        variance_threshold: tau in (0, 1].
        rank: None keeps r_S; an int truncates or pads to it.
        seed: seed of the padding draw.

    Returns:
        [d, r_S] (or [d, rank]) orthonormal columns.

    Example:
        >>> subspace_from_directions(torch.eye(3, dtype=torch.float64), 0.6).shape  # 2 of 3 reach 0.6
        torch.Size([3, 2])
    """
    if directions.dim() != 2 or directions.shape[0] < 1:
        raise ValueError(f"directions: expected a [m, d] tensor with m >= 1, got {list(directions.shape)}")
    if not (0.0 < variance_threshold <= 1.0):
        raise ValueError(f"variance_threshold: expected a float in (0, 1], got {variance_threshold!r}")
    norms = directions.norm(dim=1, keepdim=True)
    if not bool((norms > 0).all()):
        raise ValueError("directions: every row needs a non-zero norm to be unit-normalised")
    m = directions / norms
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    frac = torch.cumsum(s**2, 0) / (s**2).sum()
    # a 1e-9 slack so equal singular values landing exactly on tau do not flip on rounding
    r_s = int((frac < variance_threshold - 1e-9).sum()) + 1
    q, _ = torch.linalg.qr(vh[:r_s].T)
    if rank is None:
        return q
    if not (isinstance(rank, int) and 1 <= rank <= m.shape[1]):
        raise ValueError(f"rank: expected None or an int in [1, {m.shape[1]}], got {rank!r}")
    return q[:, :rank] if rank <= r_s else complete_basis(q, rank, seed)


@dataclass(frozen=True)
class SaeSubspace:
    """Result of `sae_subspace`.

    Attributes:
        basis: [d, r_S] orthonormal columns spanning the estimated safety subspace.
        feature_ids: [k] selected features, highest score first.
        scores: [n_features] |E_aligned[a] - E_unaligned[a]| of every feature.
    """

    basis: torch.Tensor
    feature_ids: torch.Tensor
    scores: torch.Tensor


def sae_subspace(
    h_aligned: torch.Tensor,
    h_unaligned: torch.Tensor,
    decoder: torch.Tensor,
    encoder: torch.Tensor,
    k: int,
    variance_threshold: float = 0.99,
    rank: int | None = None,
) -> SaeSubspace:
    """METHOD.md steps 2-4 in miniature: encode, contrast class means, top-k, decoder rows -> basis.

    Features a = relu(h @ encoder); score_i = |mean_aligned(a_i) - mean_unaligned(a_i)| (the absolute mean
    difference, so refusal and harm features both count); the k highest-scoring features' decoder rows go
    through `subspace_from_directions`. The default tau = 0.99 rather than METHOD's 0.8: here k = r atoms
    each carry one safety concept, and 0.8 would drop a true dimension whenever r - 1 of r near-orthogonal
    atoms already reach 80 % (r >= 5, or r = 4 with slightly tilted atoms).

    Args:
        h_aligned: [n_a, d] hidden states of the aligned class.
        h_unaligned: [n_u, d].
        decoder: [n_features, d] decoder rows W_dec.
        encoder: [d, n_features] W_enc.
        k: number of features kept, in [1, n_features].
        variance_threshold: tau in (0, 1].
        rank: None keeps r_S; an int truncates or pads (see `subspace_from_directions`).

    Returns:
        SaeSubspace(basis [d, r_S], feature_ids [k], scores [n_features]).

    Example:
        >>> p = make_problem()
        >>> data = sample_pairs(p, 512)
        >>> est = sae_subspace(data.h_aligned, data.h_unaligned, p.dictionary, p.encoder, k=4)
        >>> sorted(est.feature_ids.tolist())
        [0, 1, 2, 3]
    """
    _check_pair(h_aligned, h_unaligned, paired=False)
    d = h_aligned.shape[1]
    if decoder.dim() != 2 or decoder.shape[1] != d:
        raise ValueError(f"decoder: expected [n_features, {d}], got {list(decoder.shape)}")
    if tuple(encoder.shape) != (d, decoder.shape[0]):
        raise ValueError(f"encoder: expected [{d}, {decoder.shape[0]}], got {list(encoder.shape)}")
    if not (isinstance(k, int) and 1 <= k <= decoder.shape[0]):
        raise ValueError(f"k: expected an int in [1, {decoder.shape[0]}], got {k!r}")
    scores = (torch.relu(h_aligned @ encoder).mean(0) - torch.relu(h_unaligned @ encoder).mean(0)).abs()
    ids = torch.topk(scores, k).indices
    basis = subspace_from_directions(decoder[ids], variance_threshold, rank)
    return SaeSubspace(basis=basis, feature_ids=ids, scores=scores)


def population_moments(problem: SyntheticProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean [d] and covariance [d, d] of the per-pair difference h_aligned - h_unaligned.

    With independent concepts, z_j = Bernoulli(rate_j) * U(0.5, 1.5): E z_j = rate_j,
    Var z_j = rate_j * 13/12 - rate_j^2; so mean = (rate_a - rate_u) V and
    cov = V^T diag(Var_a + Var_u) V + 2 noise^2 I.

    Args:
        problem: the world.

    Returns:
        (mean [d], cov [d, d]).

    Example:
        >>> mean, cov = population_moments(make_problem())
        >>> mean.shape, cov.shape
        (torch.Size([64]), torch.Size([64, 64]))
    """
    ra, ru, v = problem.rate_aligned, problem.rate_unaligned, problem.concepts
    var = ra * _MAG_SQ - (ra * _MAG_MEAN) ** 2 + ru * _MAG_SQ - (ru * _MAG_MEAN) ** 2
    mean = ((ra - ru) * _MAG_MEAN) @ v
    d = v.shape[1]
    cov = v.T @ (var[:, None] * v) + 2 * problem.config.noise**2 * torch.eye(d, dtype=DTYPE)
    return mean, cov


def population_errors(
    problem: SyntheticProblem, variance_threshold: float = 0.99, seed: int = 0
) -> dict[str, float]:
    """Infinite-sample error of each method in this world (the floors the sweep's curves approach).

    - "diffmean_rank1": from the population mean difference (lies in S*, so sqrt(r - 1) up to rounding);
    - "diffmean_completed": that direction completed with the same seeded complement as `estimate_all`;
    - "pca_diff": the top-r eigenspace of the population second moment E[delta delta^T];
    - "sae": the span of the safety atoms (rows 0..r-1), i.e. the SAE route once its selection is right.

    Args:
        problem: the world.
        variance_threshold: tau used for the SAE route.
        seed: seed of the completion's complement.

    Returns:
        dict method -> float.

    Example:
        >>> round(population_errors(make_problem())["diffmean_rank1"], 9)
        1.732050808
    """
    r = problem.config.safety_rank
    mean, cov = population_moments(problem)
    u = (mean / mean.norm()).unsqueeze(1)
    _, evecs = torch.linalg.eigh(cov + torch.outer(mean, mean))
    pca = evecs[:, -r:]
    sae = subspace_from_directions(problem.dictionary[:r], variance_threshold)
    return {
        "sae": projector_distance(sae, problem.basis),
        "pca_diff": projector_distance(pca, problem.basis),
        "diffmean_rank1": projector_distance(u, problem.basis),
        "diffmean_completed": projector_distance(complete_basis(u, r, seed), problem.basis),
    }


def pca_floor_bound(problem: SyntheticProblem) -> float:
    """Davis-Kahan bound on the population PCA error: sqrt(2) ||(I - P*) G P*||_F / delta.

    G = E[delta delta^T] is the population second moment of the differences and
    delta = lambda_min(E^T G E) - lambda_{r+1}(G) the gap between G's spectrum on S* and the rest of its
    spectrum (Davis and Kahan 1970, the sin-theta theorem; ||P_hat - P*||_F = sqrt(2) ||sin Theta||_F). The
    coupling term (I - P*) G P* is exactly what entanglement creates: with e = 0 it is zero and PCA is
    consistent. Returns inf when delta <= 0 (no bound).

    Args:
        problem: the world.

    Returns:
        The bound, a float (inf when the gap closes).

    Example:
        >>> pca_floor_bound(make_problem(TheoryConfig(entanglement=0.0))) < 1e-12
        True
    """
    r = problem.config.safety_rank
    mean, cov = population_moments(problem)
    g = cov + torch.outer(mean, mean)
    e = problem.basis
    coupling = g @ e - e @ (e.T @ g @ e)  # (I - P*) G E
    gap = float(torch.linalg.eigvalsh(e.T @ g @ e)[0] - torch.linalg.eigvalsh(g)[-r - 1])
    if gap <= 0:
        return math.inf
    return math.sqrt(2.0) * float(torch.linalg.matrix_norm(coupling)) / gap


def estimate_direct(problem: SyntheticProblem, data: PairedData, seed: int = 0) -> dict[str, float]:
    """Projector distance to S* of the hidden-space estimators (they ignore the dictionary).

    Args:
        problem: the world.
        data: paired hidden states.
        seed: seed of the random complement of "diffmean_completed".

    Returns:
        dict with keys "pca_diff", "diffmean_rank1", "diffmean_completed".

    Example:
        >>> p = make_problem()
        >>> sorted(estimate_direct(p, sample_pairs(p, 64)))
        ['diffmean_completed', 'diffmean_rank1', 'pca_diff']
    """
    r = problem.config.safety_rank
    ha, hu = data.h_aligned, data.h_unaligned
    u = diff_of_means_direction(ha, hu)
    # PCA needs n >= r differences; below that it keeps what it has
    pca = pca_of_differences(ha, hu, min(r, ha.shape[0]))
    return {
        "pca_diff": projector_distance(pca, problem.basis),
        "diffmean_rank1": projector_distance(u, problem.basis),
        "diffmean_completed": projector_distance(complete_basis(u, r, seed), problem.basis),
    }


def estimate_sae(
    problem: SyntheticProblem, data: PairedData, k: int | None = None, variance_threshold: float = 0.99
) -> float:
    """Projector distance to S* of the SAE route with the problem's dictionary.

    Args:
        problem: the world (truth, dictionary, encoder).
        data: paired hidden states.
        k: features kept (default r, the number of safety concepts).
        variance_threshold: tau.

    Returns:
        ||P_hat - P*||_F.

    Example:
        >>> p = make_problem()
        >>> estimate_sae(p, sample_pairs(p, 1024)) < 1e-9
        True
    """
    k = problem.config.safety_rank if k is None else k
    ha, hu = data.h_aligned, data.h_unaligned
    est = sae_subspace(ha, hu, problem.dictionary, problem.encoder, k, variance_threshold)
    return projector_distance(est.basis, problem.basis)


def estimate_all(
    problem: SyntheticProblem,
    data: PairedData,
    k: int | None = None,
    variance_threshold: float = 0.99,
    seed: int = 0,
) -> dict[str, float]:
    """Projector distance to S* of every estimator on one sample (`estimate_sae` + `estimate_direct`).

    Args:
        problem: the world (truth, dictionary, encoder).
        data: paired hidden states.
        k: SAE features kept (default r).
        variance_threshold: tau for the SAE route.
        seed: seed of the random complement of "diffmean_completed".

    Returns:
        dict method -> ||P_hat - P*||_F, keys METHODS.

    Example:
        >>> p = make_problem()
        >>> sorted(estimate_all(p, sample_pairs(p, 64)))
        ['diffmean_completed', 'diffmean_rank1', 'pca_diff', 'sae']
    """
    return {"sae": estimate_sae(problem, data, k, variance_threshold), **estimate_direct(problem, data, seed)}


@dataclass(frozen=True)
class TheoryRow:
    """One measurement of the sweep.

    Attributes:
        method: one of METHODS.
        n_samples: number of pairs.
        entanglement: e of the world.
        polysemanticity: p of the dictionary (None for the hidden-space methods, which do not use it).
        seed: seed of the world, the sample and the completion.
        error: ||P_hat - P*||_F on this sample.
        population_error: the same method's infinite-sample error in this world (`population_errors`).
    """

    method: str
    n_samples: int
    entanglement: float
    polysemanticity: float | None
    seed: int
    error: float
    population_error: float


def sweep(
    sample_sizes: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    entanglements: tuple[float, ...] = (0.0, 0.3, 0.6, 0.9),
    polysemanticities: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
    seeds: tuple[int, ...] = tuple(range(8)),
    config: TheoryConfig | None = None,
    k: int | None = None,
    variance_threshold: float = 0.99,
) -> list[TheoryRow]:
    """Every estimator over sample size x entanglement (x polysemanticity for the SAE route) x seed.

    Per (seed, e) one world and one sample of max(sample_sizes) pairs are drawn, and each n takes the
    first n pairs, so a seed's curve over n is one growing dataset. The draws depend on the seed only.
    The matrices are small: on a busy CPU, torch.set_num_threads(1) makes this several times faster
    (benchmarks/theory.py does so).

    Args:
        sample_sizes: numbers of pairs.
        entanglements: values of e in [0, 1).
        polysemanticities: values of p in [0, 1] for the SAE dictionary.
        seeds: world / sample seeds.
        config: base TheoryConfig (its entanglement and polysemanticity are overridden).
        k: SAE features kept (default r).
        variance_threshold: tau of the SAE route.

    Returns:
        list of TheoryRow.

    Example:
        >>> rows = sweep((16, 64), (0.5,), (0.0,), (0,))
        >>> len(rows)  # 2 n x (1 sae + 3 hidden-space methods)
        8
    """
    config = config or TheoryConfig()
    if not sample_sizes or not all(isinstance(n, int) and n >= 1 for n in sample_sizes):
        raise ValueError(f"sample_sizes: expected positive ints, got {sample_sizes!r}")
    if not entanglements or not polysemanticities or not seeds:
        raise ValueError("entanglements, polysemanticities, seeds: each needs at least one value")
    rows: list[TheoryRow] = []
    n_max = max(sample_sizes)
    for seed in seeds:
        for e in entanglements:
            base = make_problem(replace(config, entanglement=e, polysemanticity=0.0), seed)
            data = sample_pairs(base, n_max, seed)
            problems = [with_polysemanticity(base, p) for p in polysemanticities]
            floors = [population_errors(pr, variance_threshold, seed) for pr in problems]
            for n in sample_sizes:
                part = data.head(n)
                for pr, p, floor in zip(problems, polysemanticities, floors, strict=True):
                    err = estimate_sae(pr, part, k, variance_threshold)
                    rows.append(TheoryRow("sae", n, e, p, seed, err, floor["sae"]))
                for m, err in estimate_direct(base, part, seed).items():
                    rows.append(TheoryRow(m, n, e, None, seed, err, floors[0][m]))
    return rows


@dataclass(frozen=True)
class TheorySummary:
    """Rows of one (method, n, e, p) aggregated over seeds: mean, std (0 for one seed), min, max."""

    method: str
    n_samples: int
    entanglement: float
    polysemanticity: float | None
    n_seeds: int
    error_mean: float
    error_std: float
    error_min: float
    error_max: float
    population_error_mean: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def summarize(rows: list[TheoryRow]) -> list[TheorySummary]:
    """Aggregate sweep rows over seeds, in first-seen order.

    Args:
        rows: output of `sweep`.

    Returns:
        list of TheorySummary.

    Example:
        >>> summarize(sweep((16,), (0.5,), (0.0,), (0, 1)))[0].n_seeds
        2
    """
    groups: dict[tuple, list[TheoryRow]] = {}
    for row in rows:
        groups.setdefault((row.method, row.n_samples, row.entanglement, row.polysemanticity), []).append(row)
    out = []
    for (method, n, e, p), rs in groups.items():
        errs = [r.error for r in rs]
        out.append(
            TheorySummary(
                method=method,
                n_samples=n,
                entanglement=e,
                polysemanticity=p,
                n_seeds=len(rs),
                error_mean=statistics.fmean(errs),
                error_std=statistics.stdev(errs) if len(errs) > 1 else 0.0,
                error_min=min(errs),
                error_max=max(errs),
                population_error_mean=statistics.fmean(r.population_error for r in rs),
            )
        )
    return out
