"""The interpretability report of a run directory: one self-contained HTML file plus its plots as PNG.

`report(run_dir)` reads what the pipeline left in `run_dir` and writes `run_dir/report/report.html` (plots
embedded as base64, so the one file opens anywhere) and the same plots as PNG beside it:

    feature_scores.png      the selected features' scores per SAE layer, best first
    explained_variance.png  cumulative explained variance of the decoder-direction SVD per basis
    safety.png              refusal / over-refusal (and judge safety) before and after training
    loss.png                training loss (and learning rate) per step
    update_in_span.png      the share of each trained update dW inside span(U), per LoRA module

Each selected feature is listed with its id, layer, score, class means, frequencies and the response
snippets where it fires most. FeatureStats keeps, per class and feature, the stream index of the token with
the largest activation (`act_argmax`); a `TokenMap` (saved by the collect step as
`stats/token_map.safetensors`, or rebuilt here from `pairs.jsonl` when a tokenizer is given) turns that index
back into (example, position) and the text around it. Anything missing is skipped with a note in the report.

Share of the update in span(U). For a LoRA module with A [r, d_in], B [d_out, r] and scaling s,
dW = s B A [d_out, d_in], and P_U = U U^T for the basis U [d, r_U] that initialised it (orthonormal):

    read side  (the module reads the residual stream, d_in = d):   share = ||dW P_U||_F^2 / ||dW||_F^2
    write side (the module writes the residual stream, d_out = d): share = ||P_U dW||_F^2 / ||dW||_F^2

Read side: how much of the update's input directions (its row space, the columns' index) lie in span(U);
write side: how much of what it writes (its column space, the rows' index) does. Both are 1 for an update
entirely inside span(U), and about r_U / d in expectation for an isotropic random update (the baseline
printed beside them). s cancels. At SAILS init a read module has A = U^T, so its share starts at exactly 1.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TOKEN_MAP_FORMAT = "sails_fast.TokenMap"
TOKEN_MAP_VERSION = 1
PLOTS = ("feature_scores", "explained_variance", "safety", "loss", "update_in_span")
CLASS_NAMES = ("aligned", "unaligned")


# ----- token index -> (example, position)


@dataclass
class TokenMap:
    """The stream of response tokens that `collect_feature_stats` fed the SAE, in order.

    Attributes:
        offsets [E + 1] int64: example e's response tokens are stream indices offsets[e] .. offsets[e+1]-1.
        pair_index [E] int64: the pair each example came from.
        label [E] int64: 0 aligned, 1 unaligned.
        tokens [T] int64: the response token ids, T = offsets[-1] = FeatureStats.tokens_seen.

    Example:
        >>> tm = build_token_map(tok, pairs, CollectConfig())
        >>> tm.locate(int(stats.act_argmax[0, 123]))     # (example, position in its response)
    """

    offsets: torch.Tensor
    pair_index: torch.Tensor
    label: torch.Tensor
    tokens: torch.Tensor

    def __post_init__(self) -> None:
        E = self.pair_index.shape[0]
        for name, shape in (("offsets", (E + 1,)), ("label", (E,)), ("tokens", (int(self.offsets[-1]),))):
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != torch.int64:
                raise ValueError(f"{name}: expected {list(shape)} int64, got {list(t.shape)} {t.dtype}")
        if E and bool((self.offsets[1:] < self.offsets[:-1]).any()):
            raise ValueError("offsets: expected a non-decreasing sequence")

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(example, position within its response) of stream token `index`."""
        if not 0 <= index < self.num_tokens:
            raise ValueError(f"index: expected a stream index in [0, {self.num_tokens}), got {index}")
        e = int(torch.searchsorted(self.offsets, torch.tensor(index), right=True)) - 1
        return e, index - int(self.offsets[e])

    def snippet(self, tokenizer, index: int, context: int = 8) -> tuple[str, str, str]:
        """(text before, the token, text after) around stream token `index`, within its response."""
        e, _ = self.locate(index)
        lo, hi = int(self.offsets[e]), int(self.offsets[e + 1])
        dec = lambda a, b: tokenizer.decode(self.tokens[a:b].tolist()) if b > a else ""
        return (
            dec(max(lo, index - context), index),
            dec(index, index + 1),
            dec(index + 1, min(hi, index + 1 + context)),
        )

    def save(self, path: str | Path) -> Path:
        """Write safetensors with a small JSON header, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {k: getattr(self, k).contiguous() for k in ("offsets", "pair_index", "label", "tokens")}
        header = {"format": TOKEN_MAP_FORMAT, "version": TOKEN_MAP_VERSION}
        save_file(tensors, str(tmp), {"header": json.dumps(header)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TokenMap:
        """Read a file written by `save`; ValueError naming the path when it is not one."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = json.loads((f.metadata() or {}).get("header", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            if header.get("format") != TOKEN_MAP_FORMAT or header.get("version") != TOKEN_MAP_VERSION:
                raise ValueError(f"header {header}")
            return cls(**tensors)
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise ValueError(f"path: {path} is not a readable TokenMap ({err})") from err


