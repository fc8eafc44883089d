"""The report's PNG plots (matplotlib, Agg): feature scores, explained variance, safety before/after, loss,
update shares."""

from __future__ import annotations

import io
import re

import torch

PLOTS = ("feature_scores", "explained_variance", "safety", "loss", "update_in_span")


# ----- plots


def _figure(w: float = 7.0, h: float = 3.6):
    # the object API with an Agg canvas: no global pyplot state, no display needed
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("report: the plots need matplotlib; `pip install matplotlib`") from err

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_feature_scores(selection) -> bytes:
    """PNG: the selected features' scores per layer, in selection order."""
    fig = _figure()
    ax = fig.add_subplot(111)
    for layer, sel in sorted(selection.layers.items()):
        ax.plot(range(1, len(sel.scores) + 1), sel.scores.tolist(), marker="o", ms=3, label=f"layer {layer}")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("rank among selected features")
    ax.set_ylabel(f"score ({selection.config.score})")
    ax.set_title("Selected SAE features: scores")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_explained_variance(subspace) -> bytes:
    """PNG: cumulative explained variance of each basis's SVD, the threshold, and r_S."""
    fig = _figure()
    ax = fig.add_subplot(111)
    for key, b in sorted(subspace.bases.items()):
        cum = torch.cumsum(b.explained.double(), 0).tolist()
        lab = "pooled" if key < 0 else f"layer {key}"
        ax.plot(range(1, len(cum) + 1), cum, marker=".", label=f"{lab} (r_S = {b.n_components})")
        ax.axvline(b.n_components, color="grey", lw=0.5, ls=":")
    thr = getattr(subspace.config, "variance_threshold", None)
    if thr is not None:
        ax.axhline(thr, color="red", lw=0.8, ls="--", label=f"threshold {thr:g}")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("SVD components")
    ax.set_ylabel("cumulative explained variance")
    ax.set_title("Decoder-direction subspace")
    ax.legend(fontsize=8)
    return _png(fig)


def _safety_rows(before, after) -> list[tuple[str, float | None, float | None]]:
    rows = []
    for name in ("harmful", "harmless", "safe_but_scary"):
        b, a = before.sets.get(name), after.sets.get(name)
        if b is None and a is None:
            continue
        what = "refusal" if name == "harmful" else "over-refusal"
        rows.append((f"{name}\n{what}", b and b.refusal_rate, a and a.refusal_rate))
    if before.judge is not None or after.judge is not None:
        rows.append(("judge safety\n(score <= 2)", before.judge and before.judge.safety_rate,
                     after.judge and after.judge.safety_rate))  # fmt: skip
    return rows


def plot_safety(before, after) -> bytes:
    """PNG: refusal rate on harmful prompts, over-refusal, judge safety: before vs after."""
    rows = _safety_rows(before, after)
    fig = _figure()
    ax = fig.add_subplot(111)
    x = list(range(len(rows)))
    nan = lambda v: float("nan") if v is None else v
    for shift, col, lab in ((-0.2, 1, before.label), (0.2, 2, after.label)):
        bars = ax.bar([i + shift for i in x], [nan(r[col]) for r in rows], 0.4, label=lab)
        # printed values: a rate of 0 draws no bar
        ax.bar_label(bars, labels=["-" if r[col] is None else f"{r[col]:.2f}" for r in rows], fontsize=7)
    ax.set_xticks(x, [r[0] for r in rows], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate")
    ax.set_title(f"Safety before / after (matcher {before.matcher.get('id', '?')})")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_loss(log: list[dict]) -> bytes:
    """PNG: loss per logged step, learning rate on a second axis."""
    fig = _figure()
    ax = fig.add_subplot(111)
    steps = [r["step"] for r in log]
    ax.plot(steps, [r["loss"] for r in log], color="C0", marker=".", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (response tokens)")
    if all("lr" in r for r in log):
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in log], color="C1", lw=0.8, label="lr")
        ax2.set_ylabel("learning rate")
    ax.set_title("Training")
    return _png(fig)


def plot_update_shares(shares: dict[str, list[dict]]) -> bytes:
    """PNG: share of dW in span(U) per module (one series per adapter checkpoint), with the r/d baseline."""
    fig = _figure(8, 3.8)
    ax = fig.add_subplot(111)
    names = [s["name"] for s in next(iter(shares.values()))]
    for label, rows in shares.items():
        by = {r["name"]: r["share"] for r in rows}
        ax.plot(range(len(names)), [by.get(n, float("nan")) for n in names], marker="o", ms=3, label=label)
    base = next(iter(shares.values()))
    ax.plot(
        range(len(names)), [r["baseline"] for r in base], color="grey", ls=":", label="random baseline r/d"
    )
    short = [re.sub(r"^.*layers\.", "", n) + f" ({r['side'][0]})" for n, r in zip(names, base, strict=True)]
    ax.set_xticks(range(len(names)), short, rotation=90, fontsize=6)
    ax.set_ylim(-0.02, 1.05)
    ax.set_ylabel("||P_U dW||^2 / ||dW||^2")
    ax.set_title("Share of the trained update inside span(U) (r = read side, w = write side)")
    ax.legend(fontsize=8)
    return _png(fig)
