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
import json
import math
from pathlib import Path
from typing import Any

import torch

from sails_fast.report.plots import (
    plot_explained_variance,
    plot_feature_scores,
    plot_loss,
    plot_safety,
    plot_update_shares,
)
from sails_fast.report.shares import adapter_update_shares
from sails_fast.report.token_map import TokenMap, build_token_map

CLASS_NAMES = ("aligned", "unaligned")


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
    from sails_fast.pairs.config import CollectConfig

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
        from sails_fast.selection.select import FeatureSelection

        return FeatureSelection.load(self._need("selection"))

    def _subspace(self):
        from sails_fast.subspace.subspace import Subspace

        return Subspace.load(self._need("subspace"))

    def _stats(self):
        from sails_fast.core.feature_stats import FeatureStats

        files = sorted((self.dir / "stats").glob("layer_*.safetensors"))
        if not files:
            raise FileNotFoundError(2, "missing", str(self.dir / "stats" / "layer_*.safetensors"))
        return {int(f.stem.split("_")[1]): FeatureStats.load(f) for f in files}

    def _pairs(self):
        from sails_fast.data import read_pairs

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
        from sails_fast.evaluation.results import EvalResult

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
    from sails_fast.evaluation.results import compare

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
