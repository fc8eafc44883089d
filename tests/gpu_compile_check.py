"""Compile every Triton kernel ahead of time for NVIDIA targets, on a machine without a GPU.

The interpreter proves the math, not that a kernel compiles for a device (tl.dot's K >= 16, dtype rules,
input_precision, register-tile limits). This script runs the real launchers on CPU tensors with launches
intercepted: each launch, and every autotune config it would try, is captured instead of executed, then
compiled with `triton.compile` for sm_90 (Hopper) and sm_80 (Ampere) down to a cubin with the ptxas that
ships inside triton. No kernel runs; a compile error fails the script.

    python tests/gpu_compile_check.py [--arch 90 80] [--all-configs]

Run by tests/test_gpu_compile.py in a subprocess (it must not see TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.bool: "i1",
}
_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")

captured: list[tuple[JITFunction, dict, dict]] = []


def _capture_run(self, *args, grid=None, warmup=False, **kwargs):
    bound = dict(zip(self.arg_names, args, strict=False))
    bound.update({k: v for k, v in kwargs.items() if k in self.arg_names})
    options = {k: v for k, v in kwargs.items() if k in _OPTION_KEYS}
    captured.append((self, bound, options))


def _capture_autotune(self, *args, **kwargs):
    named = dict(zip(self.arg_names, args, strict=False))
    configs = self.configs
    if self.early_config_prune:
        configs = self.early_config_prune(configs, {**named, **kwargs})
    for config in configs:
        self.fn.run(*args, **kwargs, **config.all_kwargs())


def _heuristics_run(self, *args, **kwargs):
    named = {**dict(zip(self.arg_names, args, strict=False)), **kwargs}
    for name, fn in self.values.items():
        kwargs[name] = fn(named)
    return self.fn.run(*args, **kwargs)


def _signature(fn: JITFunction, bound: dict) -> tuple[dict, dict]:
    signature, constexprs = {}, {}
    for i, param in enumerate(fn.params):
        value = bound.get(param.name)
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TORCH_TO_TRITON[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i64" if abs(value) >= 2**31 else "i32"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        elif value is None:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = None
        else:
            raise TypeError(f"{fn.__name__}.{param.name}: cannot type {type(value).__name__}")
    return signature, constexprs


def exercise_launchers() -> None:
    """Call every launcher on small CPU tensors, in each dtype and mode the library uses."""
    import sails_fast._backend as backend

    backend.triton_usable = lambda *tensors: True  # route public functions to the Triton launchers
    from sails_fast.kernels import lora as K

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        m, k, n, r = 300, 576, 1536, 16
        x = torch.randn(m, k, generator=g).to(dtype)
        w = torch.randn(n, k, generator=g).to(dtype)
        a = torch.randn(r, k, generator=g)
        b = torch.randn(n, r, generator=g)
        dy = torch.randn(m, n, generator=g).to(dtype)
        for p in (0.0, 0.1):
            xa = K.rank_projection(x, a, p, 1)
            K.lora_forward(x, w, xa, b, 2.0, torch.randn(n).to(dtype))
            K.lora_forward(x, w, xa, b, 2.0, None)
            g_ = K.rank_projection(dy, b.t())
            K.lora_backward_dx(dy, w, g_, a, 2.0, p, 1)
            K.lora_weight_grad(g_, x, 2.0, p, 1)
            K.lora_weight_grad(dy, xa, 2.0)
        K.lora_dropout_mask((m, k), 0.1, 3, torch.device("cpu"))

    _exercise_optional("sails_fast.nf4", _nf4_launches)
    _exercise_optional("sails_fast.sae_stats", _sae_stats_launches)


def _exercise_optional(module: str, fn) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        return
    fn()


def _nf4_launches() -> None:
    from sails_fast import dequantize_nf4, qlora_linear, quantize_nf4

    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.randn(1536, 576, generator=g)
        for double_quant in (True, False):
            nf4 = quantize_nf4(w.to(dtype), blocksize=64, double_quant=double_quant)
            dequantize_nf4(nf4, dtype)
        a = torch.randn(16, 576, generator=g, requires_grad=True)
        b = torch.randn(1536, 16, generator=g, requires_grad=True)
        for path in ("fused", "dequant"):
            x = torch.randn(300, 576, generator=g).to(dtype).requires_grad_()
            try:
                y = qlora_linear(x, nf4, a, b, 2.0, None, 0.1, path=path, seed=1)
                y.backward(torch.ones_like(y))
            except RuntimeError:
                # outputs of intercepted launches are garbage; only the launches matter here
                pass


def _sae_stats_launches() -> None:
    from sails_fast import SAEWeights, sae_feature_stats

    g = torch.Generator().manual_seed(2)
    d, F, T = 576, 4608, 300
    for activation, extra in (
        ("relu", {}),
        ("jumprelu", {"threshold": torch.rand(F, generator=g)}),
        ("topk", {"k": 32}),
    ):
        sae = SAEWeights(
            W_enc=torch.randn(d, F, generator=g), b_enc=torch.randn(F, generator=g),
            W_dec=torch.randn(F, d, generator=g), b_dec=torch.randn(d, generator=g),
            activation=activation, **extra,
        )  # fmt: skip
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(T, d, generator=g).to(dtype)
            labels = torch.randint(-1, 2, (T,), generator=g)
            for deterministic in (False, True):
                # outputs of intercepted launches are garbage; only the launches matter here
                with contextlib.suppress(RuntimeError, ValueError):
                    sae_feature_stats(x, sae, labels, backend="triton", deterministic=deterministic)


@triton.jit
def _invalid_on_gpu_kernel(a_ptr, b_ptr, c_ptr):
    # tl.dot with an inner dimension of 8: the interpreter accepts it, a GPU compile must not
    o = tl.arange(0, 8)
    a = tl.load(a_ptr + o[:, None] * 8 + o[None, :])
    b = tl.load(b_ptr + o[:, None] * 8 + o[None, :])
    tl.store(c_ptr + o[:, None] * 8 + o[None, :], tl.dot(a, b))


def self_test(archs: list[int]) -> int:
    """The check must be able to fail: a kernel that only the interpreter accepts has to be refused."""
    sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32"}
    for arch in archs:
        try:
            triton.compile(
                ASTSource(_invalid_on_gpu_kernel, signature=sig), target=GPUTarget("cuda", arch, 32)
            )
        except Exception as err:
            print(f"sm_{arch}: refused as expected ({type(err).__name__})")
            continue
        print(f"sm_{arch}: a tl.dot with K=8 compiled: the check cannot catch GPU-only errors")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, nargs="*", default=[90, 80])
    parser.add_argument("--all-configs", action="store_true", help="compile every autotune config (slower)")
    parser.add_argument(
        "--self-test", action="store_true", help="check a GPU-invalid kernel fails to compile"
    )
    args = parser.parse_args(argv)
    if args.self_test:
        return self_test(args.arch)

    JITFunction.run = _capture_run
    Autotuner.run = _capture_autotune
    Heuristics.run = _heuristics_run
    exercise_launchers()

    unique = {}
    for fn, bound, options in captured:
        signature, constexprs = _signature(fn, bound)
        key = (fn.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())),
               tuple(sorted(options.items())))  # fmt: skip
        unique.setdefault(key, (fn, signature, constexprs, options))
    if not args.all_configs:
        # one variant per (kernel, argument types): the first config the autotuner would try
        firsts = {}
        for key, item in unique.items():
            firsts.setdefault((key[0], key[1]), item)
        unique = firsts

    failures = 0
    start = time.perf_counter()
    for fn, signature, constexprs, options in unique.values():
        for arch in args.arch:
            try:
                src = ASTSource(fn, signature=signature, constexprs=constexprs)
                kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                assert kernel.asm.get("cubin"), "no cubin produced"
            except Exception as err:  # report every failing kernel, not only the first
                failures += 1
                consts = {fn.params[i[0]].name: v for i, v in constexprs.items()}
                print(f"FAIL sm_{arch} {fn.__name__} {consts} {options}: {type(err).__name__}: {err}")
    n = len(unique) * len(args.arch)
    seconds = time.perf_counter() - start
    print(f"compiled {n - failures}/{n} kernel variants for sm_{args.arch} in {seconds:.1f} s "
          f"(triton {triton.__version__}); {failures} failed")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
