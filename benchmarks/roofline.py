"""Predicted speed of every op and provider from written-out FLOP and byte counts, and each goal's ratio.

    python benchmarks/roofline.py              # print the tables, write benchmarks/results/roofline.csv
    python benchmarks/roofline.py --readme     # also regenerate the README's goal table
    python benchmarks/roofline.py --launches   # the per-launch counts behind each number

Also printed: what fp32 adapters over a bf16 base (PEFT's default) cost each implementation, since the
fused ops compute the adapter term in the adapter's dtype as PEFT does (3xTF32 rank-r dots).

The model is `sails_fast.fused.roofline` (also what "auto" uses until a GPU has measured): each launch
takes at least max(tensor FLOP / peak, bytes / bandwidth, CUDA-core ops / their peak); an op is the sum of its
launches. Devices and their sources are printed with the tables. A goal's measured column is filled
from benchmarks/results/<op>.csv rows run on that device (side by side, one run), else "predicted, not
measured".
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tables import update_readme_table  # noqa: E402
from shapes import GOAL_RANK, GOAL_TOKENS_LORA, GOAL_TOKENS_SAE, MODELS  # noqa: E402

from sails_fast.fused import roofline as R

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEVICES = ("h100-sxm", "h200", "a100-sxm", "rtx-4090", "rtx-3090")

K_Q, N_Q = MODELS["gemma-2-9b"].projections()["q_proj"]
LORA_SHAPE = {"M": GOAL_TOKENS_LORA, "K": K_Q, "N": N_Q, "R": GOAL_RANK}
SAE_SHAPE = {"T": GOAL_TOKENS_SAE, "d": MODELS["gemma-2-9b"].hidden, "F": MODELS["gemma-2-9b"].sae_width}
LORA_DIMS = f"Gemma-2-9B q_proj {K_Q}->{N_Q}, {GOAL_TOKENS_LORA} tokens, r {GOAL_RANK}, bf16, fwd+bwd"
SAE_DIMS = f"Gemma-2-9B {SAE_SHAPE['d']} x {SAE_SHAPE['F']} JumpReLU, {GOAL_TOKENS_SAE} tokens, bf16"


@dataclass(frozen=True)
class Goal:
    """ours / reference <= bound ("at most") or reference / ours >= bound ("speed-up")."""

    name: str
    op: str
    launches: object
    shape: dict
    ours: tuple[str, ...]
    reference: str
    bound: float
    kind: str  # "at most" | "speed-up"
    dims: str
    floor: str  # the provider no implementation can beat: the bare GEMMs

    def ceiling(self, device: R.Device) -> float:
        """The best any implementation could reach: the bare GEMMs' time in place of ours."""
        floor = R.total_seconds(self.launches(self.floor, **self.shape), device)
        ref = R.total_seconds(self.launches(self.reference, **self.shape), device)
        return floor / ref if self.kind == "at most" else ref / floor

    def ratio(self, provider: str, device: R.Device) -> float:
        mine = R.total_seconds(self.launches(provider, **self.shape), device)
        ref = R.total_seconds(self.launches(self.reference, **self.shape), device)
        return mine / ref if self.kind == "at most" else ref / mine

    def meets(self, ratio: float) -> bool:
        return ratio <= self.bound if self.kind == "at most" else ratio >= self.bound


def _qlora_with_base(provider: str, **shape) -> list[R.Launch]:
    """QLoRA's providers plus "base": the bare bf16 GEMMs (no quantisation, no adapter)."""
    return R.lora_launches("base", **shape) if provider == "base" else R.qlora_launches(provider, **shape)


