"""Loading models for the pipeline: a config's model path resolved (the embedded default, a local folder, a
.gguf file or a hub id), clear errors for the commonest mistakes, and the 4-bit training base."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from sails_fast.models.config import ModelConfig


def load_base_4bit(
    model_name_or_path: str | Path,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    gradient_checkpointing: bool = False,
    device_map: str | dict | None = None,
) -> nn.Module:
    """Load a causal LM with its linear layers in 4-bit NF4 (bitsandbytes) and prepare it for QLoRA.

    Args:
        model_name_or_path: a hub id or a local folder (transformers' AutoModelForCausalLM).
        compute_dtype: dtype of the dequantised matmuls (bf16 on GPU; fp32 on CPU is the safe choice).
        double_quant: quantise the per-block absmax too (~0.37 bit/param saved).
        gradient_checkpointing: passed to peft.prepare_model_for_kbit_training.
        device_map: where the weights go (None: the current CUDA device when there is one, else "cpu").

    Returns:
        nn.Module: the model with bitsandbytes Linear4bit layers, frozen, ready for get_peft_model.

    Example:
        >>> base = load_base_4bit("HuggingFaceTB/SmolLM2-135M-Instruct", compute_dtype=torch.float32)
        >>> peft_model = get_peft_model(base, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError("load_base_4bit needs bitsandbytes: pip install 'sails_fast[bnb]'") from err
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if device_map is None:
        # the current device: under torchrun each rank's own GPU (set from LOCAL_RANK)
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        str(model_name_or_path), quantization_config=quant, device_map=device_map, dtype=compute_dtype
    )
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
    )


def fast_bf16_on_cpu() -> bool:
    """Whether this CPU multiplies bf16 matrices fast (oneDNN's bf16 path: AVX512-BF16 or AMX). Without it
    torch falls back to a reference GEMM: on an AVX2 EPYC a [512 x 576] @ [576 x 4608] bf16 matmul took
    2.05 s against 21 ms in fp32 (`python benchmarks/bf16_matmul.py`), so bf16 there is a slowdown."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_device() -> torch.device:
    """The current CUDA device when there is one (a torchrun rank's own GPU), else the CPU: where the
    pipeline puts its models."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _looks_local(path: str) -> bool:
    # a hub id is "name" or "org/name"; anything else that does not exist was meant as a local path
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def resolve_model_path(config: ModelConfig) -> str:
    """A local folder or hub id transformers can load: "embedded" and a .gguf file are converted once
    into a cached folder. ValueError naming model.path for a path that cannot be a model."""
    if config.path == "embedded":
        from sails_fast.models.embedded import embedded_model_path

        return str(embedded_model_path())
    path = Path(config.path).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            from sails_fast.models.embedded import gguf_model_path

            return str(gguf_model_path(path))
        raise ValueError(
            f"model.path: {config.path} is a file; expected a model folder, a .gguf file, 'embedded' "
            "or a hub id"
        )
    if path.is_dir():
        return str(path)
    if _looks_local(config.path):
        raise ValueError(
            f"model.path: {config.path} does not exist (expected a model folder or a .gguf file)"
        )
    return config.path


def _from_pretrained(loader, path: str, **kwargs):
    """loader.from_pretrained with an OSError (no such folder, a hub id that is not cached offline)
    turned into one line naming model.path."""
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"model.path: cannot load {path!r} ({first}); give a local model folder, a .gguf file or "
            "'embedded' (runs are offline: a hub id loads only from the local hub cache)"
        ) from err


def load_model(config: ModelConfig):
    """(model, tokenizer) in full precision, eval mode, for generation and statistics."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(config)
    tokenizer = _from_pretrained(AutoTokenizer, path)
    model = _from_pretrained(AutoModelForCausalLM, path, dtype=getattr(torch, config.compute_dtype))
    return model.to(default_device()).eval(), tokenizer
