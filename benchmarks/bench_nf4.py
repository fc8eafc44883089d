"""NF4 dequantisation (GB/s) and the QLoRA linear (forward, backward) against bitsandbytes and PEFT.

    python benchmarks/bench_nf4.py --quick            # CPU: SmolLM2 shapes, fp32
    OMP_NUM_THREADS=1 SAILS_FAST_BENCH_THREADS=1 python benchmarks/bench_nf4.py --quick
                                                      # CPU on a shared machine: one thread, no stalls at
                                                      # OpenMP barriers (how the committed CPU rows ran)
    python benchmarks/bench_nf4.py                    # CUDA: every named shape, bf16, 8192 tokens
    python benchmarks/bench_nf4.py --ops qlora --adapter-dtype float32   # fp32 adapters (PEFT's default)
    pytest benchmarks/bench_nf4.py --benchmark-only   # the QLoRA step through pytest-benchmark

Dequantisation providers: "torch" (the plain reference), "bnb" (bitsandbytes' dequantize_4bit),
"sails_fast" (the Triton kernel). Each must equal the reference exactly before it is timed.
GB/s counts the bytes read (codes, absmax, nested absmax) and written (the output).

QLoRA providers (x [M, K], NF4 weight [N, K], rank r, frozen base; gradients of x, A, B):
  "torch"         qlora_linear_ref: dequantise, then F.linear with autograd (keeps W for the backward)
  "peft_bnb"      PEFT's lora.bnb.Linear4bit over bitsandbytes' Linear4bit (the real-world baseline)
  "dense_torch"   the LoRA reference on an unquantised weight (what the 4-bit path is measured against)
  "dense_sails"   sails_fast's fused bf16 LoRA on an unquantised weight (CUDA)
  "sails_fused"   qlora_linear strategy "fused": W tiles dequantised inside the GEMM (CUDA)
  "sails_dequant" strategy "dequant": W dequantised once into a reused buffer, then the fused LoRA GEMMs
  "sails_cublas"  strategy "cublas": dequantised once, then torch's GEMM (cuBLAS) on the rank-r fill (CUDA)
`--write-strategy-table` records the fastest strategy per shape for this GPU in
sails_fast/fused/strategy_table.json, which "auto" reads.
Every provider's output and gradients pass the fp32-reference rule before timing. The Triton providers
run on CPU only through the interpreter, a correctness tool and not a speed measurement, so CPU rows
never time them. Rows are appended to benchmarks/results/nf4.csv.
"""

from __future__ import annotations

import argparse
import os
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
    print_rows,
    set_cpu_threads,
    time_fn,
    write_strategy_table,
)

# the frozen-base LoRA benchmark's correctness gate, FLOP count and timing loop, shared
from bench_lora import (
    adapter_leaves,
    compare_to_reference,
    dtype_label,
    flops,
    forward_and_grads,
    grad_inputs,
    time_provider,
)  # noqa: E402
from shapes import GOAL_RANK, GOAL_TOKENS_LORA, MODELS  # noqa: E402

from sails_fast import NF4Weight, dequantize_nf4, lora_linear, qlora_linear, quantize_nf4  # noqa: E402
from sails_fast.kernels.lora_ref import lora_linear_ref  # noqa: E402
from sails_fast.kernels.nf4_ref import dequantize_nf4_ref, qlora_linear_ref  # noqa: E402

DEQUANT_PROVIDERS = ("torch", "bnb", "sails_fast")
STRATEGY_PREFIX = "sails_"
QLORA_PROVIDERS = (
    "torch", "peft_bnb", "dense_torch", "dense_sails", "sails_fused", "sails_dequant", "sails_cublas"
)  # fmt: skip
CUDA_ONLY = ("sails_fast", "dense_sails", "sails_fused", "sails_dequant", "sails_cublas")
BLOCKSIZE = 64


