"""Tokenisation of (prompt, response) examples shared by statistics, training and generation: the prompt
(through the chat template when asked) and the response are tokenised separately and concatenated, so the
response tokens are known exactly."""

from __future__ import annotations

from typing import Any

# ----- tokenisation shared with training


def prompt_messages(prompt: Any) -> tuple[list[dict], str]:
    """Chat messages and a plain-text rendering of a str / ContrastivePair / PromptRecord prompt."""
    if isinstance(prompt, str):
        text, history = prompt, ()
    elif hasattr(prompt, "prompt"):
        text, history = prompt.prompt, getattr(prompt, "history", ())
    elif hasattr(prompt, "text"):
        text, history = prompt.text, ()
    else:
        raise ValueError(
            f"prompts: expected str, ContrastivePair or PromptRecord, got {type(prompt).__name__}"
        )
    messages = [{"role": role, "content": t} for role, t in history] + [{"role": "user", "content": text}]
    plain = "\n\n".join([t for _, t in history] + [text])
    return messages, plain


def prompt_ids(tokenizer, prompt: Any, chat_template: bool) -> list[int]:
    """Token ids of a prompt, through the chat template (generation prompt added) when asked.

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: a str, or a record with `.prompt` (and optional `.history`) or `.text`.
        chat_template: apply `tokenizer.apply_chat_template`; else tokenise the plain text with the
            tokenizer's own special tokens (e.g. BOS).

    Returns:
        list[int]: the prompt's token ids.

    Example:
        >>> ids = prompt_ids(tokenizer, "How do I bake bread?", chat_template=True)
    """
    messages, plain = prompt_messages(prompt)
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template: True, but the tokenizer has no chat template; set it to False")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # the template writes BOS itself where the model needs one
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(plain)["input_ids"])


def tokenize_example(
    tokenizer, prompt: Any, response: str, *, chat_template: bool, max_length: int, append_eos: bool = False
) -> tuple[list[int], int, bool]:
    """Prompt and response token ids, concatenated and truncated to `max_length`.

    The prompt and the response are tokenised separately, so exactly the last `len(ids) - n_prompt` ids
    are the response. When the example is too long the response keeps at least
    min(len(response), max_length // 2) tokens and the prompt loses its oldest tokens (so the chat
    template's assistant header stays next to the response).

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: a str or a record (see `prompt_ids`).
        response: the response text.
        chat_template: see `prompt_ids`.
        max_length: most tokens in the result.
        append_eos: add the tokenizer's EOS after the response (for training, so the model learns to stop).

    Returns:
        (ids, n_prompt, truncated): list[int] of length <= max_length, how many leading ids belong to the
        prompt, and whether anything was cut.

    Example:
        >>> ids, n_prompt, cut = tokenize_example(tok, "Make a bomb", "I can't help.", chat_template=True,
        ...                                       max_length=256)
    """
    p = prompt_ids(tokenizer, prompt, chat_template)
    r = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("append_eos: True, but the tokenizer has no eos_token_id")
        r.append(tokenizer.eos_token_id)
    truncated = len(p) + len(r) > max_length
    if truncated:
        keep_r = min(len(r), max(max_length - len(p), max_length // 2))
        r = r[:keep_r]
        p = p[len(p) - (max_length - keep_r) :] if max_length - keep_r > 0 else []
    return p + r, len(p), truncated


def pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0
