"""Streaming SAE feature statistics against SAELens encode + torch reductions and the bare encode GEMM.

    python benchmarks/bench_sae_stats.py --quick         # CPU: SmolLM2 shape, fp32, 4096 tokens
    python benchmarks/bench_sae_stats.py                 # CUDA: every named shape, bf16, 65536 tokens

Providers:
  "gemm"        x @ W_enc + b_enc alone (allocates [T, F]): the floor.
  "sae_lens"    SAELens' sae.encode (dense [T, F]) + per-class torch reductions (sum, sum of squares,
                count, max/argmax): what users write today. "dense_torch" (SAEWeights.encode, the same
                math) stands in where sae-lens is not installed (the GPU machine).
  "sails_fast"  sae_feature_stats: strategy "auto" on CUDA; on CPU its torch backend (the chunked
                reference), labelled "sails_fast[torch]" (the interpreter is no speed measure).
  "sails_fast:fused", "sails_fast:chunked"   each strategy (CUDA): the one-pass Triton kernel; torch's
                GEMM into fp32 chunks of at most 256 MiB reduced by a Triton kernel.
`--write-strategy-table` records the faster strategy per shape for this GPU in
sails_fast/fused/strategy_table.json, which "auto" reads.
sails_fast's statistics are checked against the dense computation before anything is timed. Peak
memory: torch.cuda.max_memory_allocated above the inputs on CUDA; on CPU the peak RSS above the current
RSS (VmHWM reset through /proc/self/clear_refs). Rows go to benchmarks/results/sae_stats.csv.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Row,
    append_rows,
    environment,
    fastest_strategies,
    peak_memory_mb,
    print_rows,
    set_cpu_threads,
    time_fn,
    write_strategy_table,
)
from shapes import GOAL_TOKENS_SAE, MODELS  # noqa: E402

from sails_fast import FeatureStats, SAEWeights, sae_feature_stats  # noqa: E402

STRATEGY_PREFIX = "sails_fast:"
PROVIDERS = ("gemm", "sae_lens", "sails_fast", "sails_fast:fused", "sails_fast:chunked")
NUM_CLASSES = 2


def make_case(T: int, d: int, F: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sae = SAEWeights(
        W_enc=torch.randn(d, F, generator=g) / d**0.5,
        b_enc=torch.randn(F, generator=g) * 0.1 - 0.2,
        W_dec=torch.randn(F, d, generator=g) / F**0.5,
        b_dec=torch.randn(d, generator=g) * 0.1,
        activation="jumprelu",
        threshold=torch.rand(F, generator=g) * 0.2,
    ).to(device=device, dtype=dtype)
    x = torch.randn(T, d, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(-1, NUM_CLASSES, (T,), generator=g).to(device)
    w = torch.rand(T, generator=g).to(device)
    return sae, x, labels, w


def dense_stats(acts: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> FeatureStats:
    """What a user writes after a dense encode: per-class reductions of [T, F] activations."""
    acts = acts.float()
    out = FeatureStats.empty(NUM_CLASSES, acts.shape[1], device=acts.device)
    for c in range(NUM_CLASSES):
        m = labels == c
        a, wc = acts[m], w[m]
        out.weight_sum[c] = wc.sum()
        out.token_count[c] = m.sum()
        out.act_sum[c] = wc @ a
        out.act_sq_sum[c] = wc @ (a * a)
        out.active_count[c] = (a > 0).sum(0)
        out.act_max[c], out.act_argmax[c] = a.max(0)
    out.tokens_seen = acts.shape[0]
    return out


def sae_lens_module(sae: SAEWeights):
    """A SAELens JumpReLUSAE holding the same weights, or None without sae-lens."""
    try:
        from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    except ImportError:
        return None
    dtype = str(sae.dtype).removeprefix("torch.")
    module = JumpReLUSAE(
        JumpReLUSAEConfig(d_in=sae.d_model, d_sae=sae.num_features, dtype=dtype, device=str(sae.device))
    )
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            getattr(module, name).copy_(getattr(sae, name))
    return module


def provider_fn(name: str, sae: SAEWeights, x, labels, w) -> tuple[str, Callable[[], object]]:
    if name == "gemm":
        return "gemm", lambda: torch.addmm(sae.b_enc, x, sae.W_enc)
    if name == "sae_lens":
        module = sae_lens_module(sae)
        if module is None:
            return "dense_torch", lambda: dense_stats(sae.encode(x), labels, w)
        return "sae_lens", lambda: dense_stats(module.encode(x), labels, w)
    if name == "sails_fast":
        backend = "triton" if x.is_cuda else "torch"
        label = "sails_fast" if x.is_cuda else "sails_fast[torch]"
        return label, lambda: sae_feature_stats(x, sae, labels, token_weights=w, backend=backend)
    if name.startswith(STRATEGY_PREFIX):
        strategy = name.removeprefix(STRATEGY_PREFIX)
        return name, lambda: sae_feature_stats(
            x, sae, labels, token_weights=w, backend="triton", strategy=strategy
        )
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {name!r}")


def check(sae: SAEWeights, x, labels, w, dtype: torch.dtype, provider: str = "sails_fast") -> float:
    """Max relative act_sum error of a sails_fast provider against the dense computation; raises on a
    mismatch."""
    _, ours_fn = provider_fn(provider, sae, x, labels, w)
    ours = ours_fn()
    ref = dense_stats(sae.to(dtype=torch.float32).encode(x.float()), labels, w)
    if not torch.equal(ours.token_count, ref.token_count):
        raise AssertionError("token_count differs; not timing")
    rel = ((ours.act_sum - ref.act_sum).abs() / ref.act_sum.abs().clamp_min(1e-6)).max().item()
    # bf16 SAEs: the dense fp32 reference differs from bf16 operands by bf16 rounding of the inputs
    limit = 1e-4 if dtype == torch.float32 else 5e-2
    active = ref.active_count.sum().item()
    if rel > limit or abs(ours.active_count.sum().item() - active) > 1e-3 * active:
        raise AssertionError(f"sails_fast stats differ from the dense reference (rel {rel:.2e}); not timing")
    return rel


def cpu_peak_mb(fn: Callable[[], object]) -> float | None:
    """Peak RSS growth of one call, MB; None where /proc/self/clear_refs cannot reset the peak."""

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS:")
    except OSError:
        return None
    fn()
    return (status("VmHWM:") - before) / 1024


def bench_case(model: str, T: int, dtype: torch.dtype, device: str, providers, reps: int) -> list[Row]:
    d, F = MODELS[model].hidden, MODELS[model].sae_width
    sae, x, labels, w = make_case(T, d, F, dtype, device)
    env = environment(device)
    rows = []
    for provider in providers:
        if provider.startswith(STRATEGY_PREFIX) and device == "cpu":
            continue  # the Triton strategies run on CPU only in the interpreter: no speed measure
        label, fn = provider_fn(provider, sae, x, labels, w)
        err = check(sae, x, labels, w, dtype, provider) if provider.startswith("sails_fast") else None
        t = time_fn(fn, device, warmup=1, reps=reps)
        peak = peak_memory_mb(fn, device) if device != "cpu" else cpu_peak_mb(fn)
        rows.append(
            Row(
                op="sae_feature_stats",
                model=model,
                shape=f"{d}x{F}",
                dims=f"T={T} d={d} F={F} C={NUM_CLASSES} jumprelu",
                dtype=str(dtype).removeprefix("torch."),
                provider=label,
                mode="fwd",
                median_ms=t.median_ms,
                p20_ms=t.p20_ms,
                p80_ms=t.p80_ms,
                tflops=2 * T * d * F / (t.median_ms * 1e-3) / 1e12,
                peak_mem_mb=peak,
                max_abs_err=err,
                note="" if device != "cpu" else "CPU row; sails_fast on its torch backend",
                env=env,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="SmolLM2 shape only (the CPU default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tokens", type=int, default=None, help=f"tokens (default {GOAL_TOKENS_SAE} on CUDA)"
    )
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--providers", nargs="*", default=list(PROVIDERS))
    parser.add_argument("--no-save", action="store_true", help="print only")
    parser.add_argument("--write-strategy-table", action="store_true", help="record the faster strategy")
    args = parser.parse_args(argv)
    set_cpu_threads()

    cuda = torch.device(args.device).type == "cuda"
    quick = args.quick or not cuda
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    tokens = args.tokens or (GOAL_TOKENS_SAE if cuda else 4096)
    models = args.models or (["smollm2-135m"] if quick else list(MODELS))
    rows = []
    for model in models:
        rows += bench_case(model, tokens, dtype, args.device, args.providers, reps=3 if not cuda else 20)
    print_rows(rows)
    for r in rows:
        peak = "n/a" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f} MB"
        print(f"{r.provider:18} peak memory above inputs: {peak}")
    if not args.no_save:
        print(f"appended {len(rows)} rows to {append_rows('sae_stats.csv', rows)}")
    if args.write_strategy_table:
        write_strategy_table("sae_feature_stats", strategy_choices(rows), args.device)


def strategy_choices(rows: list[Row]) -> dict[str, str]:
    """{strategy-table shape bucket: the faster strategy} from this run's rows."""
    from sails_fast.fused.strategy import shape_key

    choices = {}
    for (_, _, dims, _), choice in fastest_strategies(rows, STRATEGY_PREFIX, mode="fwd").items():
        T, d, F = (int(v) for v in re.findall(r"[TdF]=(\d+)", dims))
        choices[shape_key("sae_feature_stats", T=T, d=d, F=F)] = choice
    return choices


if __name__ == "__main__":
    main()
