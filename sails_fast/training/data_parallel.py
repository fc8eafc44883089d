"""Training over several ranks: DistributedDataParallel (one model replica per rank), or with the frozen
base sharded (`TrainConfig.parallel="fsdp"`, `sails_fast.training.fully_sharded`).

`TrainConfig.batch_size * grad_accum_steps` examples make one optimizer step whatever the world size:
each of the N ranks takes a contiguous 1/N of them, in micro-batches of `batch_size`, and the loss is
normalised by the response tokens of the whole step, so the gradient (and so the trained adapter) equals a
single-process run with the same config up to summation order. DDP averages gradients over ranks, hence
the factor N in `backward`. Only the trainable (LoRA) parameters are synchronised; the frozen base is not
broadcast (every rank loads the same weights).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from sails_fast.core import distributed
from sails_fast.training.sft import response_loss


class _LossModule(nn.Module):
    """model -> (summed response loss, tokens): the whole loss inside one forward, so DDP sees every use of
    the parameters (the chunked loss calls the decoder and the output embedding separately)."""

    def __init__(self, model: nn.Module, chunk_tokens):
        super().__init__()
        self.model, self.chunk_tokens = model, chunk_tokens

    def forward(self, input_ids, attention_mask, labels):
        return response_loss(self.model, input_ids, attention_mask, labels, chunk_tokens=self.chunk_tokens)


def rank_share(indices: list[int], batch_size: int, grad_accum_steps: int) -> list[int]:
    """This rank's contiguous share of one optimizer step's example indices."""
    world = distributed.world_size()
    per_step = batch_size * grad_accum_steps
    if per_step % world:
        raise ValueError(
            f"train.batch_size * train.grad_accum_steps = {per_step} examples per optimizer step cannot be "
            f"split evenly over {world} ranks; make it a multiple of {world} (it is the global batch, the "
            "same for every world size)"
        )
    share = len(indices) // world
    r = distributed.rank()
    return indices[r * share : (r + 1) * share]


class StepLoss:
    """Forward + backward of micro-batches, through DDP or FSDP when several ranks train.

    Gradients are synchronised once per optimizer step, in the backward of its last micro-batch. With
    `parallel="fsdp"` the model is sharded in place (it stays so: rebuild it to use it on one rank)."""

    def __init__(self, peft_model: nn.Module, chunk_tokens, parallel: str = "ddp", device=None):
        self.world = distributed.world_size()
        module = _LossModule(peft_model, chunk_tokens)
        self.module: nn.Module = module
        # with the base sharded: the trainable parameters, whole on every rank, whose gradients we sum
        self.replicated_params: list[nn.Parameter] = []
        self.sharded = self.world > 1 and parallel == "fsdp"
        self.device = device  # where inputs go, when sharded (the embedding is a DTensor then)
        if self.sharded:
            from sails_fast.training.fully_sharded import shard_for_training

            if device is None:
                raise ValueError("device: FSDP needs the device each rank's shard goes to")
            self.replicated_params = shard_for_training(module, device)
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
            frozen += [n for n, _ in module.named_buffers()]
            DDP._set_params_and_buffers_to_ignore_for_model(module, frozen)
            trainable = next(p for p in module.parameters() if p.requires_grad)
            device_ids = [trainable.device.index] if trainable.is_cuda else None
            self.module = DDP(module, device_ids=device_ids)

    def backward(self, batch: list[torch.Tensor], step_tokens: int, last: bool) -> float:
        """Backward of one micro-batch's loss / the step's tokens (all ranks); its summed loss."""
        if self.sharded:
            loss_sum, _ = self.module(*batch)
            (loss_sum / step_tokens).backward()
            if last:  # the LoRA gradients, whole on every rank, summed over the ranks
                from sails_fast.training.fully_sharded import all_reduce_gradients

                all_reduce_gradients(self.replicated_params)
            return float(loss_sum.item())
        sync = self.module.no_sync() if self.world > 1 and not last else nullcontext()
        with sync:
            loss_sum, _ = self.module(*batch)
            # DDP averages the ranks' gradients; the step's loss is their sum over its tokens
            (loss_sum * (self.world / step_tokens)).backward()
        return float(loss_sum.item())

    def close(self) -> None:
        """Drop the DDP wrapper (its gradient hooks go with it; FSDP's sharding stays)."""
        self.module = None
