"""Backend choice shared by every op: the Triton kernels or the plain PyTorch reference."""

from __future__ import annotations

import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "torch"]
BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(*tensors: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if interpreting():
        return all(t.device.type == "cpu" for t in tensors)
    return all(t.is_cuda for t in tensors)


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """'auto' -> 'triton' where the kernels can run on these tensors, else 'torch'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if triton_usable(*tensors) else "torch"
    if backend == "triton" and not triton_usable(*tensors):
        raise ValueError(
            "backend: 'triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before import; "
            f"got tensors on {sorted({str(t.device) for t in tensors})}"
        )
    return backend