def build_token_map(tokenizer, pairs: Sequence, config) -> TokenMap:
    """The TokenMap of `collect_feature_stats(model, tokenizer, saes, pairs, config)`.

    Uses the collect step's own example order and tokenisation (`tokenize_example`, truncation included),
    so stream index i here is stream index i there.

    Args:
        tokenizer: the tokenizer given to collect_feature_stats.
        pairs: the same ContrastivePair records, in the same order.
        config: the same CollectConfig (chat_template, max_length).

    Returns:
        TokenMap with T = the FeatureStats' tokens_seen.

    Example:
        >>> build_token_map(tok, pairs, cfg).save(run_dir / "stats" / "token_map.safetensors")
    """
    import warnings

    from .collect import _examples, tokenize_example

    offsets, pair_index, label, tokens = [0], [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for prompt, response, lab, i in _examples(pairs):
            ids, n_prompt, _ = tokenize_example(
                tokenizer, prompt, response, chat_template=config.chat_template, max_length=config.max_length
            )
            resp = ids[n_prompt:]
            tokens += resp
            offsets.append(offsets[-1] + len(resp))
            pair_index.append(i)
            label.append(lab)
    as_t = lambda x: torch.tensor(x, dtype=torch.int64)
    return TokenMap(as_t(offsets), as_t(pair_index), as_t(label), as_t(tokens))


# ----- share of the update in span(U)


def update_in_span(A: torch.Tensor, B: torch.Tensor, U: torch.Tensor, side: str) -> float:
    """Share of dW = B A inside span(U) on the given side (definition in the module docstring).

    Args:
        A: [r, d_in] lora_A weight. B: [d_out, r] lora_B weight.
        U: [d, r_U] orthonormal basis; d = d_in for side "read", d = d_out for side "write".
        side: "read" (||dW U U^T||^2 / ||dW||^2) or "write" (||U U^T dW||^2 / ||dW||^2).

    Returns:
        float in [0, 1]; NaN when dW = 0 (e.g. B = 0 before training).

    Example:
        >>> U = torch.linalg.qr(torch.randn(64, 4)).Q
        >>> update_in_span(U.T, torch.randn(32, 4), U, "read")     # A = U^T: 1.0
    """
    A, B, U = A.double(), B.double(), U.double()
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"A, B: expected [r, d_in] and [d_out, r], got {list(A.shape)} and {list(B.shape)}")
    # ||B A||_F^2 = tr((B^T B)(A A^T)): never forms the [d_out, d_in] product
    total = float(((B.T @ B) * (A @ A.T)).sum())
    if side == "read":
        if U.shape[0] != A.shape[1]:
            raise ValueError(f"U: expected {A.shape[1]} rows (d_in) for a read module, got {U.shape[0]}")
        inside = float(((B @ (A @ U)) ** 2).sum())
    elif side == "write":
        if U.shape[0] != B.shape[0]:
            raise ValueError(f"U: expected {B.shape[0]} rows (d_out) for a write module, got {U.shape[0]}")
        inside = float((((U.T @ B) @ A) ** 2).sum())
    else:
        raise ValueError(f"side: expected 'read' or 'write', got {side!r}")
    return inside / total if total > 0 else float("nan")


