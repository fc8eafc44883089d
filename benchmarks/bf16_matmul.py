"""Is bf16 a speed-up on this CPU? Times one SAE-encoder-sized matmul ([512 x 576] @ [576 x 4608], the
embedded SmolLM2's hidden size and SAE width) in fp32 and in bf16, and prints whether oneDNN has a bf16
path here (what `sails_fast.models.loading.fast_bf16_on_cpu` reads to choose the SAE training dtype).

    python benchmarks/bf16_matmul.py
"""

from __future__ import annotations

import time

import torch

from sails_fast.models.loading import fast_bf16_on_cpu


def time_matmul(dtype: torch.dtype, repeats: int = 5) -> float:
    """Median seconds of one [512 x 576] @ [576 x 4608] matmul in `dtype` (after a warm-up)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(512, 576, generator=g).to(dtype)
    b = torch.randn(576, 4608, generator=g).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    fp32, bf16 = time_matmul(torch.float32), time_matmul(torch.bfloat16)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    print(f"fp32 {fp32 * 1e3:.1f} ms, bf16 {bf16 * 1e3:.1f} ms (bf16 / fp32 = {bf16 / fp32:.1f}x)")
    print(f"fast_bf16_on_cpu(): {fast_bf16_on_cpu()} (SAE training uses bf16 only when True)")


if __name__ == "__main__":
    main()
