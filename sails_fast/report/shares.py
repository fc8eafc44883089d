"""How much of each trained adapter's update lies in the span of the basis that initialised it."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

# ----- share of the update in span(U)


def update_in_span(A: torch.Tensor, B: torch.Tensor, U: torch.Tensor, side: str) -> float:
    """Share of dW = B A inside span(U) on the given side (definition in the module docstring).

    Args:
        A: [r, d_in] lora_A weight. B: [d_out, r] lora_B weight.
        U: [d, r_U] orthonormal basis; d = d_in for side "read", d = d_out for side "write".
        side: "read" (||dW U U^T||^2 / ||dW||^2) or "write" (||U U^T dW||^2 / ||dW||^2).

    Returns:
        float in [0, 1]; NaN when dW = 0 (e.g. B = 0 before training).

    Example:
        >>> U = torch.linalg.qr(torch.randn(64, 4)).Q
        >>> update_in_span(U.T, torch.randn(32, 4), U, "read")     # A = U^T: 1.0
    """
    A, B, U = A.double(), B.double(), U.double()
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"A, B: expected [r, d_in] and [d_out, r], got {list(A.shape)} and {list(B.shape)}")
    # ||B A||_F^2 = tr((B^T B)(A A^T)): never forms the [d_out, d_in] product
    total = float(((B.T @ B) * (A @ A.T)).sum())
    if side == "read":
        if U.shape[0] != A.shape[1]:
            raise ValueError(f"U: expected {A.shape[1]} rows (d_in) for a read module, got {U.shape[0]}")
        inside = float(((B @ (A @ U)) ** 2).sum())
    elif side == "write":
        if U.shape[0] != B.shape[0]:
            raise ValueError(f"U: expected {B.shape[0]} rows (d_out) for a write module, got {U.shape[0]}")
        inside = float((((U.T @ B) @ A) ** 2).sum())
    else:
        raise ValueError(f"side: expected 'read' or 'write', got {side!r}")
    return inside / total if total > 0 else float("nan")


def adapter_update_shares(
    adapter: dict[str, torch.Tensor], modules: Sequence[dict], bases: dict
) -> list[dict]:
    """`update_in_span` of every initialised module of a saved PEFT adapter.

    Args:
        adapter: the adapter state dict (keys "<module>.lora_A.weight" / ".lora_B.weight", PEFT's format).
        modules: the init report's modules: dicts with "name", "side", "basis", "block".
        bases: basis key -> U [d, r_U] (Subspace.bases[key].U).

    Returns:
        list of {"name", "block", "side", "basis", "share", "baseline" (r_U / d), "norm" (||B A||_F)}.

    Example:
        >>> adapter_update_shares(load_file("adapter_model.safetensors"), init["modules"], {10: U10})
    """
    out = []
    for m in modules:
        name = m["name"]
        # PEFT drops the adapter name from the saved keys; match on the module path suffix
        key_a = next((k for k in adapter if k.endswith(".lora_A.weight") and _same_module(k, name)), None)
        if key_a is None or int(m["basis"]) not in bases:
            continue
        A, B = adapter[key_a], adapter[key_a.replace(".lora_A.weight", ".lora_B.weight")]
        U = bases[int(m["basis"])]
        share = update_in_span(A, B, U, m["side"])
        norm = math.sqrt(max(float(((B.double().T @ B.double()) * (A.double() @ A.double().T)).sum()), 0.0))
        out.append({"name": name, "block": m.get("block"), "side": m["side"], "basis": int(m["basis"]),
                    "share": share, "baseline": U.shape[1] / U.shape[0], "norm": norm})  # fmt: skip
    return out


def _same_module(key: str, name: str) -> bool:
    mod = key[: -len(".lora_A.weight")]
    strip = lambda s: re.sub(r"^(base_model\.model\.)+", "", s)
    return strip(mod) == strip(name)