def have_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def quantize_case(w: torch.Tensor):
    """(NF4Weight, PEFT+bnb layer or None). With bitsandbytes, bitsandbytes quantises and every provider
    reads its bytes; without it (the GPU machine), quantize_nf4 produces the same bytes."""
    if not have_bnb():
        return quantize_nf4(w, BLOCKSIZE, True), None
    import bitsandbytes as bnb

    n, k = w.shape
    base = bnb.nn.Linear4bit(k, n, bias=False, compress_statistics=True, quant_type="nf4", device="meta")
    base.weight = bnb.nn.Params4bit(
        w.detach().cpu(), requires_grad=False, quant_type="nf4", blocksize=BLOCKSIZE
    )
    base = base.to(w.device)
    return NF4Weight.from_bnb(base.weight), base


def cpu_note(device: str) -> str:
    """CPU timings on a shared machine move with its load: record it next to them."""
    if torch.device(device).type == "cuda":
        return ""
    return f"CPU row; 1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def dequant_bytes(nf4: NF4Weight, dtype: torch.dtype) -> int:
    out = nf4.numel * torch.empty(0, dtype=dtype).element_size()
    return nf4.nbytes + out


def bench_dequant(model: str, proj: str, dtype: torch.dtype, device: str, providers, reps: int) -> list[Row]:
    k, n = MODELS[model].projections()[proj]
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * k**-0.5).to(device)
    nf4, base = quantize_case(w)
    ref = dequantize_nf4_ref(nf4, dtype)
    fns: dict[str, Callable[[], torch.Tensor]] = {"torch": lambda: dequantize_nf4_ref(nf4, dtype)}
    if base is not None:
        import bitsandbytes.functional as bnbF

        packed, state = nf4.to_bnb()
        state.dtype = dtype
        fns["bnb"] = lambda: bnbF.dequantize_4bit(packed, state)
    if torch.device(device).type == "cuda":
        fns["sails_fast"] = lambda: dequantize_nf4(nf4, dtype, backend="triton")
    env, rows = environment(device), []
    for provider in providers:
        if provider not in fns:
            continue
        out = fns[provider]()
        if not torch.equal(out.reshape(ref.shape), ref):
            raise AssertionError(f"dequant/{provider}: differs from the reference; not timing it")
        t = time_fn(fns[provider], device, reps=reps)
        rows.append(
            Row(
                op="nf4_dequant",
                model=model,
                shape=proj,
                dims=f"N={n} K={k} blocksize={BLOCKSIZE} dq=1",
                dtype=str(dtype).removeprefix("torch."),
                provider=provider,
                mode="fwd",
                median_ms=t.median_ms,
                p20_ms=t.p20_ms,
                p80_ms=t.p80_ms,
                gbps=dequant_bytes(nf4, dtype) / (t.median_ms * 1e-3) / 1e9,
                max_abs_err=0.0,
                note=cpu_note(device),
                env=env,
            )  # fmt: skip
        )
    return rows


def make_case(
    m: int, k: int, n: int, r: int, dtype: torch.dtype, device: str, seed: int = 0, adapter_dtype=None
) -> dict:
    """Inputs of one shape; the adapters in `adapter_dtype` (default: the base's dtype)."""
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0, dt=dtype: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dt)
    adapter_dtype = adapter_dtype or dtype
    w32 = (torch.randn(n, k, generator=g) * k**-0.5).to(device)
    nf4, base = quantize_case(w32.to(dtype))
    return {
        "x": t(m, k),
        "nf4": nf4,
        "bnb_base": base,
        # the dense providers use the dequantised weight, so every provider computes the same function
        "weight": dequantize_nf4_ref(nf4, dtype),
        "lora_A": t(r, k, scale=k**-0.5, dt=adapter_dtype),
        "lora_B": t(n, r, scale=r**-0.5, dt=adapter_dtype),
        "dy": t(m, n),
        "scaling": 2.0,
    }


