"""Regenerate the README's benchmark tables from benchmarks/results/*.csv.

    python benchmarks/make_tables.py          # rewrites the blocks between <!-- table:NAME --> markers

Each table shows the latest run (by commit and date) per device for one CSV, with speed-ups computed
only between rows of the same run and device.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def latest_runs(rows: list[dict]) -> list[dict]:
    """Rows of the newest run per device (a run = same commit and the same date's hour)."""
    by_device: dict[str, list[dict]] = {}
    for row in rows:
        by_device.setdefault(row["device"], []).append(row)
    kept = []
    for device_rows in by_device.values():
        newest = max(r["date"][:13] + r["commit"] for r in device_rows)
        kept += [r for r in device_rows if r["date"][:13] + r["commit"] == newest]
    return kept


def lora_table(rows: list[dict]) -> str:
    lines = [
        "| device | model | proj | dtype | dims | mode | base ms | torch ms | PEFT ms | sails_fast ms "
        "| vs base | vs PEFT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        key = (r["device"], r["model"], r["shape"], r["dtype"], r["dims"], r["mode"])
        groups.setdefault(key, {})[r["provider"]] = r
    for (device, model, shape, dtype, dims, mode), by in sorted(groups.items()):
        ms = {p: float(by[p]["median_ms"]) for p in by}
        fmt = lambda p, ms=ms: f"{ms[p]:.2f}" if p in ms else "not run"
        ours = ms.get("sails_fast")
        vs_base = f"{ours / ms['base']:.2f}x" if ours and "base" in ms else "n/a"
        vs_peft = f"{ms['peft'] / ours:.2f}x faster" if ours and "peft" in ms else "n/a"
        lines.append(
            f"| {device} | {model} | {shape} | {dtype} | {dims} | {mode} | {fmt('base')} | {fmt('torch')} "
            f"| {fmt('peft')} | {fmt('sails_fast')} | {vs_base} | {vs_peft} |"
        )
    return "\n".join(lines)


def compare_table(rows: list[dict]) -> str:
    """`sails-fast compare`'s summary (mean ± std over seeds), as the CLI prints it."""
    from sails_fast.study.compare_outputs import format_summary

    def value(key: str, text: str):
        if text == "" or key in ("method", "kind"):
            return text or None
        return float(text) if "." in text or "e" in text else int(text)

    return format_summary([{k: value(k, v) for k, v in r.items()} for r in rows])


# name: (CSV under benchmarks/results, renderer, whether the CSV holds several runs to pick the latest of)
TABLES = {
    "lora": ("lora.csv", lora_table, True),
    "compare": ("compare/compare_summary.csv", compare_table, False),
    "compare_20steps": ("compare_20steps/compare_summary.csv", compare_table, False),
}


def render(name: str) -> str | None:
    csv_name, fn, has_runs = TABLES[name]
    path = RESULTS / csv_name
    if not path.exists():
        return None
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    return fn(latest_runs(rows) if has_runs else rows)


def replace_block(text: str, name: str, table: str) -> tuple[str, int]:
    """`text` with the block between <!-- table:NAME --> markers replaced by `table`; and the count."""
    pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
    return pattern.subn(lambda m: m.group(1) + table + "\n" + m.group(2), text)


def update_readme_table(name: str, table: str) -> None:
    """Rewrite one table block of README.md (benchmarks/kernel_audit.py and roofline.py use this)."""
    readme = ROOT / "README.md"
    text, count = replace_block(readme.read_text(), name, table)
    if not count:
        raise SystemExit(f"README.md has no <!-- table:{name} --> block")
    readme.write_text(text)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name in TABLES:
        table = render(name)
        if table is None:
            continue
        text, count = replace_block(text, name, table)
        print(f"table {name}: {'updated' if count else 'no markers in README'}")
    readme.write_text(text)


if __name__ == "__main__":
    main()
