"""Fused LoRA linear against the bare base linear, the torch reference and PEFT.

    python benchmarks/bench_lora.py --quick            # CPU: a few SmolLM2 shapes, fp32
    python benchmarks/bench_lora.py                    # CUDA: every named shape, bf16, 8192 tokens
    python benchmarks/bench_lora.py --adapter-dtype float32   # fp32 adapters over the base (PEFT's default)
    pytest benchmarks/bench_lora.py --benchmark-only   # the same comparison through pytest-benchmark

Providers: "base" (F.linear alone: the floor the fused op is measured against), "torch" (the plain
reference, autograd), "peft" (PEFT's lora.Linear), "sails_fast" (strategy "auto"), "sails_fast:fused" and
"sails_fast:cublas" (each strategy; CUDA only: on CPU the kernels run in the interpreter, which is a
correctness tool, not a speed measurement). `--write-strategy-table` records the faster strategy per
shape for this GPU in sails_fast/fused/strategy_table.json, which "auto" reads.
Each provider's output and gradients are checked against the fp32 reference before it is timed.
Rows are appended to benchmarks/results/lora.csv.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Row,
    append_rows,
    check_close,
    environment,
    fastest_strategies,
    peak_memory_mb,
    print_rows,
    time_fn,
    write_strategy_table,
)
from shapes import GOAL_RANK, GOAL_TOKENS_LORA, MODELS  # noqa: E402

from sails_fast import lora_linear  # noqa: E402
from sails_fast.kernels.lora_ref import lora_linear_ref  # noqa: E402

STRATEGY_PREFIX = "sails_fast:"
PROVIDERS = ("base", "torch", "peft", "sails_fast", "sails_fast:fused", "sails_fast:cublas")
MODES = ("fwd", "bwd", "fwd+bwd")


def make_case(
    m: int, k: int, n: int, r: int, dtype: torch.dtype, device: str, seed: int = 0, adapter_dtype=None
):
    """Inputs of one shape; the adapters in `adapter_dtype` (default: the base's dtype)."""
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0, dt=dtype: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dt)
    adapter_dtype = adapter_dtype or dtype
    return {
        "x": t(m, k),
        "weight": t(n, k, scale=k**-0.5),
        "bias": None,
        "lora_A": t(r, k, scale=k**-0.5, dt=adapter_dtype),
        "lora_B": t(n, r, scale=r**-0.5, dt=adapter_dtype),
        "dy": t(m, n),
        "scaling": 2.0,
    }


def provider_fn(name: str, case: dict) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """(x, lora_A, lora_B) -> y for one provider; the base weight is frozen, as in (Q)LoRA training."""
    w, s = case["weight"], case["scaling"]
    if name == "base":
        return lambda x, a, b: F.linear(x, w)
    if name == "torch":
        return lambda x, a, b: lora_linear_ref(x, w, a, b, s)
    if name == "sails_fast" or name.startswith(STRATEGY_PREFIX):
        strategy = name.removeprefix(STRATEGY_PREFIX) if name != "sails_fast" else "auto"
        return lambda x, a, b: lora_linear(x, w, a, b, s, backend="triton", strategy=strategy)
    if name == "peft":
        from peft import LoraConfig, get_peft_model
        from torch import nn

        r, k, n = case["lora_A"].shape[0], w.shape[1], w.shape[0]
        base = nn.Linear(k, n, bias=False, device=w.device, dtype=w.dtype)
        model = get_peft_model(
            nn.Sequential(base), LoraConfig(r=r, lora_alpha=int(s * r), target_modules=["0"])
        )
        layer = model.base_model.model[0].to(w.dtype)
        layer.base_layer.weight.data = w
        lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight

        def run(x, a, b):
            lora_a.data, lora_b.data = a.data, b.data
            return layer(x)

        run.params = (lora_a, lora_b)
        return run
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {name!r}")


