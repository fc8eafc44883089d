"""Model plumbing for forward hooks: the decoder blocks of a causal LM, its hidden size and device, and the
exception that stops a forward after the deepest hooked layer."""

from __future__ import annotations

import torch
from torch import nn

# ----- model plumbing


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (plain, PEFT-wrapped or 4-bit).

    Args:
        model: a Hugging Face causal LM, possibly inside a PeftModel.

    Returns:
        nn.ModuleList: the blocks; block l's output is the residual stream after layer l.

    Example:
        >>> len(decoder_layers(model)) == model.config.num_hidden_layers
        True
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    get_decoder = getattr(base, "get_decoder", None)
    if callable(get_decoder):
        layers = getattr(get_decoder(), "layers", None)
        if isinstance(layers, nn.ModuleList) and (n is None or len(layers) == n):
            return layers
    for _, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and n is not None and len(module) == n:
            return module
    raise ValueError(
        f"model: could not find its decoder layers ({type(base).__name__}); expected a causal LM"
    )


def hidden_size(model: nn.Module) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return int(base.config.hidden_size)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class StopForward(Exception):
    """Raised by the deepest hook: the layers after it are not needed."""