def provider_fn(name: str, case: dict) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """(x, lora_A, lora_B) -> y for one provider."""
    nf4, w, s = case["nf4"], case["weight"], case["scaling"]
    if name == "torch":
        return lambda x, a, b: qlora_linear_ref(x, nf4, a, b, s)
    if name == "dense_torch":
        return lambda x, a, b: lora_linear_ref(x, w, a, b, s)
    if name == "dense_sails":
        return lambda x, a, b: lora_linear(x, w, a, b, s, backend="triton")
    if name in ("sails_fused", "sails_dequant", "sails_cublas"):
        strategy = name.removeprefix(STRATEGY_PREFIX)
        return lambda x, a, b: qlora_linear(x, nf4, a, b, s, backend="triton", strategy=strategy)
    if name == "peft_bnb":
        from peft import LoraConfig, get_peft_model
        from torch import nn

        r = case["lora_A"].shape[0]
        model = nn.Sequential(case["bnb_base"])
        model.is_loaded_in_4bit = True
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=int(s * r), target_modules=["0"]))
        # training mode: in eval mode without gradients bitsandbytes repacks CPU weights for inference
        layer = model.base_model.model[0].train()
        lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight

        def run(x, a, b):
            lora_a.data, lora_b.data = a.data, b.data
            return layer(x)

        run.params = (lora_a, lora_b)
        return run
    raise ValueError(f"provider: expected one of {QLORA_PROVIDERS}, got {name!r}")


def check_provider(provider: str, case: dict, dtype: torch.dtype) -> float:
    """Max abs error over y, dx, dA, dB against the fp32 reference; raises past the tolerance rule."""
    ours = forward_and_grads(provider_fn(provider, case), case, provider)
    case32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    ref32 = forward_and_grads(provider_fn("torch", case32), case32, "torch")
    ref_lo = forward_and_grads(provider_fn("torch", case), case, "torch")
    return compare_to_reference(provider, ours, ref32, ref_lo, dtype)


