"""The fused ops as registered PyTorch operators (torch.library custom ops): forward, backward, fake
(shape-only) implementations and autograd, so `torch.compile` keeps them as single nodes of its graph
instead of tracing into Triton launches, and autograd saves only what they say.

    sails_fast::lora_linear            (x, W, A, B, bias, ...) -> (y [M, N], xa [M, r])
    sails_fast::lora_linear_backward   (dy, x, W, A, B, xa, ...) -> (dx, dA, dB)   (empty where not needed)
    sails_fast::qlora_linear           the same over an NF4 weight (its tensors and format as arguments)
    sails_fast::qlora_linear_backward

The dropout seed travels as a 0-d int64 tensor, so drawing it inside a compiled region is a tensor op,
not a Python number that would break the graph; "auto" is resolved inside the op for the same reason.
The public functions (`sails_fast.lora_linear`, `qlora_linear`) validate arguments, apply autocast and
call these; the kernels and launchers are `sails_fast.kernels.*`.
"""

from __future__ import annotations

import torch

from sails_fast.fused import strategy as strategies

_EMPTY = torch.Size([0])


def _chosen(op: str, strategy: str, x: torch.Tensor, K: int, N: int, R: int) -> str:
    if strategy != "auto":
        return strategy
    return strategies.choose(op, x.device, M=x.shape[0], K=K, N=N, R=R)


def _dense_forward(strategy: str):
    from sails_fast.kernels import lora as K

    return K.lora_forward if strategy == "fused" else K.lora_forward_cublas


def _dense_dx(strategy: str):
    from sails_fast.kernels import lora as K

    return K.lora_backward_dx if strategy == "fused" else K.lora_backward_dx_cublas


def adapter_grads(dy, x, xa, lora_A, lora_B, scaling, dropout_p, seed, needs, backward_dx):
    """(dx, dA, dB) with empty tensors where not needed: the backward shared by the dense and the 4-bit
    layer. g = dy @ B and dB come from one read of dy; dx = `backward_dx(dy, g=..., lora_A=..., ...)`
    (the strategy's base GEMM with the rank-r term); dA = scaling * g^T @ dropout(x)."""
    from sails_fast.kernels.lora_rank import dy_projections, lora_weight_grad

    need_x, need_a, need_b = needs
    empty = dy.new_empty(_EMPTY)
    dx, da, db = empty, lora_A.new_empty(_EMPTY), lora_B.new_empty(_EMPTY)
    if need_x or need_a or need_b:
        g, db_full = dy_projections(dy, lora_B, xa, scaling)  # [M, r] and [out, r] fp32
        if need_b:
            db = db_full.to(lora_B.dtype)
        if need_x:
            dx = backward_dx(dy, g=g, lora_A=lora_A, scaling=scaling, dropout_p=dropout_p, seed=seed)
        if need_a:
            da = lora_weight_grad(g, x, scaling, dropout_p, seed).to(lora_A.dtype)  # [r, in]
    return dx, da, db


def _fake_grads(dy, x, lora_A, lora_B, need_x, need_a, need_b):
    return (
        torch.empty_like(x) if need_x else x.new_empty(_EMPTY),
        torch.empty_like(lora_A) if need_a else lora_A.new_empty(_EMPTY),
        torch.empty_like(lora_B) if need_b else lora_B.new_empty(_EMPTY),
    )


def _or_none(t: torch.Tensor, needed: bool) -> torch.Tensor | None:
    return t if needed else None


# ---------------------------------------------------------------------------------------- dense LoRA

_LORA_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? bias, float scaling, float dropout_p, "
    "Tensor seed, str strategy) -> (Tensor, Tensor)"
)


_LORA_BACKWARD_SCHEMA = (
    "(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor xa, float scaling, "
    "float dropout_p, Tensor seed, str strategy, bool need_x, bool need_a, bool need_b) "
    "-> (Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("sails_fast::lora_linear", mutates_args=(), schema=_LORA_SCHEMA)
def lora_linear_op(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, strategy):
    from sails_fast.kernels.lora_rank import rank_projection

    with torch.autocast(x.device.type, enabled=False):
        strategy = _chosen("lora_linear", strategy, x, weight.shape[1], weight.shape[0], lora_A.shape[0])
        xa = rank_projection(x, lora_A, dropout_p, int(seed))
        y = _dense_forward(strategy)(x, weight, xa, lora_B, scaling, bias)
    return y, xa


@lora_linear_op.register_fake
def _(x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, strategy):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(
        x.shape[0], lora_A.shape[0], dtype=lora_A.dtype
    )


@torch.library.custom_op("sails_fast::lora_linear_backward", mutates_args=(), schema=_LORA_BACKWARD_SCHEMA)
def lora_linear_backward_op(
    dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, strategy, need_x, need_a, need_b
):
    with torch.autocast(dy.device.type, enabled=False):
        strategy = _chosen("lora_linear", strategy, x, weight.shape[1], weight.shape[0], lora_A.shape[0])
        backward_dx = _dense_dx(strategy)
        return adapter_grads(
            dy, x, xa, lora_A, lora_B, scaling, dropout_p, int(seed), (need_x, need_a, need_b),
            lambda dy, **kw: backward_dx(dy, weight, **kw),
        )  # fmt: skip


@lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, scaling, dropout_p, seed, strategy, need_x, need_a, need_b):
    return _fake_grads(dy, x, lora_A, lora_B, need_x, need_a, need_b)


