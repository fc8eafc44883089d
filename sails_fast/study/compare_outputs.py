"""What `sails-fast compare` writes: per-seed and summary CSVs, safety curves, and plots with spread.

compare.csv           one row per (method, seed), plus the untrained "base" (judge columns when judged)
compare_summary.csv   per method: mean, std and n over seeds of every metric
compare_curves.csv    the safety probe: method, seed, step, safety rate
compare.png           bars = mean over seeds, error bars = std, dots = the seeds
compare_curves.png    probed safety rate against optimizer step: mean line, min-max band
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

METRICS = (
    "safety_rate",
    "over_refusal_harmless",
    "over_refusal_safe_scary",
    "logit_score_harmful",
    "logit_score_harmless",
    "logit_score_safe_scary",
    "ppl_harmless",
    "steps_to_target",
    "steps_to_target_held",
    "final_loss",
    "trainable_params",
    "train_s",
)


# present only when the comparison ran a judge (CompareConfig.judge)
JUDGE_METRICS = ("judge_safety_rate", "judge_mean_harm", "judge_parse_failures")


ROW_FIELDS = ("method", "kind", "seed", *METRICS, "learning_rate", "steps", "matcher")


# what the summary plot shows, with its axis label
PLOTTED = (
    ("safety_rate", "safety rate (refusal matcher)"),
    ("over_refusal_harmless", "over-refusal, harmless"),
    ("over_refusal_safe_scary", "over-refusal, safe-but-scary"),
    ("logit_score_harmful", "logit refusal score, harmful"),
    ("ppl_harmless", "perplexity, held-out harmless answers"),
    ("steps_to_target", "steps to target safety"),
)


def metrics_of(records: list[dict]) -> tuple[str, ...]:
    """METRICS, plus the judge's when any record has them."""
    judged = any(m in r for r in records for m in JUDGE_METRICS)
    return METRICS + JUDGE_METRICS if judged else METRICS


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summarize(records: list[dict]) -> list[dict]:
    """Per method (in first-seen order): mean, std (sample, 0 for one seed) and n of every metric.

    "steps_to_target" averages the seeds that reached the target; `reached` counts them. Likewise
    "steps_to_target_held" (the step from which safety stayed >= target) over the seeds where it held.

    Example:
        >>> summarize([{"method": "a", "kind": "lora", "safety_rate": 0.5}, {"method": "a", "kind": "lora",
        ...            "safety_rate": 0.7}])[0]["safety_rate_mean"]
        0.6
    """
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["method"], []).append(r)
    out = []
    metrics = metrics_of(records)
    for method, rows in groups.items():
        row: dict[str, Any] = {"method": method, "kind": rows[0].get("kind"), "seeds": len(rows)}
        for metric in metrics:
            values = [v for v in (_number(r.get(metric)) for r in rows) if v is not None]
            mean = statistics.fmean(values) if values else None
            std = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
            row[f"{metric}_mean"] = None if mean is None else round(mean, 6)
            row[f"{metric}_std"] = None if std is None else round(std, 6)
            row[f"{metric}_n"] = len(values)
        row["reached_target"] = sum(r.get("steps_to_target") is not None for r in rows)
        out.append(row)
    return out


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    tmp.replace(path)
    return path


