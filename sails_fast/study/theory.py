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
    >>> from sails_fast.study.theory import TheoryConfig, make_problem, sample_pairs, estimate_all
    >>> problem = make_problem(TheoryConfig(entanglement=0.6), seed=0)
    >>> data = sample_pairs(problem, 2048, seed=0)
    >>> errs = estimate_all(problem, data, seed=0)
    >>> errs["sae"] < 1e-9 and errs["diffmean_rank1"] >= 3**0.5
    True
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, replace

from sails_fast.study.theory_estimators import estimate_direct, estimate_sae, population_errors
from sails_fast.study.theory_problem import TheoryConfig, make_problem, sample_pairs, with_polysemanticity


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
