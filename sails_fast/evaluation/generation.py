"""Greedy generation of responses to evaluation prompts, left-padded and batched."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sails_fast.evaluation.config import EvalConfig

# ----- prompt formatting and batching


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, dict):
        text = prompt.get("text", prompt.get("prompt"))
    else:
        text = getattr(prompt, "prompt", None) or getattr(prompt, "text", None)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"prompts: expected non-empty str or a record with .text / .prompt, got {prompt!r}")
    return text


def _prompt_ids(tokenizer, text: str, config: EvalConfig) -> list[int]:
    if config.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("EvalConfig.chat_template: True, but the tokenizer has no chat template")
        msgs = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
        msgs.append({"role": "user", "content": text})
        s = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        # the template writes BOS itself where the model needs one
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])
    s = text if config.system_prompt is None else f"{config.system_prompt}\n\n{text}"
    return list(tokenizer(s)["input_ids"])


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    raise ValueError("tokenizer: needs a pad_token_id or eos_token_id to batch prompts")


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, S - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, S - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _encode_all(tokenizer, prompts: Sequence, config: EvalConfig) -> list[list[int]]:
    out, cut = [], 0
    for p in prompts:
        ids = _prompt_ids(tokenizer, _prompt_text(p), config)
        if len(ids) > config.max_prompt_tokens:
            cut += 1
            ids = ids[len(ids) - config.max_prompt_tokens :]
        out.append(ids)
    if cut:
        warnings.warn(
            f"max_prompt_tokens: {cut} prompts are longer than {config.max_prompt_tokens} tokens and keep "
            "only their last tokens",
            stacklevel=3,
        )
    return out


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _bar(n: int, desc: str, on: bool):
    from tqdm.auto import tqdm

    return tqdm(total=n, desc=desc, unit="prompt", disable=not on or n == 0)


@torch.no_grad()
def generate_responses(
    model: nn.Module, tokenizer, prompts: Sequence, config: EvalConfig | None = None
) -> list[str]:
    """Greedy responses to `prompts`, batched with left padding (special tokens removed, stripped).

    Args:
        model: a causal LM (HF or PEFT).
        tokenizer: its tokenizer.
        prompts: str or records with `.text` / `.prompt`.
        config: EvalConfig (max_new_tokens, batch_size, chat_template, system_prompt, max_prompt_tokens).

    Returns:
        list[str]: one response per prompt.

    Example:
        >>> generate_responses(model, tok, ["How do I bake bread?"], EvalConfig(max_new_tokens=32))
    """
    config = config or EvalConfig()
    encoded = _encode_all(tokenizer, prompts, config)
    pad_id, device = _pad_id(tokenizer), _device(model)
    out: list[str] = []
    with _bar(len(encoded), "generate", config.progress) as bar:
        for i in range(0, len(encoded), config.batch_size):
            ids, mask = _left_pad(encoded[i : i + config.batch_size], pad_id, device)
            gen = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=config.max_new_tokens,
                pad_token_id=pad_id, temperature=None, top_p=None, top_k=None,
            )  # fmt: skip
            out += [
                t.strip() for t in tokenizer.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
            ]
            bar.update(ids.shape[0])
    return out
