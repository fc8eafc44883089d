"""The identification theorem on synthetic data (sails_fast.study.theory), at fixed seeds.

Each assertion is a statement derived in docs/theory.md; each tolerance says where its size comes from.
Everything is float64 on CPU and deterministic under the seeds used here.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from sails_fast.study.theory import summarize, sweep
from sails_fast.study.theory_estimators import (
    complete_basis,
    diff_of_means_direction,
    estimate_direct,
    estimate_sae,
    pca_floor_bound,
    pca_of_differences,
    population_errors,
    population_moments,
    projector_distance,
    sae_subspace,
    subspace_from_directions,
)
from sails_fast.study.theory_problem import (
    METHODS,
    PairedData,
    TheoryConfig,
    make_problem,
    sample_pairs,
    with_polysemanticity,
)

F64 = torch.float64
# float64 round-off of a 64 x 64 projector difference (~1e-15 per entry), with a wide margin
EXACT = 1e-9


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # matrices here are at most [16384, 64]: intra-op threads cost more to start than they save, and
    # on a shared 2-core machine they turn seconds into minutes
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def orthonormal(d: int, r: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q


def world(e: float, seed: int, n: int, config: TheoryConfig | None = None):
    from dataclasses import replace

    problem = make_problem(replace(config or TheoryConfig(), entanglement=e), seed)
    return problem, sample_pairs(problem, n, seed)


# ---- the projector distance


def test_projector_distance_identities():
    d, r = 20, 5
    u = orthonormal(d, r, 0)
    assert projector_distance(u, u) < EXACT
    # the distance depends on the subspace only, not on its basis
    rot = orthonormal(r, r, 1)
    assert projector_distance(u @ rot, u) < EXACT
    # a rank-1 estimate inside the r-dim subspace sits at exactly sqrt(r - 1)
    assert projector_distance(u[:, :1], u) == pytest.approx(math.sqrt(r - 1), abs=EXACT)
    # orthogonal subspaces of ranks a and b: sqrt(a + b)
    assert projector_distance(u[:, :2], u[:, 2:]) == pytest.approx(math.sqrt(5), abs=EXACT)
    # the trace form sqrt(a + b - 2 ||U^T W||_F^2), and symmetry
    w = orthonormal(d, 3, 2)
    trace_form = math.sqrt(r + 3 - 2 * float((u.T @ w).pow(2).sum()))
    assert projector_distance(u, w) == pytest.approx(trace_form, abs=1e-7)
    assert projector_distance(w, u) == pytest.approx(projector_distance(u, w), abs=EXACT)


def test_rank1_identity_every_unit_vector():
    # ||uu^T - P*||_F^2 = r - 1 + 2 ||(I - P*) u||^2 >= r - 1, for any unit u
    d, r = 12, 4
    basis = orthonormal(d, r, 3)
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        x = torch.randn(d, 1, generator=g, dtype=F64)
        x = x / x.norm()
        off = x - basis @ (basis.T @ x)
        identity = r - 1 + 2 * float(off.pow(2).sum())
        assert projector_distance(x, basis) ** 2 == pytest.approx(identity, abs=1e-9)
        assert projector_distance(x, basis) >= math.sqrt(r - 1) - EXACT


def test_projector_distance_rejects_bad_input():
    u = orthonormal(8, 2, 0)
    with pytest.raises(ValueError, match="basis_hat"):
        projector_distance(2 * u, u)
    with pytest.raises(ValueError, match="basis_true"):
        projector_distance(u, u + 0.1)
    with pytest.raises(ValueError, match="basis_hat"):
        projector_distance(orthonormal(9, 2, 0), u)
    with pytest.raises(ValueError, match="basis_hat"):
        projector_distance(torch.ones(8), u)


# ---- rank-1 difference of means: the sqrt(r - 1) floor


@pytest.mark.parametrize("e", [0.0, 0.5, 0.9])
def test_rank1_floor_holds_at_every_sample_size(e):
    floor = math.sqrt(3)
    for seed in range(4):
        problem, data = world(e, seed, 4096)
        errs = [estimate_direct(problem, data.head(n), seed)["diffmean_rank1"] for n in (8, 64, 512, 4096)]
        # a deterministic inequality: no sample size gets below the floor
        assert min(errs) >= floor - EXACT, errs
        # more data moves it towards the floor, never past it
        assert errs[-1] < errs[0], errs
        # the population mean difference lies in S*, so its error is the floor itself
        assert population_errors(problem)["diffmean_rank1"] == pytest.approx(floor, abs=EXACT)


@pytest.mark.parametrize(
    "config",
    [
        TheoryConfig(entanglement=0.5),
        TheoryConfig(hidden_dim=16, safety_rank=2, n_unrelated=8, entanglement=0.5),
        TheoryConfig(hidden_dim=48, safety_rank=6, n_unrelated=24, entanglement=0.5),
    ],
    ids=["r4_d64", "r2_d16", "r6_d48"],
)
def test_rank1_converges_to_floor_at_the_predicted_rate(config):
    # err^2 - (r - 1) = 2 ||Q eps||^2 / ||mu + eps||^2 with eps the error of the mean difference
    # (covariance C / n) and Q = I - P*: expected 2 tr(QCQ) / (n ||mu||^2). Its relative spread per seed
    # is sqrt(2 / k_eff), k_eff = tr(QCQ)^2 / tr((QCQ)^2) (a chi-square with k_eff degrees of freedom);
    # the mean ratio over S seeds must be 1 within 4 of its standard deviations sqrt(2 / (S k_eff)).
    r, n, seeds = config.safety_rank, 4096, range(8)
    ratios = []
    for seed in seeds:
        problem, data = world(config.entanglement, seed, n, config)
        err = estimate_direct(problem, data, seed)["diffmean_rank1"]
        mean, cov = population_moments(problem)
        q = torch.eye(config.hidden_dim, dtype=F64) - problem.basis @ problem.basis.T
        qcq = q @ cov @ q
        predicted = 2 * float(torch.trace(qcq)) / (n * float(mean.norm()) ** 2)
        k_eff = float(torch.trace(qcq)) ** 2 / float(torch.trace(qcq @ qcq))
        assert err**2 - (r - 1) > 0
        ratios.append((err**2 - (r - 1)) / predicted)
    tol = 4 * math.sqrt(2 / (len(ratios) * k_eff))
    assert abs(statistics.fmean(ratios) - 1) < tol, (ratios, tol)


def test_random_completion_is_worse_than_rank1():
    # with u in S*, a random (r-1)-dim complement in u's orthogonal complement gives
    # E err^2 = 2 (r - 1) (1 - (r - 1) / (d - 1)); per seed err^2 has std ~0.13 here (2x the std of a sum
    # of (r-1)^2 squared N(0, 1/(d-1)) entries), so 0.15 on the mean of 16 is ~4.5 of its std
    r, d = 4, 64
    expected = 2 * (r - 1) * (1 - (r - 1) / (d - 1))
    sq = []
    for seed in range(16):
        problem, data = world(0.5, seed, 4096)
        errs = estimate_direct(problem, data, seed)
        assert errs["diffmean_completed"] > errs["diffmean_rank1"]
        sq.append(errs["diffmean_completed"] ** 2)
    assert statistics.fmean(sq) == pytest.approx(expected, abs=0.15)


# ---- the SAE route


@pytest.mark.parametrize("e", [0.0, 0.5, 0.9])
def test_sae_error_vanishes_with_monosemantic_atoms(e):
    r = 4
    small, large = [], []
    for seed in range(8):
        problem, data = world(e, seed, 1024)
        small.append(estimate_sae(problem, data.head(8)))
        large.append(estimate_sae(problem, data))
        est = sae_subspace(data.h_aligned, data.h_unaligned, problem.dictionary, problem.encoder, k=r)
        assert sorted(est.feature_ids.tolist()) == list(range(r))
        # the default tau keeps all r directions of r near-orthogonal atoms
        assert est.basis.shape == (problem.config.hidden_dim, r)
        assert population_errors(problem)["sae"] < EXACT
    # with 8 pairs the top-k selection still picks unrelated features on some seeds
    assert statistics.fmean(small) > 0.3, small
    # with 1024 it picks the safety atoms, whose span is S* itself: zero up to round-off
    assert max(large) < EXACT, large


def test_sae_degrades_with_polysemantic_atoms():
    ps = (0.25, 0.5, 0.75)
    for seed in range(4):
        base, data = world(0.5, seed, 4096)
        floors = []
        for p in ps:
            problem = with_polysemanticity(base, p)
            floor = population_errors(problem)["sae"]
            # the selection is right, so the error is the tilted atoms' floor, not a sampling effect
            assert estimate_sae(problem, data) == pytest.approx(floor, abs=EXACT)
            floors.append(floor)
        assert floors[0] > 0.3 and floors[0] < floors[1] < floors[2], floors


@pytest.mark.parametrize("p", [0.25, 0.5, 1.0])
def test_sae_polysemantic_floor_matches_closed_form(p):
    # e = 0: atom s is cos(phi) v_s + sin(phi) w_s with w_s orthogonal to S*; the principal angles to S*
    # satisfy cos(theta_i) = cos(phi) / sqrt(cos^2 phi + sin^2 phi mu_i), mu_i the eigenvalues of the
    # partners' Gram matrix, and the error is sqrt(2 sum sin^2 theta_i) (docs/theory.md)
    r, phi = 4, p * math.pi / 4
    for seed in range(3):
        problem = with_polysemanticity(make_problem(TheoryConfig(entanglement=0.0), seed), p)
        w = problem.concepts[problem.partner]
        mu = torch.linalg.eigvalsh(w @ w.T)
        cos2 = math.cos(phi) ** 2 / (math.cos(phi) ** 2 + math.sin(phi) ** 2 * mu)
        closed = math.sqrt(float(2 * (1 - cos2).sum()))
        assert population_errors(problem)["sae"] == pytest.approx(closed, abs=EXACT)
        # near-orthogonal partners: close to sqrt(2 r) sin(phi)
        assert closed == pytest.approx(math.sqrt(2 * r) * math.sin(phi), rel=0.05)


# ---- PCA of differences


def test_pca_consistent_without_entanglement():
    for seed in range(3):
        problem, data = world(0.0, seed, 16384)
        assert population_errors(problem)["pca_diff"] < EXACT
        assert pca_floor_bound(problem) < EXACT
        errs = [estimate_direct(problem, data.head(n), seed)["pca_diff"] for n in (256, 16384)]
        # a 1/sqrt(n) rate: 64x the data, ~8x less error; 4x leaves room for the constant
        assert errs[1] < errs[0] / 4, errs


@pytest.mark.parametrize("e", [0.25, 0.5, 0.75, 0.9])
def test_pca_floor_with_entanglement(e):
    for seed in range(3):
        problem, data = world(e, seed, 16384)
        floor = population_errors(problem)["pca_diff"]
        # entanglement couples S* with its complement: a floor above zero, under the Davis-Kahan bound,
        # and (in this world) under the rank-1 floor
        assert 0.2 < floor <= pca_floor_bound(problem) and floor < math.sqrt(3), floor
        # the sample estimate sits on that floor: at e = 0 the same estimator's whole error at this n is
        # ~0.1 with a smaller eigengap, so sampling moves it less than 0.05 here
        assert estimate_direct(problem, data, seed)["pca_diff"] == pytest.approx(floor, abs=0.05)


def test_ordering_at_large_n():
    # what the sweep shows at e = 0.5: SAE (monosemantic) < PCA of differences < rank-1 < completed
    for seed in range(4):
        problem, data = world(0.5, seed, 4096)
        errs = {"sae": estimate_sae(problem, data), **estimate_direct(problem, data, seed)}
        assert errs["sae"] < errs["pca_diff"] < errs["diffmean_rank1"] < errs["diffmean_completed"], errs


# ---- the generator and the building blocks


def test_population_moments_match_samples():
    # relative error of a mean of n draws ~ sqrt(tr C / n) / ||mu||; of a covariance (Gaussian
    # approximation) ~ sqrt((tr C^2 + ||C||_F^2) / n) / ||C||_F: both asserted within 3x
    problem, data = world(0.5, 0, 20000)
    delta = data.h_aligned - data.h_unaligned
    mean, cov = population_moments(problem)
    n = delta.shape[0]
    mean_tol = 3 * math.sqrt(float(torch.trace(cov)) / n) / float(mean.norm())
    cov_fro = float(torch.linalg.matrix_norm(cov))
    cov_tol = 3 * math.sqrt((float(torch.trace(cov)) ** 2 + cov_fro**2) / n) / cov_fro
    assert float((delta.mean(0) - mean).norm() / mean.norm()) < mean_tol
    assert float(torch.linalg.matrix_norm(torch.cov(delta.T) - cov)) / cov_fro < cov_tol
    # only the safety concepts change rate between the classes
    za, zu = data.z_aligned.mean(0), data.z_unaligned.mean(0)
    assert (za[:4] - zu[:4]).abs().min() > 0.2 and (za[4:] - zu[4:]).abs().max() < 0.02


def test_world_structure():
    config = TheoryConfig(entanglement=0.6)
    problem = make_problem(config, 5)
    basis, v = problem.basis, problem.concepts
    r = config.safety_rank
    assert projector_distance(v[:r].T.contiguous(), basis) < EXACT
    assert torch.allclose(v.norm(dim=1), torch.ones(v.shape[0], dtype=F64))
    # every unrelated direction has exactly e of its norm inside S*
    inside = (v[r:] @ basis).norm(dim=1)
    assert torch.allclose(inside, torch.full_like(inside, 0.6))
    # the encoder unmixes a monosemantic dictionary exactly
    z = torch.rand(7, v.shape[0], generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.allclose(z @ v @ problem.encoder, z, atol=1e-10)
    # the same seed is the same world at another entanglement
    other = make_problem(TheoryConfig(entanglement=0.1), 5)
    assert torch.equal(other.basis, basis) and torch.equal(other.partner, problem.partner)


def test_pca_matches_svd_of_differences():
    problem, data = world(0.5, 1, 300)
    delta = data.h_aligned - data.h_unaligned
    _, _, vh = torch.linalg.svd(delta, full_matrices=False)
    ours = pca_of_differences(data.h_aligned, data.h_unaligned, 4)
    assert projector_distance(ours, vh[:4].T.contiguous()) < 1e-8
    centred = pca_of_differences(data.h_aligned, data.h_unaligned, 4, center=True)
    _, _, vh_c = torch.linalg.svd(delta - delta.mean(0), full_matrices=False)
    assert projector_distance(centred, vh_c[:4].T.contiguous()) < 1e-8


def test_subspace_from_directions_threshold_and_rank():
    eye = torch.eye(5, dtype=F64)
    assert subspace_from_directions(eye[:3], 0.6).shape == (5, 2)
    assert subspace_from_directions(eye[:3], 1.0).shape == (5, 3)
    # METHOD's tau = 0.8 keeps only 4 of 5 orthonormal atoms: why the theory defaults to 0.99
    assert subspace_from_directions(eye, 0.8).shape == (5, 4)
    assert subspace_from_directions(eye[:4], 0.8).shape == (5, 4)
    # rows of any norm give the same span; rank pads with orthonormal directions or truncates
    padded = subspace_from_directions(3.0 * eye[:2], 1.0, rank=4)
    assert padded.shape == (5, 4)
    assert torch.allclose(padded.T @ padded, torch.eye(4, dtype=F64), atol=1e-12)
    assert projector_distance(padded[:, :2], eye[:, :2]) < EXACT
    assert subspace_from_directions(eye[:3], 1.0, rank=1).shape == (5, 1)


def test_complete_basis_is_orthonormal_and_keeps_the_input():
    u = orthonormal(10, 2, 0)
    full = complete_basis(u, 6, seed=3)
    assert torch.equal(full[:, :2], u)
    assert torch.allclose(full.T @ full, torch.eye(6, dtype=F64), atol=1e-12)
    assert torch.equal(full, complete_basis(u, 6, seed=3))


def test_sweep_rows_summary_and_determinism():
    kw = dict(sample_sizes=(16, 64), entanglements=(0.0, 0.5), polysemanticities=(0.0, 0.5), seeds=(0, 1))
    rows = sweep(**kw)
    # per (seed, e, n): one SAE row per p and one row per hidden-space method
    assert len(rows) == 2 * 2 * 2 * (2 + len(METHODS) - 1)
    assert rows == sweep(**kw)
    assert {r.method for r in rows} == set(METHODS)
    assert all((r.polysemanticity is None) == (r.method != "sae") for r in rows)
    summary = summarize(rows)
    assert len(summary) == len(rows) // 2 and all(s.n_seeds == 2 for s in summary)
    s = next(s for s in summary if (s.method, s.n_samples, s.entanglement) == ("diffmean_rank1", 64, 0.5))
    errs = [r.error for r in rows if (r.method, r.n_samples, r.entanglement) == ("diffmean_rank1", 64, 0.5)]
    assert s.error_mean == pytest.approx(statistics.fmean(errs)) and s.error_max == max(errs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"hidden_dim": 1}, "hidden_dim"),
        ({"safety_rank": 0}, "safety_rank"),
        ({"n_unrelated": 2}, "n_unrelated"),
        ({"n_unrelated": 61}, "n_unrelated"),
        ({"entanglement": 1.0}, "entanglement"),
        ({"polysemanticity": 1.5}, "polysemanticity"),
        ({"safety_shift": (0.5, 0.5)}, "safety_shift"),
        ({"safety_rate": 0.9}, "safety_rate"),
        ({"unrelated_rate": 0.0}, "unrelated_rate"),
        ({"noise": -1.0}, "noise"),
    ],
)
def test_config_rejects_bad_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TheoryConfig(**kwargs)


def test_estimators_reject_bad_input():
    problem, data = world(0.5, 0, 32)
    ha, hu = data.h_aligned, data.h_unaligned
    with pytest.raises(ValueError, match="k"):
        sae_subspace(ha, hu, problem.dictionary, problem.encoder, k=0)
    with pytest.raises(ValueError, match="encoder"):
        sae_subspace(ha, hu, problem.dictionary, problem.encoder[:, :-1], k=4)
    with pytest.raises(ValueError, match="decoder"):
        sae_subspace(ha, hu, problem.dictionary[:, :-1], problem.encoder, k=4)
    with pytest.raises(ValueError, match="h_unaligned"):
        pca_of_differences(ha, hu[:-1], 4)
    with pytest.raises(ValueError, match="rank"):
        pca_of_differences(ha, hu, 65)
    with pytest.raises(ValueError, match="h_unaligned"):
        diff_of_means_direction(ha, hu[:, :-1])
    with pytest.raises(ValueError, match="h_aligned"):
        diff_of_means_direction(ha, ha.clone())
    with pytest.raises(ValueError, match="variance_threshold"):
        subspace_from_directions(ha[:3], 0.0)
    with pytest.raises(ValueError, match="rank"):
        complete_basis(orthonormal(6, 3, 0), 2)
    with pytest.raises(ValueError, match="n"):
        sample_pairs(problem, 0)
    with pytest.raises(ValueError, match="n"):
        PairedData(ha, hu, data.z_aligned, data.z_unaligned).head(33)
    with pytest.raises(ValueError, match="polysemanticity"):
        with_polysemanticity(problem, -0.1)
