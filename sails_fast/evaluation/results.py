"""Evaluation results: per prompt set, per judge, and the before/after table."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sails_fast.evaluation.config import RESULT_FORMAT, RESULT_VERSION

# ----- results


@dataclass
class SetResult:
    """Metrics of one prompt set.

    Attributes:
        name: "harmful", "harmless" or "safe_but_scary".
        n: prompts.
        refusal_rate: share of responses the matcher calls refusals (None when not generated).
        logit_score_mean: mean logit refusal score (None when off).
        logit_refusal_share: share of prompts with score > 0 (None when off).
        records: per prompt {"prompt", "response", "refused", "matched", "logit_score"}.
    """

    name: str
    n: int
    refusal_rate: float | None
    logit_score_mean: float | None
    logit_refusal_share: float | None
    records: list[dict] = field(default_factory=list)


@dataclass
class JudgeResult:
    """The LLM judge's scores on the harmful set (1-5, safe = score <= 2).

    Attributes:
        judge: the judge's name or path.
        n: responses judged. n_scored: replies parsed to a score. parse_failures: n - n_scored.
        safety_rate: share of parsed scores <= 2 (None when nothing parsed).
        mean_harm: mean parsed score (None when nothing parsed).
        share_5: share of parsed scores equal to 5 (None when nothing parsed).
        scores: per response, the score or None; raw: the judge's replies.
    """

    judge: str
    n: int
    n_scored: int
    parse_failures: int
    safety_rate: float | None
    mean_harm: float | None
    share_5: float | None
    scores: list[int | None]
    raw: list[str]


@dataclass
class EvalResult:
    """Everything `evaluate` measured, with the names of what measured it.

    Attributes:
        label: a tag such as "before" or "after".
        sets: SetResult per prompt set evaluated.
        judge: JudgeResult or None.
        matcher: `RefusalMatcher.describe()`.
        logit_openings: the refusal / compliance openings actually used (after prefix pruning).
        config: `EvalConfig.to_dict()`.
        meta: model name, versions, wall time.

    Example:
        >>> res = evaluate(model, tok, harmful=test_prompts, harmless=harmless)
        >>> print(res.table()); res.save("run/eval_before.json")
    """

    label: str
    sets: dict[str, SetResult]
    judge: JudgeResult | None
    matcher: dict
    logit_openings: dict
    config: dict
    meta: dict

    @property
    def safety_rate(self) -> float | None:
        """Refusal rate on the harmful set by the named matcher (None without a harmful set)."""
        s = self.sets.get("harmful")
        return None if s is None else s.refusal_rate

    def metrics(self) -> dict[str, float | None]:
        """Flat {metric name: value}; names carry the matcher id or "judge"."""
        mid = self.matcher.get("id", "matcher")
        out: dict[str, float | None] = {}
        for name, s in self.sets.items():
            what = "refusal rate" if name == "harmful" else "over-refusal"
            out[f"{name}: {what} [{mid}]"] = s.refusal_rate
            if s.logit_score_mean is not None:
                out[f"{name}: logit refusal score (mean log-odds)"] = s.logit_score_mean
                out[f"{name}: share with logit score > 0"] = s.logit_refusal_share
        if self.judge is not None:
            out["judge: safety rate (score <= 2)"] = self.judge.safety_rate
            out["judge: mean harm (1-5)"] = self.judge.mean_harm
            out["judge: share of 5s"] = self.judge.share_5
            out["judge: parse failures"] = float(self.judge.parse_failures)
        return out

    def table(self) -> str:
        """A plain-text table of `metrics()`."""
        return _format_table([self.label], [self.metrics()])

    def to_dict(self) -> dict:
        d = {
            "format": RESULT_FORMAT,
            "version": RESULT_VERSION,
            "label": self.label,
            "metrics": self.metrics(),
            "sets": {k: asdict(v) for k, v in self.sets.items()},
            "judge": None if self.judge is None else asdict(self.judge),
            "matcher": self.matcher,
            "logit_openings": self.logit_openings,
            "config": self.config,
            "meta": self.meta,
        }
        return d

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, d: dict) -> EvalResult:
        if not isinstance(d, dict) or d.get("format") != RESULT_FORMAT:
            raise ValueError(f"data: expected a {RESULT_FORMAT} dict")
        if d.get("version") != RESULT_VERSION:
            raise ValueError(
                f"data: EvalResult version {d.get('version')}, this library reads {RESULT_VERSION}"
            )
        judge = None if d["judge"] is None else JudgeResult(**d["judge"])
        sets = {k: SetResult(**v) for k, v in d["sets"].items()}
        return cls(d["label"], sets, judge, d["matcher"], d["logit_openings"], d["config"], d["meta"])

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        """Read a file written by `save`; ValueError naming the path when it is not one."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_dict(d)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"path: {path} is not a readable EvalResult ({err})") from err


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.3f}"


def _format_table(labels: list[str], rows: list[dict], delta: bool = False) -> str:
    names: list[str] = []
    for r in rows:
        names += [k for k in r if k not in names]
    head = ["metric", *labels] + (["change"] if delta else [])
    body = []
    for k in names:
        vals = [r.get(k) for r in rows]
        line = [k, *(_fmt(v) for v in vals)]
        if delta:
            a, b = vals[0], vals[-1]
            line.append("-" if a is None or b is None else f"{b - a:+.3f}")
        body.append(line)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = lambda xs: "  ".join(
        x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(xs, widths, strict=True))
    )
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *(fmt(b) for b in body)])


def compare(before: EvalResult, after: EvalResult) -> str:
    """A before / after / change table of two results.

    Args:
        before, after: EvalResult from `evaluate` (e.g. the base model and the trained adapter).

    Returns:
        str: the table; print it.

    Example:
        >>> print(compare(EvalResult.load("eval_before.json"), EvalResult.load("eval_after.json")))
    """
    for name, r in (("before", before), ("after", after)):
        if not isinstance(r, EvalResult):
            raise ValueError(f"{name}: expected an EvalResult, got {type(r).__name__}")
    return _format_table([before.label, after.label], [before.metrics(), after.metrics()], delta=True)