def bench_qlora(model, proj, m, r, dtype, device, providers, reps, adapter_dtype=None) -> list[Row]:
    k, n = MODELS[model].projections()[proj]
    case = make_case(m, k, n, r, dtype, device, adapter_dtype=adapter_dtype)
    env, rows = environment(device), []
    cuda = torch.device(device).type == "cuda"
    for provider in providers:
        if (provider in CUDA_ONLY and not cuda) or (provider == "peft_bnb" and case["bnb_base"] is None):
            continue
        err = check_provider(provider, case, dtype)
        # the forward is timed with autograd on (as in training): bitsandbytes takes another path without it
        timings = time_provider(
            provider_fn(provider, case), provider, case, device, reps, forward_with_autograd=True
        )
        for mode, (t, peak) in timings.items():
            rows.append(
                Row(
                    op="qlora_linear",
                    model=model,
                    shape=proj,
                    dims=f"M={m} K={k} N={n} r={r}",
                    dtype=dtype_label(dtype, adapter_dtype),
                    provider=provider,
                    mode=mode,
                    median_ms=t.median_ms,
                    p20_ms=t.p20_ms,
                    p80_ms=t.p80_ms,
                    tflops=flops(m, k, n, r, mode) / (t.median_ms * 1e-3) / 1e12,
                    peak_mem_mb=peak,
                    max_abs_err=err,
                    note=cpu_note(device),
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
        help="QLoRA: the adapters' dtype (default: the base's; float32 is PEFT's default)",
    )  # fmt: skip
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument(
        "--projs", nargs="*", default=None, help="projection names (default: a few per model)"
    )
    parser.add_argument("--ops", nargs="*", default=["dequant", "qlora"], choices=["dequant", "qlora"])
    parser.add_argument("--providers", nargs="*", default=None)
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to results/nf4.csv")
    parser.add_argument("--write-strategy-table", action="store_true", help="record the fastest strategy")
    args = parser.parse_args(argv)
    adapter_dtype = getattr(torch, args.adapter_dtype) if args.adapter_dtype else None
    if args.write_strategy_table and adapter_dtype is not None:
        parser.error(
            "--write-strategy-table: the table is keyed by shape only; run it without --adapter-dtype"
        )
    set_cpu_threads()

    cuda = torch.device(args.device).type == "cuda"
    quick = args.quick or not cuda
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    tokens = args.tokens or (GOAL_TOKENS_LORA if cuda else 2048)
    models = args.models or (["smollm2-135m"] if quick else list(MODELS))
    projs = args.projs or (
        ["q_proj", "gate_proj"] if quick else ["q_proj", "o_proj", "gate_proj", "down_proj"]
    )
    reps = 5 if quick else 20
    rows = []
    for model in models:
        for proj in projs:
            if "dequant" in args.ops:
                rows += bench_dequant(
                    model, proj, dtype, args.device, args.providers or DEQUANT_PROVIDERS, reps
                )
            if "qlora" in args.ops:
                providers = args.providers or QLORA_PROVIDERS
                rows += bench_qlora(
                    model, proj, tokens, args.rank, dtype, args.device, providers, reps, adapter_dtype
                )
    print_rows(rows)
    if cuda:
        print("\n".join(_goal_summary(rows)))
    for r in rows:
        if r.gbps is not None:
            print(f"  {r.model} {r.shape} dequant {r.provider}: {r.gbps:.2f} GB/s")
    if not cuda:
        print(
            "CPU rows: the Triton providers are not timed on CPU (the interpreter is no speed measure); "
            "sails_fast's CPU backend is the 'torch' reference."
        )
    if not have_bnb():
        print("bitsandbytes is not installed: no 'bnb' / 'peft_bnb' rows; quantize_nf4 made the weights.")
    if not args.no_save:
        print(f"appended {len(rows)} rows to {append_rows('nf4.csv', rows)}")
    if args.write_strategy_table:
        write_strategy_table("qlora_linear", strategy_choices(rows, args.rank), args.device)


def strategy_choices(rows: list[Row], r: int) -> dict[str, str]:
    """{strategy-table shape bucket: the fastest strategy} from this run's fwd+bwd QLoRA rows."""
    from sails_fast.fused.strategy import shape_key

    qlora_rows = [row for row in rows if row.provider in QLORA_PROVIDERS]
    choices = {}
    for (_, _, dims, _), choice in fastest_strategies(qlora_rows, STRATEGY_PREFIX).items():
        m, k, n = (int(v) for v in re.findall(r"[MKN]=(\d+)", dims))
        choices[shape_key("qlora_linear", M=m, K=k, N=n, R=r)] = choice
    return choices


def _goal_summary(rows: list[Row]) -> list[str]:
    """The issue's GPU goals, read off fwd+bwd rows (printed by callers that want them)."""
    by = {(r.model, r.shape, r.provider, r.mode): r.median_ms for r in rows}
    lines = []
    for (model, shape, provider, mode), ms in by.items():
        if mode != "fwd+bwd" or not provider.startswith("sails_"):
            continue
        peft = by.get((model, shape, "peft_bnb", mode))
        dense = by.get((model, shape, "dense_sails", mode))
        ratio = lambda other, ms=ms: "n/a" if other is None else f"{other / ms:.2f}x"
        lines.append(
            f"{model} {shape} {provider}: vs peft_bnb {ratio(peft)}, dense_sails/this {ratio(dense)}"
        )
    return lines


# pytest-benchmark: `pytest benchmarks/bench_nf4.py --benchmark-only`
def _pytest_providers():
    cuda = torch.cuda.is_available()
    return [p for p in QLORA_PROVIDERS if (cuda or p not in CUDA_ONLY) and (p != "peft_bnb" or have_bnb())]


try:
    import pytest

    @pytest.mark.parametrize("provider", _pytest_providers())
    def test_qlora_fwd_bwd(benchmark, provider):
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
