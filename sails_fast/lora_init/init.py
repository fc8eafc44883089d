"""Step 6: initialise PEFT LoRA adapters from the SAILS subspace (METHOD.md step 5).

For a LoRA layer dW = s * B A with A [r, d_in], B [d_out, r] and the basis U [d, r]:

- read side (modules reading the residual stream, default q, k, v, gate, up; needs d_in = d):
  A = U^T, B = 0. The adapter reads exactly the subspace's coordinates of its input.
- write side (modules writing it, default o, down; needs d_out = d): B = U, A = 0 (or small random A).
  The adapter writes only inside the subspace.

With B = 0 or A = 0, dW = 0 and the model's output is exactly unchanged at init; both factors stay
trainable (the zero factor gets a non-zero gradient through the other one).

Which basis serves which module (per-layer subspaces): a module in decoder block j touches one position of
the residual stream, where position l means the stream after block l (the SAE layer convention):
read-side modules read position j - 1 (the stream entering block j; the MLP's mid-block input is counted
with it), write-side modules write position j. Then, with `InitConfig.basis_rule`:

- "nearest" (default): the SAE layer closest to that position; a tie goes to the earlier layer.
- "preceding": the closest SAE layer at or before the position; if none, the closest after it.

A pooled subspace has one basis, which serves every module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from sails_fast.lora_init.config import InitConfig
from sails_fast.subspace.subspace import POOLED, Subspace


@dataclass
class ModuleInit:
    """How one LoRA layer was initialised."""

    name: str
    block: int
    side: str
    position: int
    basis: int
    d_in: int
    d_out: int
    rank: int


@dataclass
class InitReport:
    """What `init_lora_from_subspace` did: one ModuleInit per initialised layer, and layers skipped (name ->
    reason, only with `on_dim_mismatch="skip"`)."""

    modules: list[ModuleInit] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def basis_of(self, name: str) -> int:
        """The basis key (SAE layer, or POOLED) that served module `name`."""
        for m in self.modules:
            if m.name == name:
                return m.basis
        raise ValueError(f"name: {name!r} was not initialised; initialised: {[m.name for m in self.modules]}")

    def __str__(self) -> str:
        lines = [
            f"initialised {len(self.modules)} LoRA layer(s) from the subspace, skipped {len(self.skipped)}"
        ]
        for m in self.modules:
            src = "pooled basis" if m.basis == POOLED else f"basis of SAE layer {m.basis}"
            lines.append(f"  {m.name}: {m.side} side, stream position {m.position}, {src}")
        lines += [f"  {name}: skipped ({why})" for name, why in self.skipped.items()]
        return "\n".join(lines)


def stream_position(block: int, side: str) -> int:
    """The residual-stream position a module of decoder block `block` touches: block - 1 when it reads
    the stream, block when it writes it."""
    if side not in ("read", "write"):
        raise ValueError(f"side: expected 'read' or 'write', got {side!r}")
    return block - 1 if side == "read" else block


def choose_basis_layer(position: int, sae_layers: list[int], rule: str) -> int:
    """The SAE layer whose basis serves a module at stream `position` (rules in the module docstring).

    Example:
        >>> choose_basis_layer(7, [5, 10], "nearest"), choose_basis_layer(7, [5, 10], "preceding")
        (5, 5)
        >>> choose_basis_layer(8, [5, 10], "nearest"), choose_basis_layer(2, [5, 10], "preceding")
        (10, 5)
    """
    if not sae_layers:
        raise ValueError("sae_layers: expected at least one SAE layer")
    layers = sorted(sae_layers)
    if rule == "nearest":
        # min over (distance, layer): a tie goes to the earlier layer
        return min(layers, key=lambda layer: (abs(layer - position), layer))
    if rule == "preceding":
        before = [layer for layer in layers if layer <= position]
        return before[-1] if before else layers[0]
    raise ValueError(f"rule: expected 'nearest' or 'preceding', got {rule!r}")


def _lora_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and adapter_name in getattr(m, "lora_A", {})
    ]


def _hidden_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "hidden_size", None)
    if size is None and hasattr(cfg, "get_text_config"):
        size = getattr(cfg.get_text_config(), "hidden_size", None)
    return size if isinstance(size, int) else None


def make_lora_config(config: InitConfig, rank: int, **overrides):
    """A peft.LoraConfig matching `config`: r = rank, alpha = `config.alpha(rank)`, the target modules,
    no dropout, no bias (the settings the fused LoRA path takes). `overrides` go to LoraConfig.

    Example:
        >>> peft_model = peft.get_peft_model(model, make_lora_config(InitConfig(), rank=16))
    """
    from peft import LoraConfig

    kwargs = dict(
        r=rank,
        lora_alpha=config.alpha(rank),
        target_modules=list(config.target_modules),
        lora_dropout=0.0,
        bias="none",
    )
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


@torch.no_grad()
def init_lora_from_subspace(
    peft_model: nn.Module, subspace: Subspace, config: InitConfig, adapter_name: str = "default"
) -> InitReport:
    """Set every targeted LoRA layer's A and B from the subspace, in place.

    Works for PEFT LoRA on nn.Linear and on bitsandbytes Linear4bit bases alike (only the adapter's own
    A / B parameters are written; the base weight is not touched).

    Args:
        peft_model: a PEFT model (or any module holding PEFT LoRA layers) whose LoRA rank equals the
            subspace's rank.
        subspace: from `build_subspace`; bases U [d, r].
        config: InitConfig (target/read/write modules, write_side_A, basis_rule, layer_pattern, ...).
        adapter_name: the PEFT adapter to initialise.

    Returns:
        InitReport: per module its block, side, stream position and the basis that served it.

    Raises:
        ValueError: no LoRA layers; a LoRA layer whose leaf name is not in `config.target_modules` or a
            target with no LoRA layer; a module name without a layer index; a LoRA rank that differs from
            the subspace's; a model hidden size that differs from the subspace's d; a residual-side width
            that is not d (unless `on_dim_mismatch="skip"`).

    Example:
        >>> peft_model = peft.get_peft_model(model, make_lora_config(InitConfig(), rank=16))
        >>> report = init_lora_from_subspace(peft_model, subspace, InitConfig())
        >>> print(report)
    """
    if not isinstance(config, InitConfig):
        raise ValueError(f"config: expected an InitConfig, got {type(config).__name__}")
    if not isinstance(subspace, Subspace) or not subspace.bases:
        raise ValueError("subspace: expected a Subspace with at least one basis")
    d = subspace.d_model
    hidden = _hidden_size(peft_model)
    if hidden is not None and hidden != d:
        raise ValueError(f"subspace: basis width d = {d} does not match the model's hidden_size = {hidden}")
    layers = _lora_layers(peft_model, adapter_name)
    if not layers:
        raise ValueError(f"peft_model: no PEFT LoRA layers with adapter {adapter_name!r}")
    leaves = {name.rsplit(".", 1)[-1] for name, _ in layers}
    stray = sorted(leaves - set(config.target_modules))
    if stray:
        raise ValueError(
            f"peft_model: LoRA layers on {stray} are not in InitConfig.target_modules "
            f"{list(config.target_modules)}"
        )
    missing = sorted(set(config.target_modules) - leaves)
    if missing:
        raise ValueError(
            f"config.target_modules: {missing} have no LoRA layer in peft_model (LoRA is on {sorted(leaves)})"
        )
    pattern = re.compile(config.layer_pattern)
    sae_layers = sorted(subspace.bases)
    generator = torch.Generator().manual_seed(config.seed)
    report = InitReport()
    for name, module in layers:
        leaf = name.rsplit(".", 1)[-1]
        side = config.side(leaf)
        match = pattern.search(name)
        if match is None:
            raise ValueError(
                f"peft_model: no decoder layer index in module name {name!r} (InitConfig.layer_pattern)"
            )
        block = int(match.group(1))
        A = module.lora_A[adapter_name].weight
        B = module.lora_B[adapter_name].weight
        r, d_in = A.shape
        d_out = B.shape[0]
        if r != subspace.config.rank:
            raise ValueError(
                f"peft_model: {name} has LoRA rank {r}, the subspace has rank {subspace.config.rank}"
            )
        width = d_in if side == "read" else d_out
        if width != d:
            why = (
                f"{side}-side module with {'d_in' if side == 'read' else 'd_out'} = {width}, "
                f"not the residual width d = {d}"
            )
            if config.on_dim_mismatch == "skip":
                report.skipped[name] = why
                continue
            raise ValueError(f"peft_model: {name} is a {why}; fix InitConfig.read_modules/write_modules")
        position = stream_position(block, side)
        key = POOLED if subspace.pooled else choose_basis_layer(position, sae_layers, config.basis_rule)
        U = subspace.bases[key].U
        if side == "read":
            A.copy_(U.T.to(A.device, A.dtype))
            B.zero_()
        else:
            B.copy_(U.to(B.device, B.dtype))
            if config.write_side_A == "zeros":
                A.zero_()
            else:
                noise = torch.randn(A.shape, generator=generator, dtype=torch.float32) * config.write_side_std
                A.copy_(noise.to(A.device, A.dtype))
        report.modules.append(ModuleInit(name, block, side, position, key, d_in, d_out, r))
    return report
