"""The paper's identification theorem on synthetic data: sweep, CSV, plot and a printed table.

Runs `sails_fast.study.theory.sweep` (every estimator over sample size x entanglement x polysemanticity
x seed, CPU, float64), writes the per-configuration summary over seeds to benchmarks/results/theory.csv
(with the device, versions and commit) and a three-panel figure to benchmarks/results/theory.png.

    python benchmarks/theory.py              # the committed run (16 seeds, ~15-30 s on 2 cores)
    python benchmarks/theory.py --seeds 4    # quicker
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import platform
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import torch

from sails_fast.study.theory import TheorySummary, summarize, sweep
from sails_fast.study.theory_problem import TheoryConfig

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
ENTANGLEMENTS = (0.0, 0.25, 0.5, 0.75, 0.9)
POLYSEMANTICITIES = (0.0, 0.25, 0.5, 0.75, 1.0)
# the entanglement of the sample-size panel and table
E_SHOWN = 0.5
LABELS = {
    "sae": "SAE route",
    "pca_diff": "PCA of differences (rank r)",
    "diffmean_rank1": "difference of means (rank 1)",
    "diffmean_completed": "difference of means + random complement (rank r)",
}


def environment() -> dict[str, str]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit or "unknown",
        "device": f"CPU {cpu}",
        "torch": torch.__version__,
    }


def find(summary: list[TheorySummary], method: str, n: int, e: float, p: float | None) -> TheorySummary:
    for s in summary:
        if (s.method, s.n_samples, s.entanglement, s.polysemanticity) == (method, n, e, p):
            return s
    raise KeyError((method, n, e, p))


def write_csv(summary: list[TheorySummary], config: TheoryConfig, path: Path) -> None:
    env = environment()
    setting = {
        "hidden_dim": config.hidden_dim,
        "safety_rank": config.safety_rank,
        "n_unrelated": config.n_unrelated,
        "noise": config.noise,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        rows = [{**s.to_dict(), **setting, **env} for s in summary]
        for row in rows:
            row["polysemanticity"] = "" if row["polysemanticity"] is None else row["polysemanticity"]
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def print_tables(summary: list[TheorySummary], r: int) -> None:
    floor = math.sqrt(r - 1)
    cols = [
        ("sae", 0.0),
        ("sae", 0.5),
        ("pca_diff", None),
        ("diffmean_rank1", None),
        ("diffmean_completed", None),
    ]
    heads = ["SAE p=0", "SAE p=0.5", "PCA diff", "diffmean r1", "diffmean+rand"]
    print(
        f"\n||P_hat - P*||_F vs pairs, entanglement e={E_SHOWN} (mean +- std over seeds); "
        f"sqrt(r-1)={floor:.4f}"
    )
    print(f"{'pairs':>6} " + " ".join(f"{h:>17}" for h in heads))
    for n in SAMPLE_SIZES:
        cells = []
        for m, p in cols:
            s = find(summary, m, n, E_SHOWN, p)
            cells.append(f"{s.error_mean:8.4f} +- {s.error_std:6.4f}")
        print(f"{n:>6} " + " ".join(cells))
    n = SAMPLE_SIZES[-1]
    print(f"\nat {n} pairs: measured mean (population floor) vs entanglement e, SAE by polysemanticity p")
    heads = [f"SAE p={p}" for p in POLYSEMANTICITIES] + ["PCA diff", "diffmean r1", "diffmean+rand"]
    print(f"{'e':>5} " + " ".join(f"{h:>16}" for h in heads))
    for e in ENTANGLEMENTS:
        cells = []
        for m, p in [("sae", p) for p in POLYSEMANTICITIES] + cols[2:]:
            s = find(summary, m, n, e, p)
            cells.append(f"{s.error_mean:7.4f} ({s.population_error_mean:6.4f})")
        print(f"{e:>5} " + " ".join(cells))


def plot(summary: list[TheorySummary], r: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = math.sqrt(r - 1)
    colors = {"sae": "C0", "pca_diff": "C2", "diffmean_rank1": "C3", "diffmean_completed": "C1"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))

    ax = axes[0]
    curves = [("sae", 0.0, "-"), ("sae", 0.5, "--"), ("pca_diff", None, "-")]
    curves += [("diffmean_rank1", None, "-"), ("diffmean_completed", None, "-")]
    for m, p, style in curves:
        ss = [find(summary, m, n, E_SHOWN, p) for n in SAMPLE_SIZES]
        label = LABELS[m] + (f", p={p}" if p is not None else "")
        ax.plot(
            SAMPLE_SIZES, [s.error_mean for s in ss], style, color=colors[m], marker="o", ms=3, label=label
        )
        ax.fill_between(
            SAMPLE_SIZES, [s.error_min for s in ss], [s.error_max for s in ss], color=colors[m], alpha=0.15
        )
    ax.axhline(floor, color="k", lw=0.8, ls=":", label=f"sqrt(r-1) = {floor:.3f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("pairs (aligned, unaligned)")
    ax.set_ylabel("||P_hat - P*||_F")
    ax.set_title(f"error vs sample size, entanglement e={E_SHOWN}\n(band: min-max over seeds)", fontsize=10)
    ax.set_ylim(0, 3.3)
    ax.legend(fontsize=7, loc="upper right", ncol=2, framealpha=0.95)

    ax = axes[1]
    n = SAMPLE_SIZES[-1]
    for m, p in [("sae", 0.0), ("pca_diff", None), ("diffmean_rank1", None), ("diffmean_completed", None)]:
        ss = [find(summary, m, n, e, p) for e in ENTANGLEMENTS]
        ax.plot(ENTANGLEMENTS, [s.error_mean for s in ss], "-o", color=colors[m], ms=3, label=LABELS[m])
        ax.plot(ENTANGLEMENTS, [s.population_error_mean for s in ss], ":", color=colors[m], lw=1)
        ax.fill_between(
            ENTANGLEMENTS, [s.error_min for s in ss], [s.error_max for s in ss], color=colors[m], alpha=0.15
        )
    ax.axhline(floor, color="k", lw=0.8, ls=":")
    ax.set_xlabel("entanglement e = ||P* v_unrelated||")
    ax.set_title(f"error at {n} pairs vs entanglement\n(dotted: population floor)", fontsize=10)
    ax.legend(fontsize=7, loc="center right", framealpha=0.95)

    ax = axes[2]
    for i, e in enumerate(ENTANGLEMENTS):
        ss = [find(summary, "sae", n, e, p) for p in POLYSEMANTICITIES]
        color = plt.cm.viridis(i / max(len(ENTANGLEMENTS) - 1, 1))
        means = [s.error_mean for s in ss]
        ax.plot(POLYSEMANTICITIES, means, "-o", color=color, ms=3, label=f"SAE route, e={e}")
        ax.plot(POLYSEMANTICITIES, [s.population_error_mean for s in ss], ":", color=color, lw=1)
    ax.axhline(floor, color="k", lw=0.8, ls=":", label="rank-1 floor sqrt(r-1)")
    ax.set_xlabel("polysemanticity p (atom rotated by p * pi/4 to an unrelated concept)")
    title = f"SAE route at {n} pairs vs polysemanticity\n(dotted: floor of the tilted safety atoms)"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")

    fig.suptitle(
        "Safety-subspace recovery on synthetic data with a known r-dim subspace (r = 4, d = 64): "
        "||P_hat - P*||_F, lower is better"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=16, help="number of seeds (worlds and samples)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for theory.csv and theory.png")
    args = parser.parse_args()
    if args.seeds < 1:
        raise ValueError(f"--seeds: expected an int >= 1, got {args.seeds}")
    # the matrices are at most [8192, 64]: threads cost more to start than they save
    torch.set_num_threads(1)
    config = TheoryConfig()
    t0 = time.perf_counter()
    rows = sweep(SAMPLE_SIZES, ENTANGLEMENTS, POLYSEMANTICITIES, tuple(range(args.seeds)), replace(config))
    elapsed = time.perf_counter() - t0
    summary = summarize(rows)
    write_csv(summary, config, args.out / "theory.csv")
    plot(summary, config.safety_rank, args.out / "theory.png")
    print(
        f"sweep: {len(rows)} measurements, {args.seeds} seeds, {elapsed:.1f} s on CPU; "
        f"world d={config.hidden_dim}, r={config.safety_rank}, q={config.n_unrelated} unrelated concepts, "
        f"noise={config.noise}"
    )
    print_tables(summary, config.safety_rank)
    print(f"\nwrote {args.out / 'theory.csv'} and {args.out / 'theory.png'}")


if __name__ == "__main__":
    main()
