"""Training with the frozen base sharded over the ranks (FSDP2, `torch.distributed.fsdp.fully_shard`), for
bases whose weights do not fit one device next to the activations.

Each decoder layer is one FSDP unit and the rest of the model (embeddings, final norm, head) the root unit:
a rank holds 1/N of the base's weights and all-gathers one layer's at a time, in the forward and again in
the backward. The LoRA parameters are left out of FSDP (`ignored_params`): they are a few MB, so every rank
keeps a whole copy and its optimizer state, their gradients are summed over the ranks with one all-reduce
per optimizer step, and checkpoints and the saved adapter are the plain tensors of the DDP path. The result
equals the single-process run up to summation order, as with DDP.

A 4-bit base (bitsandbytes NF4) is sharded as it is: FSDP2 all-gathers each parameter's bytes, so the
packed uint8 weights need no `bnb_4bit_quant_storage` (that is FSDP1's flat-parameter constraint). The
layer's `quant_state` stays on the module, where bitsandbytes' `Linear4bit.forward` finds it again for the
all-gathered weight.
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (transformers' `_no_split_modules` classes): the FSDP units."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"train.parallel='fsdp': found no decoder layers to shard in {type(model).__name__} (it names "
            "no _no_split_modules); use train.parallel='ddp'"
        )
    return layers


def shard_for_training(root: nn.Module, device: torch.device) -> list[nn.Parameter]:
    """Shard `root`'s frozen parameters over the default process group, in place: each decoder layer, then
    the root. Returns the trainable parameters, left whole on every rank and moved to `device`."""
    check_torch()
    from torch.distributed.fsdp import fully_shard

    trainable = [p for p in root.parameters() if p.requires_grad]
    for p in trainable:  # FSDP moves what it shards; the parameters it ignores are ours to place
        p.data = p.data.to(device)
    ignored = set(trainable)
    for layer in decoder_layers(root):
        fully_shard(layer, ignored_params=ignored)
    fully_shard(root, ignored_params=ignored)
    for module in root.modules():
        quant_state = getattr(module, "quant_state", None)
        if quant_state is not None and hasattr(quant_state, "to"):
            quant_state.to(device)  # bitsandbytes' QuantState moves in place
    return trainable


def shard_sizes(root: nn.Module) -> dict[str, int]:
    """{"frozen_bytes": the frozen parameters' bytes on this rank, "frozen_bytes_whole": theirs in the whole
    model}: what sharding saved."""
    from torch.distributed.tensor import DTensor

    local = whole = 0
    for p in root.parameters():
        if p.requires_grad:
            continue
        whole += p.numel() * p.element_size()
        part = p.to_local() if isinstance(p, DTensor) else p
        local += part.numel() * part.element_size()
    return {"frozen_bytes": local, "frozen_bytes_whole": whole}


def all_reduce_gradients(params: list[nn.Parameter]) -> None:
    """Sum the parameters' gradients over the ranks, in one flat all-reduce. A parameter no rank used keeps
    no gradient (as in one process, so AdamW skips it); one that some ranks used counts zero elsewhere."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    used = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat([*(g.reshape(-1).to(torch.float32) for g in grads), used])
    dist.all_reduce(flat)
    offset = 0
    for p, g, anyone in zip(params, grads, flat[-len(params) :].tolist(), strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype, copy=True) if anyone else None
        offset += g.numel()


def check_torch() -> None:
    """FSDP2 with `ignored_params` (torch 2.7+): a clear error on an older torch."""
    import inspect

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6: FSDP2 was private
        fully_shard = None
    if fully_shard is None or "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise ValueError(
            f"train.parallel='fsdp': needs torch >= 2.7 (fully_shard's ignored_params); this is torch "
            f"{torch.__version__}. Use train.parallel='ddp' or a newer torch"
        )