def adapter_update_shares(
    adapter: dict[str, torch.Tensor], modules: Sequence[dict], bases: dict
) -> list[dict]:
    """`update_in_span` of every initialised module of a saved PEFT adapter.

    Args:
        adapter: the adapter state dict (keys "<module>.lora_A.weight" / ".lora_B.weight", PEFT's format).
        modules: the init report's modules: dicts with "name", "side", "basis", "block".
        bases: basis key -> U [d, r_U] (Subspace.bases[key].U).

    Returns:
        list of {"name", "block", "side", "basis", "share", "baseline" (r_U / d), "norm" (||B A||_F)}.

    Example:
        >>> adapter_update_shares(load_file("adapter_model.safetensors"), init["modules"], {10: U10})
    """
    out = []
    for m in modules:
        name = m["name"]
        # PEFT drops the adapter name from the saved keys; match on the module path suffix
        key_a = next((k for k in adapter if k.endswith(".lora_A.weight") and _same_module(k, name)), None)
        if key_a is None or int(m["basis"]) not in bases:
            continue
        A, B = adapter[key_a], adapter[key_a.replace(".lora_A.weight", ".lora_B.weight")]
        U = bases[int(m["basis"])]
        share = update_in_span(A, B, U, m["side"])
        norm = math.sqrt(max(float(((B.double().T @ B.double()) * (A.double() @ A.double().T)).sum()), 0.0))
        out.append({"name": name, "block": m.get("block"), "side": m["side"], "basis": int(m["basis"]),
                    "share": share, "baseline": U.shape[1] / U.shape[0], "norm": norm})  # fmt: skip
    return out


def _same_module(key: str, name: str) -> bool:
    mod = key[: -len(".lora_A.weight")]
    strip = lambda s: re.sub(r"^(base_model\.model\.)+", "", s)
    return strip(mod) == strip(name)


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


