"""Predicted peak device memory of each pipeline step, from the model's config.json and the run config.

Every part is a written-out byte count (docs/memory.md derives them): the tensors a step holds at its
peak, on the path the library takes (full-precision model for pairs and statistics; 4-bit NF4 base,
fp32 adapters, gradient checkpointing and the chunked loss for training; the training model for
evaluation). `benchmarks/memory_check.py` measures the same steps and prints the two side by side;
tests/test_memory_plan.py holds the prediction to 20 % of the measurement on CPU.

    plan = plan_memory(RunConfig.load("run.json"), ModelShape.from_pretrained("path/to/model"))
    print(plan.format()); plan.steps["train"].peak_bytes
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sails_fast.pipeline.config import RunConfig

GiB = 2**30
# device-memory budgets the plan answers for (consumer GPUs)
BUDGETS_GIB = (16, 24)
# CUDA: the context, cuBLAS workspaces and loaded kernels live outside PyTorch's allocator
CUDA_CONTEXT_BYTES = GiB // 2
# CUDA: the caching allocator reserves more than it hands out (block rounding, fragmentation)
ALLOCATOR_OVERHEAD = 0.10
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# bitsandbytes NF4: 64-value blocks; with double quantisation each block's absmax is one byte plus one
# fp32 scale per 256 blocks, without it one fp32 absmax per block
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256
# SAE statistics scratch, at most: the PyTorch reference (CPU) holds two fp32 [rows, F] buffers of one
# class's rows (pre-activations and activations, 2**23 elements each at most); the CUDA "chunked"
# strategy one fp32 [T_c, F] chunk of pre-activations of at most 256 MiB
STATS_SCRATCH_CAP = {"cpu": 2 * 4 * 2**23, "cuda": 256 * 2**20}
# models whose decoder layer has four norms (pre/post attention and feed-forward) instead of two
FOUR_NORM_TYPES = ("gemma2", "gemma3_text")
# models trained with eager attention (Gemma-2's attention logit soft-capping is not in SDPA)
EAGER_ATTENTION_TYPES = ("gemma2",)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only causal LM that memory depends on (from its config.json)."""

    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """From a config.json dict (`text_config` inside it for multimodal configs)."""
        c = config.get("text_config", config)
        missing = [
            k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers") if k not in c
        ]
        if missing or "num_attention_heads" not in c:
            raise ValueError(
                f"model config: missing {missing or ['num_attention_heads']} (a decoder-only causal LM?)"
            )
        heads = int(c["num_attention_heads"])
        return cls(
            model_type=str(c.get("model_type", "unknown")),
            vocab=int(c["vocab_size"]),
            hidden=int(c["hidden_size"]),
            intermediate=int(c["intermediate_size"]),
            layers=int(c["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
            # transformers' default when the key is absent
            tied_embeddings=bool(c.get("tie_word_embeddings", True)),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelShape:
        """From a model folder (only its config.json is read; no weights needed) or a config.json file."""
        p = Path(path)
        file = p / "config.json" if p.is_dir() else p
        if not file.is_file():
            raise ValueError(f"model: {path} has no config.json (expected a model folder or its config.json)")
        try:
            return cls.from_config(json.loads(file.read_text(encoding="utf-8")))
        except json.JSONDecodeError as err:
            raise ValueError(f"model: {file} is not valid JSON ({err})") from err

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder block."""
        d, i = self.hidden, self.intermediate
        return {
            "q_proj": (d, self.q_dim), "k_proj": (d, self.kv_dim), "v_proj": (d, self.kv_dim),
            "o_proj": (self.q_dim, d), "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d),
        }  # fmt: skip

    def linear_params(self) -> int:
        """Parameters in the decoder blocks' linear layers (what 4-bit quantisation packs)."""
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    def other_params(self) -> int:
        """Embedding, untied output head and norms: what stays in floating point under 4-bit."""
        norms = (4 if self.model_type in FOUR_NORM_TYPES else 2) * self.layers * self.hidden + self.hidden
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + norms

    def params(self) -> int:
        return self.linear_params() + self.other_params()


@dataclass
class StepPlan:
    """One step's predicted peak: named parts in bytes (tensors), plus the device's own overheads."""

    step: str
    parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    device: str = "cuda"

    @property
    def tensor_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def overhead_bytes(self) -> int:
        """CUDA context + allocator slack over the tensors; nothing on CPU (the check measures tensors)."""
        if self.device != "cuda":
            return 0
        return CUDA_CONTEXT_BYTES + int(ALLOCATOR_OVERHEAD * self.tensor_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.tensor_bytes + self.overhead_bytes

    def fits(self, gib: int) -> bool:
        return self.peak_bytes <= gib * GiB


@dataclass
class MemoryPlan:
    """Predicted peak memory of the pairs, statistics, training and evaluation steps of one run."""

    shape: ModelShape
    device: str
    steps: dict[str, StepPlan]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device": self.device, "model": self.shape.__dict__, "steps": {}}
        for name, s in self.steps.items():
            out["steps"][name] = {
                "peak_bytes": s.peak_bytes,
                "tensor_bytes": s.tensor_bytes,
                "overhead_bytes": s.overhead_bytes,
                "parts": dict(s.parts),
                "fits": {f"{g}GiB": s.fits(g) for g in BUDGETS_GIB},
                "notes": list(s.notes),
            }
            out[f"{name}_peak_bytes"] = s.peak_bytes
        out["peak_bytes"] = max(s.peak_bytes for s in self.steps.values())
        out["fits"] = {f"{g}GiB": all(s.fits(g) for s in self.steps.values()) for g in BUDGETS_GIB}
        return out

    def format(self) -> str:
        """A table per step: its parts, the overheads, the peak and the 16 / 24 GiB verdicts."""
        lines = [
            f"predicted peak device memory ({self.device}): {self.shape.model_type}, "
            f"{self.shape.params() / 1e9:.2f} B params, vocabulary {self.shape.vocab}"
        ]
        for s in self.steps.values():
            verdict = ", ".join(f"{g} GiB: {'fits' if s.fits(g) else 'does NOT fit'}" for g in BUDGETS_GIB)
            lines.append(f"\n{s.step}: {s.peak_bytes / GiB:.2f} GiB  ({verdict})")
            for name, b in s.parts.items():
                lines.append(f"  {name:<38} {b / GiB:8.3f} GiB")
            if s.overhead_bytes:
                lines.append(f"  {'CUDA context + allocator slack':<38} {s.overhead_bytes / GiB:8.3f} GiB")
            lines += [f"  note: {n}" for n in s.notes]
        return "\n".join(lines)


def nf4_bytes(params: int, double_quant: bool = True) -> int:
    """bitsandbytes NF4 storage of `params` weights: packed nibbles plus the per-block scales."""
    blocks = -(-params // NF4_BLOCK)
    scales = blocks + 4 * -(-blocks // NF4_NESTED_BLOCK) if double_quant else 4 * blocks
    return params // 2 + scales


def lora_params(shape: ModelShape, targets: tuple[str, ...], rank: int) -> int:
    """Adapter parameters: r x (in + out) per targeted linear per block."""
    dims = shape.linear_shapes()
    unknown = [t for t in targets if t not in dims]
    if unknown:
        raise ValueError(
            f"sails.init.target_modules: {unknown} are not linear layers the plan knows {list(dims)}"
        )
    return shape.layers * sum(rank * (dims[t][0] + dims[t][1]) for t in targets)


def _layer_activation_bytes(
    shape: ModelShape, batch: int, seq: int, a: int, c: int, targets: tuple[str, ...], rank: int
) -> tuple[int, int]:
    """Tensors one decoder block saves for its backward (recomputed under checkpointing), with `a` bytes
    per activation: the MLP's gate, up and product inputs (3 x intermediate), the two norm outputs, the
    rotated q and the attention output (q width each), k and v (kv width each), each adapter's rank-r
    projection (fp32), rotary cos / sin; plus the backward's two [tokens, intermediate] gradients. When
    activations are 16-bit: fp32 copies for the norms and for each fp32 adapter's input. SDPA attention
    keeps no [S, S] tensor; Gemma-2 (logit soft-capping) runs eager attention: scores, fp32 softmax and
    probabilities. Counted from the tensors saved_tensors_hooks sees in a Llama block (docs/memory.md).
    Returns (saved, the backward's extra gradients)."""
    d, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    tokens = batch * seq
    per_token = a * (3 * i + 2 * d + 2 * q + 2 * kv) + 4 * rank * len(targets) + 2 * 4 * shape.head_dim
    if a < 4:
        per_token += 4 * 2 * d  # RMSNorm computes in fp32
        per_token += 4 * sum(shape.linear_shapes()[t][0] for t in targets)  # adapters cast x to fp32
    attention = (
        batch * shape.heads * seq * seq * (2 * a + 4) if shape.model_type in EAGER_ATTENTION_TYPES else 0
    )
    return tokens * per_token + attention, tokens * a * 2 * i  # the gradients of two MLP intermediates


def _loss_bytes(shape: ModelShape, tokens: int, c: int, chunk: int | str | None) -> tuple[int, str]:
    """The loss's peak: the chunked path holds 2 [chunk, V] fp32 buffers (the chunk's log-softmax and
    its gradient); the plain path the [tokens, V] logits in the compute dtype, the response rows' copy
    (in the compute dtype when it is 16-bit, before the upcast) and 2 [tokens, V] fp32 buffers. Every
    token is counted as a response token (the bound a plan can give without the data)."""
    from sails_fast.training.sft import auto_chunk_tokens

    V = shape.vocab
    if chunk is None:
        upcast = tokens * V * c if c < 4 else 0
        return tokens * V * c + upcast + 2 * tokens * V * 4, "plain [tokens x vocab] logits"
    k = min(tokens, auto_chunk_tokens(V) if chunk == "auto" else int(chunk))
    return 2 * k * V * 4, f"chunks of {k} tokens"


def _forward_block_bytes(shape: ModelShape, tokens: int, c: int) -> int:
    """One block's working set in a forward without autograd: hidden states, q/k/v, MLP intermediates."""
    return tokens * c * (4 * shape.hidden + shape.q_dim + 2 * shape.kv_dim + 3 * shape.intermediate)


def _generation_bytes(shape: ModelShape, batch: int, seq: int, c: int) -> dict[str, int]:
    """Greedy generation: the KV cache of every layer at full length, and the prefill's largest block
    working set and last-position logits."""
    return {
        "KV cache": 2 * shape.layers * batch * seq * shape.kv_dim * c,
        "activations (prefill, one block)": _forward_block_bytes(shape, batch * seq, c),
        "logits (last position)": batch * shape.vocab * (c + 4),
    }


def _sae_shapes(config: RunConfig, shape: ModelShape, latents: int | None) -> tuple[int, int, str]:
    """(latents per SAE, bytes per SAE value, how they were found) for the run's SAE layers."""
    if latents is not None:
        return latents, 4, f"{latents} latents per SAE (given), fp32"
    latents, nbytes, how = 8 * shape.hidden, 4, "embedded SAE: 8 x d latents, fp32"
    for spec in config.sae.specs.values():
        cfg = Path(str(spec)) / "cfg.json"
        if config.sae.source == "specs" and cfg.is_file():
            c = json.loads(cfg.read_text(encoding="utf-8"))
            latents = int(c.get("d_sae", latents))
            nbytes = DTYPE_BYTES.get(str(c.get("dtype", "float32")).removeprefix("torch."), 4)
            how = f"{cfg}: {latents} latents"
        elif config.sae.source == "specs":
            latents, how = 16 * shape.hidden, "SAE specs not local: assumed 16 x d latents, fp32"
    return latents, nbytes, how


def plan_memory(
    config: RunConfig,
    shape: ModelShape,
    device: str = "cuda",
    sae_latents: int | None = None,
    ranks: int = 1,
) -> MemoryPlan:
    """Predicted peak memory of the pairs, stats, train and eval steps of `config` on `shape`.

    Args:
        config: the run's RunConfig (model dtype and quantisation, batch sizes, lengths, LoRA targets and
            rank, SAE layers, checkpointing, loss chunking).
        shape: the model's sizes (`ModelShape.from_pretrained(folder with config.json)`).
        device: "cuda" (adds the CUDA context and allocator slack) or "cpu" (tensors only).
        sae_latents: latents per SAE; default: read from local SAE specs' cfg.json, else 8 x d (the
            embedded SAE's width).
        ranks: processes under torchrun. With `sails.train.parallel` "fsdp" each rank's training holds
            1/ranks of the decoder layers' weights (plus the layers being all-gathered); with DDP, and
            for the other steps, every rank holds what one process would.

    Returns:
        MemoryPlan; `.steps[name].peak_bytes` and `.to_dict()["train_peak_bytes"]` etc.

    Example:
        >>> plan = plan_memory(RunConfig(), ModelShape.from_pretrained("models/gemma-2-9b"))
        >>> plan.steps["train"].fits(16)
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks: expected an int >= 1, got {ranks!r}")
    c = DTYPE_BYTES[config.model.compute_dtype]
    # the 4-bit training base: packed linears; embedding, head and norms upcast to fp32 by PEFT's
    # prepare_model_for_kbit_training (or the compute dtype when the base is not quantised)
    if config.model.quantize == "nf4":
        base = {
            "base weights (NF4, double quant)": nf4_bytes(shape.linear_params()),
            "embedding, head, norms (fp32)": shape.other_params() * 4,
        }
    else:
        base = {f"base weights ({config.model.compute_dtype})": shape.params() * c}
    # the residual stream of the training model: fp32 on the 4-bit base, whose embedding PEFT upcasts
    # (bitsandbytes layers return their input's dtype), else the compute dtype
    a = 4 if config.model.quantize == "nf4" else c
    train_base = (
        _shard_base(config, shape, ranks) if ranks > 1 and config.sails.train.parallel == "fsdp" else base
    )
    steps = {
        "pairs": _pairs_plan(config, shape, device, c),
        "stats": _stats_plan(config, shape, device, c, sae_latents),
        "train": _train_plan(config, shape, device, c, a, train_base),
        "eval": _eval_plan(config, shape, device, c, a, base),
    }
    return MemoryPlan(shape, device, steps)


def _shard_base(config: RunConfig, shape: ModelShape, ranks: int) -> dict[str, int]:
    """The training base of one FSDP rank: 1/ranks of the decoder layers' linear weights, plus two whole
    layers' (the one running and the one prefetched). The root unit (embedding, head, final norm) is whole
    through the forward and backward, so it is counted whole; so are the layers' norms (a few KB each,
    in fact sharded with their layers)."""
    dtype = config.model.compute_dtype
    if config.model.quantize == "nf4":
        layers, name = nf4_bytes(shape.linear_params()), "base weights (NF4, double quant"
        rest = {"embedding, head, norms (fp32)": shape.other_params() * 4}
    else:
        layers, name = shape.linear_params() * DTYPE_BYTES[dtype], f"base weights ({dtype}"
        rest = {f"embedding, head, norms ({dtype})": shape.other_params() * DTYPE_BYTES[dtype]}
    return {
        f"{name}, 1/{ranks} per rank)": -(-layers // ranks),
        "all-gathered layers (running + prefetched)": 2 * layers // shape.layers,
        **rest,
    }


def _pairs_plan(config: RunConfig, shape: ModelShape, device: str, c: int) -> StepPlan:
    collect = config.sails.collect
    plan = StepPlan(
        "pairs", {f"model weights ({config.model.compute_dtype})": shape.params() * c}, device=device
    )
    # prompts are cut to max_length tokens, then max_new_tokens are generated
    seq = collect.max_length + collect.max_new_tokens
    plan.parts.update(_generation_bytes(shape, collect.batch_size, seq, c))
    return plan


def _stats_plan(
    config: RunConfig, shape: ModelShape, device: str, c: int, sae_latents: int | None
) -> StepPlan:
    collect = config.sails.collect
    latents, sae_bytes, how = _sae_shapes(config, shape, sae_latents)
    n_sae = len(config.sae.layers)
    plan = StepPlan(
        "stats", {f"model weights ({config.model.compute_dtype})": shape.params() * c}, device=device
    )
    tokens = collect.batch_size * collect.max_length
    plan.parts["activations (forward, one block)"] = _forward_block_bytes(shape, tokens, c)
    plan.parts["SAE weights"] = n_sae * sae_bytes * (2 * shape.hidden * latents + 2 * latents + shape.hidden)
    # per class and latent: sum, sum of squares (fp32), active count (int64), max (fp32), argmax (int64)
    plan.parts["FeatureStats"] = n_sae * 2 * latents * (4 + 4 + 8 + 4 + 8)
    # a batch holds both sides of its pairs: one class's rows are half its tokens
    plan.parts["SAE statistics scratch"] = min(STATS_SCRATCH_CAP[device], tokens * latents * 4)
    plan.notes.append(f"SAE: {how}; the forward stops after the deepest SAE layer (no logits)")
    return plan


def _train_plan(
    config: RunConfig, shape: ModelShape, device: str, c: int, a: int, base: dict[str, int]
) -> StepPlan:
    s, train = config.sails, config.sails.train
    tokens = train.batch_size * train.max_length
    plan = StepPlan("train", dict(base), device=device)
    plan.parts["adapters + grads + AdamW (fp32)"] = (
        lora_params(shape, s.init.target_modules, s.subspace.rank) * 16
    )
    loss, how_loss = _loss_bytes(shape, tokens, a, train.loss_chunk_tokens)
    targets, rank = s.init.target_modules, s.subspace.rank
    saved, grads = _layer_activation_bytes(shape, train.batch_size, train.max_length, a, c, targets, rank)
    if train.gradient_checkpointing:
        plan.parts["checkpointed block inputs"] = shape.layers * tokens * shape.hidden * a
        # the loss's buffers are freed before the last block's recomputation starts: the larger counts
        plan.parts["logits + loss, or a recomputed block"] = max(loss, saved + grads)
        plan.notes.append(
            f"logits and loss {loss / GiB:.3f} GiB, one block's recomputed activations "
            f"{(saved + grads) / GiB:.3f} GiB: never at once, the larger is counted"
        )
    else:
        plan.parts["activations (every block)"] = shape.layers * saved
        # the loss's buffers, then (once they are freed) a block's gradients: the larger counts
        plan.parts["logits + loss, or a block's gradients"] = max(loss, grads)
    if config.model.quantize == "nf4":  # the largest linear's dequantised weight, alive during its matmul
        largest = max(n_in * n_out for n_in, n_out in shape.linear_shapes().values())
        plan.parts["dequantised weight (largest linear)"] = largest * c
    plan.notes.append(
        f"loss: {how_loss}; {train.batch_size} x {train.max_length} tokens, all counted as response"
    )
    if a != c:
        plan.notes.append("activations fp32: PEFT's prepare_model_for_kbit_training upcasts the embedding")
    return plan


def _eval_plan(
    config: RunConfig, shape: ModelShape, device: str, c: int, a: int, base: dict[str, int]
) -> StepPlan:
    ev, s = config.eval, config.sails
    plan = StepPlan("eval", dict(base), device=device)
    plan.parts["adapters (fp32)"] = lora_params(shape, s.init.target_modules, s.subspace.rank) * 4
    plan.parts.update(_generation_bytes(shape, ev.batch_size, ev.max_prompt_tokens + ev.max_new_tokens, a))
    if ev.bases == "both":
        plan.parts[f"full-precision base ({config.model.compute_dtype})"] = shape.params() * c
        plan.notes.append(
            'eval.bases "both": the full-precision base is counted as resident beside the 4-bit one'
        )
    return plan