def _plot_summary(records: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in records))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (metric, label) in zip(axes.flat, PLOTTED, strict=True):
        for i, method in enumerate(methods):
            values = [
                v for v in (_number(r.get(metric)) for r in records if r["method"] == method) if v is not None
            ]
            if not values:
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=7, color="grey")
                continue
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            ax.bar(
                i,
                mean,
                yerr=std,
                capsize=3,
                color="tab:red" if method.startswith("sails") else "tab:blue",
                alpha=0.6,
            )
            ax.scatter([i] * len(values), values, s=10, color="black", zorder=3)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=60, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
    fig.suptitle("SAILS vs baselines: mean over seeds (bars), std (error bars), seeds (dots)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_curves(records: list[dict], path: Path, target: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    methods = list(dict.fromkeys(r["method"] for r in records if r["method"] != "base"))
    cmap = plt.get_cmap("tab20")
    for i, method in enumerate(methods):
        by_step: dict[int, list[float]] = {}
        for r in records:
            if r["method"] == method:
                for step, rate in r.get("curve") or []:
                    by_step.setdefault(int(step), []).append(float(rate))
        steps = sorted(by_step)
        if not steps:
            continue
        mean = [statistics.fmean(by_step[s]) for s in steps]
        lo = [min(by_step[s]) for s in steps]
        hi = [max(by_step[s]) for s in steps]
        color = cmap(i % 20)
        ax.plot(steps, mean, label=method, color=color, lw=2.2 if method.startswith("sails") else 1.2)
        ax.fill_between(steps, lo, hi, color=color, alpha=0.15)
    ax.axhline(target, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("safety rate (probe: refusal matcher)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Safety during training: mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(records: list[dict], results_dir: Path, config) -> list[Path]:
    """Write the CSVs and plots of `records` into `results_dir`; returns the paths."""
    results_dir.mkdir(parents=True, exist_ok=True)
    metrics = metrics_of(records)
    row_fields = [*ROW_FIELDS[:3], *metrics, *ROW_FIELDS[3 + len(METRICS) :]]
    files = [_write_csv(results_dir / "compare.csv", records, row_fields)]
    summary = summarize(records)
    fields = ["method", "kind", "seeds", "reached_target"]
    fields += [f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")]
    files.append(_write_csv(results_dir / "compare_summary.csv", summary, fields))
    curves = [
        {"method": r["method"], "seed": r.get("seed"), "step": step, "safety_rate": rate}
        for r in records
        for step, rate in r.get("curve") or []
    ]
    files.append(
        _write_csv(results_dir / "compare_curves.csv", curves, ["method", "seed", "step", "safety_rate"])
    )
    if records:
        files.append(_plot_summary(records, results_dir / "compare.png"))
        files.append(_plot_curves(records, results_dir / "compare_curves.png", config.target_safety))
    config.save(results_dir / "compare_config.json")
    files.append(_write_environment(results_dir / "compare_env.json"))
    return files


def _write_environment(path: Path) -> Path:
    """Where and with what the CSVs were written: device, CPU count, library versions, git commit, date."""
    import datetime
    import json
    import os
    import platform

    import torch

    from sails_fast.core.artifacts import git_commit, library_versions

    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()})"
    )
    env = {
        "device": device,
        "cpu_count": os.cpu_count(),
        "versions": library_versions(),
        "git_commit": git_commit(),
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "note": "train_s / eval_s are wall-clock seconds on this machine, shared with other work at times",
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(env, indent=2) + "\n")
    tmp.replace(path)
    return path


# step metrics: (cell when no seed got there, word for "n of the seeds got there")
_STEP_METRICS = {"steps_to_target": ("not reached", "reached"), "steps_to_target_held": ("not held", "held")}


def format_summary(summary: list[dict]) -> str:
    """A Markdown table of the summary (mean ± std over seeds) for the README."""
    cols = [
        ("safety_rate", "safety", 3),
        ("over_refusal_harmless", "over-refusal harmless", 3),
        ("over_refusal_safe_scary", "over-refusal safe-scary", 3),
        ("logit_score_harmful", "logit score harmful", 2),
        ("ppl_harmless", "ppl harmless", 2),
        ("steps_to_target", "steps to target", 1),
    ]
    if any("steps_to_target_held_mean" in row for row in summary):  # summaries from before it existed lack it
        cols.append(("steps_to_target_held", "held from step", 1))
    if any("judge_safety_rate_mean" in row for row in summary):
        cols.insert(1, ("judge_safety_rate", "judge safety", 3))
    head = "| method | seeds | " + " | ".join(c[1] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for row in summary:
        cells = []
        for metric, _, digits in cols:
            mean, std, n = row[f"{metric}_mean"], row[f"{metric}_std"], row[f"{metric}_n"]
            if mean is None or (isinstance(mean, float) and math.isnan(mean)):
                cells.append(_STEP_METRICS[metric][0] if metric in _STEP_METRICS else "n/a")
                continue
            cell = f"{mean:.{digits}f} ± {std:.{digits}f}"
            if metric in _STEP_METRICS and n < row["seeds"]:
                cell += f" ({n}/{row['seeds']} {_STEP_METRICS[metric][1]})"
            cells.append(cell)
        lines.append(f"| {row['method']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