GOALS = [
    Goal("LoRA fwd+bwd vs bare base linear", "lora", R.lora_launches, LORA_SHAPE, R.LORA_STRATEGIES,
         "base", 1.10, "at most", LORA_DIMS, "base"),
    Goal("LoRA fwd+bwd faster than PEFT", "lora", R.lora_launches, LORA_SHAPE, R.LORA_STRATEGIES,
         "peft", 1.3, "speed-up", LORA_DIMS, "base"),
    Goal("QLoRA faster than PEFT + bitsandbytes", "nf4", _qlora_with_base, LORA_SHAPE, R.QLORA_STRATEGIES,
         "peft_bnb", 1.5, "speed-up", LORA_DIMS, "base"),
    Goal("QLoRA vs bf16 fused LoRA", "nf4", _qlora_with_base, LORA_SHAPE, R.QLORA_STRATEGIES,
         "lora_bf16", 1.2, "at most", LORA_DIMS, "base"),
    Goal("SAE stats faster than SAELens + torch", "sae_stats", R.sae_stats_launches, SAE_SHAPE,
         R.SAE_STRATEGIES, "sae_lens", 2.0, "speed-up", SAE_DIMS, "gemm"),
    Goal("SAE stats vs bare encode GEMM", "sae_stats", R.sae_stats_launches, SAE_SHAPE, R.SAE_STRATEGIES,
         "gemm", 1.3, "at most", SAE_DIMS, "gemm"),
]  # fmt: skip


def measured_ratio(goal: Goal, device: R.Device) -> str:
    """The goal's ratio from benchmark rows of one run on this device, if any were committed."""
    path = RESULTS / f"{goal.op}.csv"
    if not path.exists():
        return "predicted, not measured"
    with open(path) as f:
        # the goals are stated for adapters in the base's dtype: rows with fp32 adapters are the cost table's
        rows = [
            r
            for r in csv.DictReader(f)
            if device.name.split()[0] in r.get("device", "") and "adapters" not in r.get("dtype", "")
        ]
    if not rows:
        return "predicted, not measured"
    latest = max(r["date"][:13] + r["commit"] for r in rows)
    run = {r["provider"]: float(r["median_ms"]) for r in rows if r["date"][:13] + r["commit"] == latest}
    mine = [run[p] for p in ("sails_fast", *goal.ours) if p in run]
    if not mine or goal.reference not in run:
        return "predicted, not measured"
    best = min(mine)
    ratio = best / run[goal.reference] if goal.kind == "at most" else run[goal.reference] / best
    return f"{ratio:.2f}x (measured)"


def rows() -> list[dict]:
    out = []
    for goal in GOALS:
        for key in DEVICES:
            device = R.DEVICES[key]
            ratios = {s: goal.ratio(s, device) for s in goal.ours}
            best = min(ratios, key=ratios.get) if goal.kind == "at most" else max(ratios, key=ratios.get)
            out.append(
                {
                    "goal": goal.name,
                    "bound": f"{'<=' if goal.kind == 'at most' else '>='} {goal.bound:.2f}x",
                    "device": device.name,
                    **{f"predicted {s}": f"{r:.3f}" for s, r in ratios.items()},
                    "best": best,
                    "ceiling": f"{goal.ceiling(device):.3f}",
                    "meets": "yes" if goal.meets(ratios[best]) else "no",
                    "reachable": "yes" if goal.meets(goal.ceiling(device)) else "no",
                    "measured": measured_ratio(goal, device),
                    "dims": goal.dims,
                }
            )
    return out