def adapter_leaves(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh leaf copies of (x, A, B) that require grad."""
    return tuple(case[k].detach().clone().requires_grad_() for k in ("x", "lora_A", "lora_B"))


def grad_inputs(fn, provider: str, x, a, b) -> tuple:
    """What gradients are taken for: x, and the adapter; PEFT providers attach their own parameter
    objects as `fn.params`; the bare base linear has no adapter."""
    if provider == "base":
        return (x,)
    return (x, *getattr(fn, "params", (a, b)))


def forward_and_grads(fn, case: dict, provider: str):
    """y and the gradients of `grad_inputs`."""
    x, a, b = adapter_leaves(case)
    y = fn(x, a, b)
    return y, torch.autograd.grad(y, grad_inputs(fn, provider, x, a, b), case["dy"])


def compare_to_reference(provider: str, ours, ref32, ref_lo, dtype: torch.dtype) -> float:
    """Max abs error of (y, grads) against the fp32 reference; raises past the tolerance rule."""
    (y, grads), (y32, g32), (ylo, glo) = ours, ref32, ref_lo
    worst = check_close(f"{provider}/y", y, y32, ylo, dtype)
    for i, (o, r32, rlo) in enumerate(zip(grads, g32, glo, strict=True)):
        worst = max(worst, check_close(f"{provider}/grad{i}", o, r32, rlo, dtype))
    return worst


def check_provider(provider: str, case: dict, dtype: torch.dtype) -> float:
    """Max abs error over y, dx, dA, dB against the fp32 reference; raises past the tolerance rule."""
    ours = forward_and_grads(provider_fn(provider, case), case, provider)
    ref_name = "base" if provider == "base" else "torch"
    case32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    ref32 = forward_and_grads(provider_fn(ref_name, case32), case32, ref_name)
    ref_lo = forward_and_grads(provider_fn(ref_name, case), case, ref_name)
    return compare_to_reference(provider, ours, ref32, ref_lo, dtype)


def flops(m: int, k: int, n: int, r: int, mode: str) -> float:
    fwd = 2 * m * k * n + 2 * m * k * r + 2 * m * r * n
    # frozen base: dx = dy W (+ the rank-r terms), dA, dB; no weight gradient
    bwd = 2 * m * n * k + 4 * m * n * r + 4 * m * r * k
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def time_provider(
    fn, provider: str, case: dict, device: str, reps: int, *, forward_with_autograd: bool = False
) -> dict[str, tuple]:
    """mode -> (Timing, peak MB) for one provider, all modes on the same inputs."""
    x, a, b = adapter_leaves(case)
    inputs = grad_inputs(fn, provider, x, a, b)
    y = fn(x, a, b)
    runs = {
        "fwd": lambda: fn(x, a, b),
        "bwd": lambda: torch.autograd.grad(y, inputs, case["dy"], retain_graph=True),
        "fwd+bwd": lambda: torch.autograd.grad(fn(x, a, b), inputs, case["dy"]),
    }
    results = {}
    for mode, run in runs.items():
        no_grad = mode == "fwd" and not forward_with_autograd
        with torch.no_grad() if no_grad else torch.enable_grad():
            results[mode] = (time_fn(run, device, reps=reps), peak_memory_mb(run, device))
    return results


def dtype_label(dtype: torch.dtype, adapter_dtype: torch.dtype | None) -> str:
    """The rows' dtype column: the base's, and the adapters' when they differ (PEFT's fp32 default)."""
    label = str(dtype).removeprefix("torch.")
    if adapter_dtype is not None and adapter_dtype != dtype:
        label += f", adapters {str(adapter_dtype).removeprefix('torch.')}"
    return label


def bench_case(
    model: str, proj: str, m: int, r: int, dtype: torch.dtype, device: str, providers, reps: int,
    adapter_dtype: torch.dtype | None = None,
):  # fmt: skip
    k, n = MODELS[model].projections()[proj]
    case = make_case(m, k, n, r, dtype, device, adapter_dtype=adapter_dtype)
    env = environment(device)
    rows = []
    for provider in providers:
        if provider.startswith("sails_fast") and torch.device(device).type != "cuda":
            continue
        err = check_provider(provider, case, dtype)
        for mode, (t, peak) in time_provider(
            provider_fn(provider, case), provider, case, device, reps
        ).items():
            rank = 0 if provider == "base" else r
            rows.append(
                Row(
                    op="lora_linear",
                    model=model,
                    shape=proj,
                    dims=f"M={m} K={k} N={n} r={r}",
                    dtype=dtype_label(dtype, adapter_dtype),
                    provider=provider,
                    mode=mode,
                    median_ms=t.median_ms,
                    p20_ms=t.p20_ms,
                    p80_ms=t.p80_ms,
                    tflops=flops(m, k, n, rank, mode) / (t.median_ms * 1e-3) / 1e12,
                    peak_mem_mb=peak,
                    max_abs_err=err,
                    env=env,
                )  # fmt: skip
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few small shapes (the CPU default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tokens", type=int, default=None, help=f"tokens M (default {GOAL_TOKENS_LORA} on CUDA)"
    )
    parser.add_argument("--rank", type=int, default=GOAL_RANK)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    parser.add_argument(
        "--adapter-dtype", choices=["float32", "float16", "bfloat16"], default=None,
        help="the adapters' dtype (default: the base's; float32 is PEFT's default over a 16-bit base)",
    )  # fmt: skip
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument(
        "--projs", nargs="*", default=None, help="projection names (default: a few per model)"
    )
    parser.add_argument("--providers", nargs="*", default=list(PROVIDERS))
    parser.add_argument(
        "--no-save", action="store_true", help="print only; do not append to results/lora.csv"
    )
    parser.add_argument(
        "--write-strategy-table", action="store_true", help="record the faster strategy (GPU)"
    )
    args = parser.parse_args(argv)
    adapter_dtype = getattr(torch, args.adapter_dtype) if args.adapter_dtype else None
    if args.write_strategy_table and adapter_dtype is not None:
        parser.error(
            "--write-strategy-table: the table is keyed by shape only; run it without --adapter-dtype"
        )

    cuda = torch.device(args.device).type == "cuda"
    quick = args.quick or not cuda
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    tokens = args.tokens or (GOAL_TOKENS_LORA if cuda else 2048)
    models = args.models or (["smollm2-135m"] if quick else list(MODELS))
    projs = args.projs or (
        ["q_proj", "gate_proj"] if quick else ["q_proj", "o_proj", "gate_proj", "down_proj"]
    )
    rows = []
    for model in models:
        for proj in projs:
            rows += bench_case(
                model, proj, tokens, args.rank, dtype, args.device, args.providers,
                reps=5 if quick else 20, adapter_dtype=adapter_dtype,
            )  # fmt: skip
    print_rows(rows)
    if not cuda:
        print(
            "CPU rows: sails_fast's Triton path is not timed on CPU (the interpreter is no speed measure); "
            "its CPU backend is the 'torch' reference."
        )
    if not args.no_save:
        print(f"appended {len(rows)} rows to {append_rows('lora.csv', rows)}")
    if args.write_strategy_table:
        write_strategy_table("lora_linear", strategy_choices(rows, args.rank), args.device)


def strategy_choices(rows: list[Row], r: int) -> dict[str, str]:
    """{strategy-table shape bucket: the faster strategy} from the fwd+bwd rows of this run."""
    from sails_fast.fused.strategy import shape_key

    choices = {}
    for (_, _, dims, _), choice in fastest_strategies(rows, STRATEGY_PREFIX).items():
        m, k, n = (int(v) for v in re.findall(r"[MKN]=(\d+)", dims))
        choices[shape_key("lora_linear", M=m, K=k, N=n, R=r)] = choice
    return choices


# pytest-benchmark: `pytest benchmarks/bench_lora.py --benchmark-only`
def _pytest_providers():
    return [p for p in PROVIDERS if not p.startswith("sails_fast") or torch.cuda.is_available()]


try:
    import pytest

    @pytest.mark.parametrize("provider", _pytest_providers())
    def test_lora_fwd_bwd(benchmark, provider):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        k, n = MODELS["gemma-2-9b" if device == "cuda" else "smollm2-135m"].projections()["q_proj"]
        m = GOAL_TOKENS_LORA if device == "cuda" else 1024
        case = make_case(m, k, n, GOAL_RANK, dtype, device)
        check_provider(provider, case, dtype)
        fn = provider_fn(provider, case)
        x, a, b = adapter_leaves(case)
        inputs = grad_inputs(fn, provider, x, a, b)

        def step():
            torch.autograd.grad(fn(x, a, b), inputs, case["dy"])
            if device == "cuda":
                torch.cuda.synchronize()

        benchmark(step)
except ImportError:  # running as a script without pytest installed
    pass


if __name__ == "__main__":
    main()