def _lora_setup(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, strategy = inputs
    # nothing of size [M, out]: the input, the weights, xa [M, r] and the dropout seed
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.scaling, ctx.dropout_p, ctx.strategy, ctx.has_bias = scaling, dropout_p, strategy, bias is not None


def _lora_backward(ctx, dy, _dxa):
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
    dy = dy.contiguous()
    dx, da, db = torch.ops.sails_fast.lora_linear_backward(
        dy,
        x,
        weight,
        lora_A,
        lora_B,
        xa,
        ctx.scaling,
        ctx.dropout_p,
        seed,
        ctx.strategy,
        need_x,
        need_a,
        need_b,
    )
    # a trainable base: a plain GEMM, computed in fp32 accumulation by cuBLAS
    dw = (dy.t() @ x).to(weight.dtype) if need_w else None
    dbias = dy.sum(0, dtype=torch.float32) if need_bias and ctx.has_bias else None
    return _or_none(dx, need_x), dw, _or_none(da, need_a), _or_none(db, need_b), dbias, None, None, None, None


lora_linear_op.register_autograd(_lora_backward, setup_context=_lora_setup)


# ---------------------------------------------------------------------------------------- QLoRA

# an NF4Weight as op arguments: its tensors (packed, absmax, nested_absmax, nested_offset, nested_code;
# None where single-quantised) and format [out, in, blocksize, nested_blocksize], plus its dtype
_NF4_ARGS = "Tensor?[] nf4, int[] nf4_format, ScalarType weight_dtype"


_QLORA_SCHEMA = (
    f"(Tensor x, {_NF4_ARGS}, Tensor lora_A, Tensor lora_B, Tensor? bias, float scaling, float dropout_p, "
    "Tensor seed, str strategy) -> (Tensor, Tensor)"
)


_QLORA_BACKWARD_SCHEMA = (
    f"(Tensor dy, Tensor x, {_NF4_ARGS}, Tensor lora_A, Tensor lora_B, Tensor xa, float scaling, "
    "float dropout_p, Tensor seed, str strategy, bool need_x, bool need_a, bool need_b) "
    "-> (Tensor, Tensor, Tensor)"
)


def nf4_op_args(nf4) -> tuple[list, list[int], torch.dtype]:
    """An NF4Weight as the ops' (nf4, nf4_format, weight_dtype) arguments."""
    tensors = [nf4.packed, nf4.absmax, nf4.nested_absmax, nf4.nested_offset, nf4.nested_code]
    return tensors, [*nf4.shape, int(nf4.blocksize), int(nf4.nested_blocksize)], nf4.dtype


def _nf4(tensors, nf4_format, weight_dtype):
    from sails_fast.fused.nf4_weight import NF4Weight

    packed, absmax, nested_absmax, nested_offset, nested_code = tensors
    rows, cols, blocksize, nested_blocksize = nf4_format
    return NF4Weight(packed, absmax, torch.Size([rows, cols]), weight_dtype, blocksize, nested_absmax,
                     nested_offset, nested_code, nested_blocksize)  # fmt: skip


@torch.library.custom_op("sails_fast::qlora_linear", mutates_args=(), schema=_QLORA_SCHEMA)
def qlora_linear_op(
    x, nf4, nf4_format, weight_dtype, lora_A, lora_B, bias, scaling, dropout_p, seed, strategy
):
    from sails_fast.kernels import nf4 as NK
    from sails_fast.kernels.lora_rank import rank_projection

    weight = _nf4(nf4, nf4_format, weight_dtype)
    with torch.autocast(x.device.type, enabled=False):
        strategy = _chosen("qlora_linear", strategy, x, nf4_format[1], nf4_format[0], lora_A.shape[0])
        xa = rank_projection(x, lora_A, dropout_p, int(seed))
        if strategy == "fused":
            y = NK.qlora_forward_fused(x, weight, NK.absmax_fp32(weight), xa, lora_B, scaling, bias)
        else:
            forward = _dense_forward("fused" if strategy == "dequant" else "cublas")
            y = forward(x, NK.dequantize_to_workspace(weight, x.dtype), xa, lora_B, scaling, bias)
    return y, xa


@qlora_linear_op.register_fake
def _(x, nf4, nf4_format, weight_dtype, lora_A, lora_B, bias, scaling, dropout_p, seed, strategy):
    rows = x.shape[0]
    return x.new_empty(rows, nf4_format[0]), x.new_empty(rows, lora_A.shape[0], dtype=lora_A.dtype)


@torch.library.custom_op("sails_fast::qlora_linear_backward", mutates_args=(), schema=_QLORA_BACKWARD_SCHEMA)
def qlora_linear_backward_op(
    dy, x, nf4, nf4_format, weight_dtype, lora_A, lora_B, xa, scaling, dropout_p, seed, strategy,
    need_x, need_a, need_b,
):  # fmt: skip
    from sails_fast.kernels import nf4 as NK

    weight = _nf4(nf4, nf4_format, weight_dtype)
    with torch.autocast(dy.device.type, enabled=False):
        strategy = _chosen("qlora_linear", strategy, x, nf4_format[1], nf4_format[0], lora_A.shape[0])

        def backward_dx(dy, **kw):
            # the weight is rebuilt, tile by tile in the fused kernel or once into the reused buffer
            if strategy == "fused":
                return NK.qlora_backward_dx_fused(dy, weight, NK.absmax_fp32(weight), **kw)
            dense = NK.dequantize_to_workspace(weight, dy.dtype)
            return _dense_dx("fused" if strategy == "dequant" else "cublas")(dy, dense, **kw)

        needs = (need_x, need_a, need_b)
        return adapter_grads(dy, x, xa, lora_A, lora_B, scaling, dropout_p, int(seed), needs, backward_dx)


@qlora_linear_backward_op.register_fake
def _(dy, x, nf4, nf4_format, weight_dtype, lora_A, lora_B, xa, scaling, dropout_p, seed, strategy,
      need_x, need_a, need_b):  # fmt: skip
    return _fake_grads(dy, x, lora_A, lora_B, need_x, need_a, need_b)


def _qlora_setup(ctx, inputs, output):
    x, nf4, nf4_format, weight_dtype, lora_A, lora_B, bias, scaling, dropout_p, seed, strategy = inputs
    # never the dequantised weight: the backward rebuilds it from the NF4 tensors
    ctx.save_for_backward(x, lora_A, lora_B, output[1], seed, *nf4)
    ctx.nf4_format, ctx.weight_dtype = list(nf4_format), weight_dtype
    ctx.scaling, ctx.dropout_p, ctx.strategy, ctx.has_bias = scaling, dropout_p, strategy, bias is not None


def _qlora_backward(ctx, dy, _dxa):
    x, lora_A, lora_B, xa, seed, *nf4 = ctx.saved_tensors
    need_x, need_a, need_b, need_bias = (ctx.needs_input_grad[i] for i in (0, 4, 5, 6))
    dx, da, db = torch.ops.sails_fast.qlora_linear_backward(
        dy.contiguous(), x, nf4, ctx.nf4_format, ctx.weight_dtype, lora_A, lora_B, xa, ctx.scaling,
        ctx.dropout_p, seed, ctx.strategy, need_x, need_a, need_b,
    )  # fmt: skip
    dbias = dy.sum(0, dtype=torch.float32) if need_bias and ctx.has_bias else None
    grads_a_b = (_or_none(da, need_a), _or_none(db, need_b))
    # the NF4 tensors come in as a list: their (absent) gradients go back as one
    return (_or_none(dx, need_x), [None] * len(nf4), None, None, *grads_a_b, dbias, None, None, None, None)


qlora_linear_op.register_autograd(_qlora_backward, setup_context=_qlora_setup)


def seed_tensor(seed: int | None, dropout_p: float) -> torch.Tensor:
    """The dropout seed as a 0-d int64 tensor (drawn from torch's generator when None and dropout is on,
    so torch.manual_seed makes it reproducible)."""
    if seed is not None:
        return torch.tensor(int(seed), dtype=torch.int64)
    if dropout_p > 0.0:
        return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    return torch.zeros((), dtype=torch.int64)