def goal_table(table_rows: list[dict]) -> str:
    lines = [
        "| goal | device | bound | predicted, best strategy | meets | ceiling (bare GEMMs) | measured |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table_rows:
        best = float(r["predicted " + r["best"]])
        reach = "" if r["reachable"] == "yes" else ", out of reach"
        lines.append(
            f"| {r['goal']} | {r['device']} | {r['bound']} | {best:.2f}x ({r['best']}) | {r['meets']} "
            f"| {float(r['ceiling']):.2f}x{reach} | {r['measured']} |"
        )
    return "\n".join(lines)


def times_table() -> str:
    """Predicted minimum milliseconds per provider at the goal shapes."""
    lines = []
    for title, fn, providers, shape in (
        (f"LoRA ({LORA_DIMS})", R.lora_launches, R.LORA_PROVIDERS, LORA_SHAPE),
        (f"QLoRA ({LORA_DIMS}, NF4 base)", R.qlora_launches, R.QLORA_PROVIDERS, LORA_SHAPE),
        (f"SAE stats ({SAE_DIMS})", R.sae_stats_launches, R.SAE_PROVIDERS, SAE_SHAPE),
    ):
        lines += [f"\n{title}: predicted minimum ms", "| device | " + " | ".join(providers) + " |"]
        lines.append("|---" * (len(providers) + 1) + "|")
        for key in DEVICES:
            device = R.DEVICES[key]
            ms = [R.total_seconds(fn(p, **shape), device) * 1e3 for p in providers]
            lines.append(f"| {device.name} | " + " | ".join(f"{t:.3f}" for t in ms) + " |")
    return "\n".join(lines)


def adapter_cost_table() -> str:
    """Predicted fwd+bwd ms with bf16 and with fp32 adapters over a bf16 base, per implementation."""
    lines = [
        "| device | fused, bf16 adapters | fused, fp32 adapters | cost | PEFT, fp32 adapters "
        "| speed-up vs PEFT (fp32 adapters) | QLoRA fused, fp32 adapters | vs PEFT + bnb (fp32 adapters) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ms = lambda launches, device: R.total_seconds(launches, device) * 1e3
    for key in DEVICES:
        device = R.DEVICES[key]
        fused16 = ms(R.lora_launches("fused", **LORA_SHAPE), device)
        fused32 = ms(R.lora_launches("fused", **LORA_SHAPE, a=4), device)
        peft32 = ms(R.lora_launches("peft", **LORA_SHAPE, a=4), device)
        qlora32 = ms(R.qlora_launches("fused", **LORA_SHAPE, a=4), device)
        bnb32 = ms(R.qlora_launches("peft_bnb", **LORA_SHAPE, a=4), device)
        lines.append(
            f"| {device.name} | {fused16:.3f} ms | {fused32:.3f} ms | {100 * (fused32 / fused16 - 1):+.1f} % "
            f"| {peft32:.3f} ms | {peft32 / fused32:.2f}x | {qlora32:.3f} ms | {bnb32 / qlora32:.2f}x |"
        )
    return "\n".join(lines)


def launch_listing() -> str:
    device = R.DEVICES["h100-sxm"]
    lines = [f"per-launch counts on {device.name}"]
    for title, fn, providers, shape in (
        ("LoRA", R.lora_launches, R.LORA_PROVIDERS, LORA_SHAPE),
        ("QLoRA", R.qlora_launches, R.QLORA_PROVIDERS, LORA_SHAPE),
        ("SAE stats", R.sae_stats_launches, R.SAE_PROVIDERS, SAE_SHAPE),
    ):
        for p in providers:
            launches = fn(p, **shape)
            lines.append(f"\n{title} / {p}: {R.total_seconds(launches, device) * 1e3:.3f} ms")
            shown = launches if len(launches) <= 12 else launches[:3] + launches[-2:]
            for x in shown:
                lines.append(
                    f"  {x.name:40} {x.flops / 1e9:10.2f} GFLOP {x.bytes / 1e6:10.1f} MB "
                    f"{x.alu / 1e9:8.2f} Gop  -> {x.seconds(device) * 1e6:9.1f} us"
                )
            if len(launches) > 12:
                lines.append(f"  ... {len(launches)} launches in all")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true")
    parser.add_argument("--launches", action="store_true")
    args = parser.parse_args(argv)
    table_rows = rows()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "roofline.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in table_rows for k in r))
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(table_rows)
    print("devices:")
    for key in DEVICES:
        d = R.DEVICES[key]
        peaks = (
            f"{d.flops / 1e12:.1f} TFLOP/s, {d.bandwidth / 1e12:.2f} TB/s, {d.alu / 1e12:.1f} fp32 TFLOP/s"
        )
        print(f"  {d.name}: {peaks} ({d.source})")
    table = goal_table(table_rows)
    print(table)
    print(times_table())
    adapter_cost = adapter_cost_table()
    print(f"\nfp32 adapters over a bf16 base ({LORA_DIMS}): predicted fwd+bwd\n{adapter_cost}")
    if args.launches:
        print(launch_listing())
    if args.readme:
        update_readme_table("roofline", table)
        update_readme_table("adapter_cost", adapter_cost)


if __name__ == "__main__":
    main()
