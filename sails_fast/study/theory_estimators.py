"""The estimators compared by the theory check (difference of means, PCA of differences, SAE features) and
their population errors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sails_fast.study.theory_problem import (
    _MAG_MEAN,
    _MAG_SQ,
    DTYPE,
    PairedData,
    SyntheticProblem,
    _check_pair,
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