# ----- reading the run directory


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _read_log(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            if "step" in r and "loss" in r:
                rows.append(r)
    return rows


def _load_adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _collect_config(run_dir: Path):
    from .collect import CollectConfig

    cfg = _read_json(run_dir / "config.json")
    section = cfg.get("sails", {}).get("collect", cfg.get("collect"))
    if section is None:
        raise ValueError("config.json has no sails.collect section")
    return CollectConfig.from_dict(section)


class _Run:
    """What the report found in a run directory; `notes` says what was missing and why."""

    def __init__(self, run_dir: Path, tokenizer) -> None:
        self.dir = run_dir
        self.notes: list[str] = []
        self.selection = self._try("feature selection", self._selection)
        self.subspace = self._try("subspace", self._subspace)
        self.stats = self._try("feature statistics", self._stats) or {}
        self.pairs = self._try("contrastive pairs", self._pairs)
        self.token_map = self._try("token map", lambda: self._token_map(tokenizer))
        self.tokenizer = tokenizer
        self.log = self._try("training log", lambda: _read_log(run_dir / "train" / "train_log.jsonl"))
        self.before, self.after = self._try("evaluation", self._eval) or (None, None)
        self.init = self._try("init report", lambda: _read_json(run_dir / "init.json"))
        self.shares = self._try("update in span(U)", self._shares) or {}

    def _try(self, what: str, fn):
        try:
            return fn()
        except FileNotFoundError as err:
            self.notes.append(f"{what}: not found ({Path(err.filename).name if err.filename else err})")
        except Exception as err:  # a damaged or foreign file must not stop the rest of the report
            self.notes.append(f"{what}: could not be read ({type(err).__name__}: {err})")
        return None

    def _need(self, stem: str) -> Path:
        p = self.dir / stem
        if not p.with_name(p.name + ".json").exists():
            raise FileNotFoundError(2, "missing", str(p.with_name(p.name + ".json")))
        return p

    def _selection(self):
        from .select import FeatureSelection

        return FeatureSelection.load(self._need("selection"))

    def _subspace(self):
        from .subspace import Subspace

        return Subspace.load(self._need("subspace"))

    def _stats(self):
        from ..stats import FeatureStats

        files = sorted((self.dir / "stats").glob("layer_*.safetensors"))
        if not files:
            raise FileNotFoundError(2, "missing", str(self.dir / "stats" / "layer_*.safetensors"))
        return {int(f.stem.split("_")[1]): FeatureStats.load(f) for f in files}

    def _pairs(self):
        from ..data import read_pairs

        path = self.dir / "pairs.jsonl"
        if not path.exists():
            raise FileNotFoundError(2, "missing", str(path))
        return read_pairs(path)

    def _token_map(self, tokenizer):
        saved = self.dir / "stats" / "token_map.safetensors"
        if saved.exists():
            return TokenMap.load(saved)
        if tokenizer is None or self.pairs is None:
            raise FileNotFoundError(
                2, "missing", f"{saved}; no tokenizer given to rebuild it from pairs.jsonl, so no snippets"
            )
        return build_token_map(tokenizer, self.pairs, _collect_config(self.dir))

    def _eval(self):
        from .evaluate import EvalResult

        b, a = self.dir / "eval_before.json", self.dir / "eval_after.json"
        if not b.exists() or not a.exists():
            raise FileNotFoundError(2, "missing", str(b if not b.exists() else a))
        return EvalResult.load(b), EvalResult.load(a)

    def _shares(self):
        if self.init is None or self.subspace is None:
            raise FileNotFoundError(2, "missing", "init.json and the subspace are both needed")
        bases = {k: b.U for k, b in self.subspace.bases.items()}
        out = {}
        ckpt_root = self.dir / "train" / "checkpoints"
        for ck in sorted(ckpt_root.glob("step-*")) if ckpt_root.exists() else []:
            if (ck / "adapter_model.safetensors").exists():
                out[ck.name] = adapter_update_shares(_load_adapter(ck), self.init["modules"], bases)
        final = self.dir / "train" / "adapter"
        if (final / "adapter_model.safetensors").exists():
            out["final adapter"] = adapter_update_shares(_load_adapter(final), self.init["modules"], bases)
        out = {k: v for k, v in out.items() if v}
        if not out:
            raise FileNotFoundError(2, "missing", str(final / "adapter_model.safetensors"))
        return out


# ----- html


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.85em; }
td, th { border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-family: monospace; }
mark { background: #ffe08a; } .note { color: #8a5300; } pre { background: #f7f7f7; padding: 0.6em; }
img { max-width: 100%; border: 1px solid #eee; } .snip { font-family: monospace; font-size: 0.85em; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(v: float | None, fmt: str = "{:.4g}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _table(head: list[str], rows: list[list[str]], raw: bool = False) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _snippet_html(run: _Run, index: int) -> str:
    tm, tok = run.token_map, run.tokenizer
    e, pos = tm.locate(index)
    pair = int(tm.pair_index[e])
    cls = CLASS_NAMES[int(tm.label[e])]
    prompt = ""
    if run.pairs is not None and pair < len(run.pairs):
        p = run.pairs[pair].prompt
        prompt = f"<br><i>prompt:</i> {_e(p[:120] + ('...' if len(p) > 120 else ''))}"
    if tok is None:
        return f"pair {pair} ({cls}), response token {pos}{prompt}"
    before, token, after = tm.snippet(tok, index)
    return f"pair {pair} ({cls}): ...{_e(before)}<mark>{_e(token)}</mark>{_e(after)}...{prompt}"


def _features_section(run: _Run, top_n: int) -> str:
    parts = []
    have_map = run.token_map is not None
    for layer, sel in sorted(run.selection.layers.items()):
        st = run.stats.get(layer)
        usable = have_map and st is not None and st.tokens_seen == run.token_map.num_tokens
        if have_map and st is not None and not usable:
            run.notes.append(
                f"layer {layer}: the token map holds {run.token_map.num_tokens} tokens but the statistics "
                f"saw {st.tokens_seen}; they come from different collect runs, so no snippets for this layer"
            )
        rows = []
        for j in range(min(top_n, len(sel.ids))):
            fid = int(sel.ids[j])
            means, freqs = sel.class_means[:, j].tolist(), sel.frequencies[:, j].tolist()
            cells = [str(fid), str(layer), _num(float(sel.scores[j])), _num(means[0]), _num(means[1])]
            cells += [_num(freqs[0], "{:.3f}"), _num(freqs[1], "{:.3f}")]
            snips = []
            if usable:
                for c in range(2):
                    idx = int(st.act_argmax[c, fid])
                    if idx >= 0:
                        snips.append(
                            f"<b>max in {CLASS_NAMES[c]}</b> ({float(st.act_max[c, fid]):.3g}): "
                            + _snippet_html(run, idx)
                        )
            cells = [_e(c) for c in cells] + [f"<span class='snip'>{'<br>'.join(snips) or '-'}</span>"]
            rows.append(cells)
        head = ["feature id", "layer", "score", "mean aligned", "mean unaligned", "freq aligned",
                "freq unaligned", "where it fires most (response snippets)"]  # fmt: skip
        parts.append(
            f"<h3>Layer {layer}: top {len(rows)} of {len(sel.ids)} selected</h3>" + _table(head, rows, True)
        )
    if not have_map:
        parts.append(
            "<p class='note'>No response snippets: no token map (stats/token_map.safetensors) and no "
            "tokenizer to rebuild one from pairs.jsonl. Pass <code>tokenizer=</code> to <code>report</code>, "
            "or save "
            "<code>build_token_map(tokenizer, pairs, collect_config)</code> beside the statistics.</p>"
        )
    return "".join(parts)


def _subspace_section(run: _Run) -> str:
    rows, dirs = [], []
    for key, b in sorted(run.subspace.bases.items()):
        lab = "pooled" if key < 0 else str(key)
        rows.append([lab, str(b.rank), str(b.n_components), str(b.n_kept), f"{b.explained_kept:.3f}",
                     ", ".join(str(k) for k in sorted(b.feature_ids))])  # fmt: skip
        if hasattr(b, "top_features") and getattr(b, "loadings", None) is not None:
            for col in range(b.n_kept):
                tops = b.top_features(col, n=3)
                dirs.append([lab, str(col), "; ".join(f"L{la} #{i} ({v:+.2f})" for la, i, v in tops)])
    out = _table(["basis (SAE layer)", "rank r", "r_S (threshold)", "SVD columns kept", "variance kept",
                  "from layers"], rows)  # fmt: skip
    if dirs:
        out += "<h3>Each direction of U and the features that load on it most</h3>"
        out += _table(["basis", "column of U", "top features: layer, id (loading)"], dirs)
    return out


def _shares_section(run: _Run) -> str:
    last = list(run.shares)[-1]
    rows = [
        [r["name"], r["side"], "pooled" if r["basis"] < 0 else str(r["basis"]), _num(r["share"], "{:.4f}"),
         _num(r["baseline"], "{:.4f}"), _num(r["norm"], "{:.3g}")]
        for r in run.shares[last]
    ]  # fmt: skip
    valid = [r["share"] for r in run.shares[last] if not math.isnan(r["share"])]
    mean = sum(valid) / len(valid) if valid else float("nan")
    return (
        "<p>For a module with dW = s&nbsp;B&nbsp;A and the basis U that initialised it: read side "
        "||dW&nbsp;P_U||<sub>F</sub><sup>2</sup>/||dW||<sub>F</sub><sup>2</sup> (input directions), "
        "write side "
        "||P_U&nbsp;dW||<sub>F</sub><sup>2</sup>/||dW||<sub>F</sub><sup>2</sup> (output directions), "
        "P_U = U&nbsp;U<sup>T</sup>. Baseline r/d: the expected share of a random update.</p>"
        f"<p>Mean over modules ({_e(last)}): <b>{_num(mean, '{:.4f}')}</b></p>"
        + _table(["module", "side", "basis", "share in span(U)", "baseline r/d", "||dW||_F / s"], rows)
    )


def _eval_section(run: _Run) -> str:
    from .evaluate import compare

    out = f"<pre>{_e(compare(run.before, run.after))}</pre>"
    hb, ha = run.before.sets.get("harmful"), run.after.sets.get("harmful")
    if hb is not None and ha is not None:
        rows = [[rb["prompt"][:100], ("[refused] " if rb["refused"] else "") + rb["response"][:200],
                 ("[refused] " if ra["refused"] else "") + ra["response"][:200]]
                for rb, ra in list(zip(hb.records, ha.records, strict=False))[:5]]  # fmt: skip
        out += "<h3>Held-out harmful prompts: first responses</h3>"
        out += _table(["prompt", f"response ({run.before.label})", f"response ({run.after.label})"], rows)
    return out


def report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    tokenizer=None,
    top_n: int = 10,
    title: str | None = None,
) -> Path:
    """Write the run's HTML report (plots embedded) and the plots as PNG files.

    Args:
        run_dir: a pipeline run directory (selection, subspace, stats/, pairs.jsonl, init.json, train/,
            eval_before.json, eval_after.json); whatever is missing is skipped with a note.
        out: the HTML path (default run_dir/report/report.html); PNGs go in its folder.
        tokenizer: optional; decodes snippet tokens and rebuilds the token map from pairs.jsonl when
            stats/token_map.safetensors is absent.
        top_n: features listed per layer.
        title: the page title (default: the run directory's name).

    Returns:
        Path of the HTML file.

    Example:
        >>> report("runs/demo")          # runs/demo/report/report.html + feature_scores.png, ...
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run_dir: expected an existing run directory, got {run_dir}")
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ValueError(f"top_n: expected an int >= 1, got {top_n!r}")
    out = Path(out) if out is not None else run_dir / "report" / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    run = _Run(run_dir, tokenizer)

    plots: dict[str, bytes] = {}
    makers = {
        "feature_scores": (run.selection, lambda: plot_feature_scores(run.selection)),
        "explained_variance": (run.subspace, lambda: plot_explained_variance(run.subspace)),
        "safety": (run.before, lambda: plot_safety(run.before, run.after)),
        "loss": (run.log, lambda: plot_loss(run.log)),
        "update_in_span": (run.shares, lambda: plot_update_shares(run.shares)),
    }
    for name, (data, make) in makers.items():
        if data:
            plots[name] = make()
            (out.parent / f"{name}.png").write_bytes(plots[name])
        else:
            run.notes.append(f"plot {name}.png: skipped, its data is missing")

    def img(name: str) -> str:
        if name not in plots:
            return ""
        return f"<img alt='{name}' src='data:image/png;base64,{base64.b64encode(plots[name]).decode()}'>"

    sections = []
    if run.before is not None:
        sections.append(("Safety before and after training", img("safety") + _eval_section(run)))
    if run.log:
        last = run.log[-1]
        summary = f"<p>{len(run.log)} logged steps; last step {last['step']}, loss {_num(last['loss'])}</p>"
        sections.append(("Training", img("loss") + summary))
    if run.selection is not None:
        sections.append(("Selected SAE features", img("feature_scores") + _features_section(run, top_n)))
    if run.subspace is not None:
        sections.append(("Safety subspace", img("explained_variance") + _subspace_section(run)))
    if run.shares:
        sections.append(
            ("How much of the trained update lies in span(U)", img("update_in_span") + _shares_section(run))
        )
    notes = "".join(f"<li>{_e(n)}</li>" for n in run.notes) or "<li>none</li>"
    title = title or f"SAILS report: {run_dir.name}"
    body = "".join(f"<h2>{_e(h)}</h2>{s}" for h, s in sections)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{_CSS}</style>"
        f"</head><body><h1>{_e(title)}</h1><p>run directory: <code>{_e(run_dir.resolve())}</code>; written "
        f"{created}</p>{body}<h2>Notes</h2><ul class='note'>{notes}</ul></body></html>"
    )
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
