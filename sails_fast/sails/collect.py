"""SAE feature statistics over contrastive pairs, streamed through forward hooks (METHOD.md step 2).

`collect_feature_stats` runs the frozen model over both sides of every pair (class 0 = aligned, class 1 =
unaligned), hooks the residual stream at the SAE layers and folds each batch into per-layer FeatureStats
with `sails_fast.sae_feature_stats`. Only [classes x latents] accumulators are kept, never anything per
token, and the forward stops after the deepest hooked layer. `generate_unaligned` makes the unaligned side
from the model's own greedy completions, generated once and cached to a JSONL file.

Tokenisation is shared with training (`tokenize_example`): the prompt (through the chat template when
asked) and the response are tokenised separately and concatenated, so the response tokens are known
exactly and a merge across the boundary cannot blur them.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .._config import ConfigBase

POOLINGS = ("response_mean", "token")
HOOK_POINTS = ("residual",)
ALIGNED, UNALIGNED = 0, 1
CACHE_FORMAT = "sails_fast.unaligned_cache/1"


@dataclass
class CollectConfig(ConfigBase):
    """How feature statistics are collected (and how the unaligned side is generated).

    Args:
        layers: decoder-block indices to hook; empty = every layer that has an SAE. When given, it must
            name exactly the layers of the `saes` dict.
        batch_size: examples per forward pass (each pair gives two examples).
        max_length: most tokens per example (prompt + response); longer ones are truncated with a warning.
        pooling: "response_mean" weights each response token 1/len(response), so every example counts
            once (mean over tokens, then over examples); "token" weights every response token 1.
        hook_point: "residual" = the output of decoder block l (the residual stream after block l).
        chat_template: wrap the prompt in the tokenizer's chat template (with the generation prompt).
        max_new_tokens: greedy completion length for `generate_unaligned`.
        backend: passed to `sae_feature_stats` ("auto", "triton", "torch").
        progress: show a tqdm progress bar.

    Example:
        >>> CollectConfig(layers=(5, 10), batch_size=16, pooling="response_mean")
    """

    layers: tuple[int, ...] = ()
    batch_size: int = 8
    max_length: int = 512
    pooling: Literal["response_mean", "token"] = "response_mean"
    hook_point: Literal["residual"] = "residual"
    chat_template: bool = True
    max_new_tokens: int = 128
    backend: Literal["auto", "triton", "torch"] = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        for layer in self.layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ValueError(f"layers: expected non-negative ints, got {self.layers!r}")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers: expected distinct layer indices, got {self.layers!r}")
        for name in ("batch_size", "max_length", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if self.max_length < 2:
            raise ValueError(
                f"max_length: expected >= 2 (a prompt token and a response token), got {self.max_length}"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {POOLINGS}, got {self.pooling!r}")
        if self.hook_point not in HOOK_POINTS:
            raise ValueError(f"hook_point: expected one of {HOOK_POINTS}, got {self.hook_point!r}")
        if self.backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {self.backend!r}")
        for name in ("chat_template", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")


# ----- tokenisation shared with training


def _messages(prompt: Any) -> tuple[list[dict], str]:
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
    messages, plain = _messages(prompt)
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


def _hidden_size(model: nn.Module) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return int(base.config.hidden_size)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


class _StopForward(Exception):
    """Raised by the deepest hook: the layers after it are not needed."""


def _sae_feature_stats():
    # looked up at call time so the op's module is imported only when statistics are collected
    from ..sae_stats import sae_feature_stats

    return sae_feature_stats


def _sae_width(sae) -> int:
    return int(sae.W_enc.shape[0])


def _sae_latents(sae) -> int:
    return int(sae.W_enc.shape[1])


def _examples(pairs: Sequence) -> list[tuple[Any, str, int, int]]:
    """(prompt, response, label, pair index) for both sides of each pair, aligned then unaligned."""
    if pairs is None or len(pairs) == 0:
        raise ValueError("pairs: expected at least one contrastive pair, got none")
    out = []
    for i, pair in enumerate(pairs):
        for label, attr in ((ALIGNED, "aligned"), (UNALIGNED, "unaligned")):
            if not hasattr(pair, attr):
                raise ValueError(f"pairs[{i}]: expected a ContrastivePair with .prompt, .aligned, .unaligned")
            response = getattr(pair, attr)
            if response is not None and response.strip():
                out.append((pair, response, label, i))
    present = {label for _, _, label, _ in out}
    if present != {ALIGNED, UNALIGNED}:
        missing = "unaligned" if UNALIGNED not in present else "aligned"
        raise ValueError(
            f"pairs: every pair lacks an {missing} response, so there is only one class; both aligned "
            "(class 0) and unaligned (class 1) responses are needed (generate the unaligned side first)"
        )
    return out


def _check_layers(model: nn.Module, saes: dict, config: CollectConfig) -> list[int]:
    if not isinstance(saes, dict) or not saes:
        raise ValueError("saes: expected a non-empty dict {layer index: SAEWeights}")
    layers = decoder_layers(model)
    n = len(layers)
    for layer in saes:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise ValueError(
                f"saes: layer index {layer!r} out of range; the model has {n} layers (0..{n - 1})"
            )
    if config.layers and set(config.layers) != set(saes):
        raise ValueError(f"layers: config.layers {sorted(config.layers)} != the SAE layers {sorted(saes)}")
    d_model = _hidden_size(model)
    for layer, sae in saes.items():
        if _sae_width(sae) != d_model:
            raise ValueError(
                f"saes[{layer}]: SAE input width {_sae_width(sae)} != model hidden size {d_model}; "
                "the SAE was trained on another model or another hook point"
            )
    return sorted(saes)


def _batch(encoded: list[tuple[list[int], int]], labels: list[int], pooling: str, pad_id: int, device):
    """Right-padded ids, attention mask, per-token labels (-1 = prompt or padding) and weights."""
    B = len(encoded)
    S = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    attention = torch.zeros((B, S), dtype=torch.long)
    token_labels = torch.full((B, S), -1, dtype=torch.long)
    weights = torch.zeros((B, S), dtype=torch.float32)
    for b, ((ids, n_prompt), label) in enumerate(zip(encoded, labels, strict=True)):
        L, n_resp = len(ids), len(ids) - n_prompt
        input_ids[b, :L] = torch.tensor(ids)
        attention[b, :L] = 1
        token_labels[b, n_prompt:L] = label
        weights[b, n_prompt:L] = 1.0 / n_resp if pooling == "response_mean" else 1.0
    to = lambda t: t.to(device)
    return to(input_ids), to(attention), to(token_labels.reshape(-1)), to(weights.reshape(-1))


@torch.no_grad()
def collect_feature_stats(
    model: nn.Module, tokenizer, saes: dict, pairs: Sequence, config: CollectConfig
) -> dict:
    """Per-layer, per-class SAE feature statistics over the responses of contrastive pairs.

    Each pair gives two examples, prompt + aligned response (class 0) and prompt + unaligned response
    (class 1). Only response tokens count (prompt and padding tokens get label -1 and are dropped before
    the SAE); with pooling "response_mean" each response token weighs 1/len(response), so
    `stats.mean()` is the mean over examples of the per-example mean activation. Tokens reach the SAE in
    example order (pair 0 aligned, pair 0 unaligned, pair 1 aligned, ...), so `act_argmax` indexes the
    stream of (possibly truncated) response tokens, whatever the batch size.

    Args:
        model: a causal LM (plain, PEFT-wrapped or 4-bit); frozen and run in eval mode (restored after).
        tokenizer: its tokenizer.
        saes: {layer index: SAEWeights}, each with input width = the model's hidden size.
        pairs: ContrastivePair records (`.prompt`, `.aligned`, `.unaligned`, optional `.history`); a side
            that is None or empty is skipped, but both classes must be present.
        config: CollectConfig.

    Returns:
        dict[int, FeatureStats]: per layer, C = 2 classes x F = the SAE's latents, on the model's device.

    Example:
        >>> stats = collect_feature_stats(model, tok, {10: sae}, pairs, CollectConfig(layers=(10,)))
        >>> d = stats[10].mean()[0] - stats[10].mean()[1]     # [F] aligned minus unaligned
    """
    from tqdm.auto import tqdm

    from ..stats import FeatureStats

    layers = _check_layers(model, saes, config)
    examples = _examples(pairs)
    sae_feature_stats = _sae_feature_stats()
    device = _device(model)
    saes = {layer: (sae.to(device) if hasattr(sae, "to") else sae) for layer, sae in saes.items()}
    stats = {layer: FeatureStats.empty(2, _sae_latents(saes[layer]), device=device) for layer in layers}

    encoded, n_truncated = [], 0
    for prompt, response, _, _ in examples:
        ids, n_prompt, cut = tokenize_example(
            tokenizer, prompt, response, chat_template=config.chat_template, max_length=config.max_length
        )
        encoded.append((ids, n_prompt))
        n_truncated += cut
    if n_truncated:
        warnings.warn(
            f"max_length: {n_truncated} of {len(encoded)} examples are longer than {config.max_length} "
            "tokens and were truncated",
            stacklevel=2,
        )

    # the current batch's labels and weights, read by the hooks
    current: dict[str, torch.Tensor] = {}
    deepest = layers[-1]

    def make_hook(layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            keep = current["labels"] >= 0
            x = h.reshape(-1, h.shape[-1])[keep]
            sae_feature_stats(
                x, saes[layer], current["labels"][keep], token_weights=current["weights"][keep],
                num_classes=2, out=stats[layer], backend=config.backend,
            )  # fmt: skip
            if layer == deepest:
                raise _StopForward

        return hook

    blocks = decoder_layers(model)
    was_training = model.training
    handles = []
    try:
        model.eval()
        for layer in layers:
            handles.append(blocks[layer].register_forward_hook(make_hook(layer)))
        starts = range(0, len(encoded), config.batch_size)
        bar = tqdm(starts, desc="feature stats", unit="batch", disable=not config.progress)
        for start in bar:
            chunk = slice(start, start + config.batch_size)
            labels = [label for _, _, label, _ in examples[chunk]]
            input_ids, attention, current["labels"], current["weights"] = _batch(
                encoded[chunk], labels, config.pooling, _pad_id(tokenizer), device
            )
            try:
                model(input_ids=input_ids, attention_mask=attention, use_cache=False)
            except _StopForward:
                pass
            else:
                raise RuntimeError(
                    "the deepest hooked layer did not run; the hooks are not on the decoder blocks"
                )
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return stats


# ----- the unaligned side


def prompt_hash(prompt: Any) -> str:
    """sha256 of a prompt's content (text and any history): the cache key of its completion."""
    messages, _ = _messages(prompt)
    return hashlib.sha256(
        json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8")
    ).hexdigest()


def _generation_settings(model: nn.Module, config: CollectConfig) -> dict:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = str(getattr(getattr(base, "config", None), "_name_or_path", "") or type(base).__name__)
    return {
        "model": name,
        "chat_template": config.chat_template,
        "max_new_tokens": config.max_new_tokens,
        "max_length": config.max_length,
        "decoding": "greedy",
    }


def _read_cache(path: Path, settings: dict) -> dict[str, str]:
    """Completed records of a cache file; a torn last line (a killed writer) is dropped and rewritten."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    # every complete record ends in a newline, so only the final segment can be torn
    torn = lines.pop() != ""
    done, good = {}, []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ok = (
                isinstance(rec, dict)
                and rec.get("format") == CACHE_FORMAT
                and {"hash", "response"} <= set(rec)
            )
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise ValueError(
                f"cache_path: {path} line {i + 1} is not an unaligned-completion record (corrupted?)"
            )
        if rec.get("settings") != settings:
            raise ValueError(
                f"cache_path: {path} holds completions made with {rec.get('settings')}, not {settings}; "
                "use another cache file"
            )
        done[rec["hash"]] = rec["response"]
        good.append(line)
    if torn:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(g + "\n" for g in good), encoding="utf-8")
        tmp.replace(path)
    return done


@torch.no_grad()
def generate_unaligned(
    model: nn.Module, tokenizer, prompts: Sequence, config: CollectConfig, cache_path: str | Path
) -> list[str]:
    """The model's own greedy completions of `prompts`, generated once and cached.

    Each completion is appended to `cache_path` (JSONL, one record per prompt keyed by the sha256 of the
    prompt and its history, with the generation settings) as soon as its batch is done, so a killed run
    resumes where it stopped; a cache made with other settings (model, template, lengths) is refused.

    Args:
        model: the unaligned causal LM.
        tokenizer: its tokenizer (needs a pad or eos token for batching).
        prompts: str, ContrastivePair or PromptRecord items.
        config: CollectConfig (chat_template, batch_size, max_length for the prompt, max_new_tokens).
        cache_path: the JSONL file (created with its parent folders).

    Returns:
        list[str]: one completion per prompt, in order (special tokens removed).

    Example:
        >>> texts = generate_unaligned(model, tok, [p.prompt for p in pairs], CollectConfig(), "gen.jsonl")
        >>> pairs = [p.with_unaligned(t, "generated") for p, t in zip(pairs, texts)]
    """
    from tqdm.auto import tqdm

    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got none")
    path = Path(cache_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = _generation_settings(model, config)
    done = _read_cache(path, settings)
    keys = [prompt_hash(p) for p in prompts]
    todo, seen = [], set()
    for key, prompt in zip(keys, prompts, strict=True):
        if key not in done and key not in seen:
            todo.append((key, prompt))
            seen.add(key)

    device = _device(model)
    pad_id = _pad_id(tokenizer)
    was_training = model.training
    model.eval()
    n_truncated = 0
    try:
        bar = tqdm(range(0, len(todo), config.batch_size), desc="unaligned completions", unit="batch",
                   disable=not config.progress or not todo)  # fmt: skip
        for start in bar:
            chunk = todo[start : start + config.batch_size]
            encoded = []
            for _, prompt in chunk:
                ids = prompt_ids(tokenizer, prompt, config.chat_template)
                if len(ids) > config.max_length:
                    n_truncated += 1
                    ids = ids[len(ids) - config.max_length :]
                encoded.append(ids)
            # left padding, so every row's generation starts right after its own prompt
            S = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(encoded), S), pad_id, dtype=torch.long)
            attention = torch.zeros_like(input_ids)
            for b, ids in enumerate(encoded):
                input_ids[b, S - len(ids) :] = torch.tensor(ids)
                attention[b, S - len(ids) :] = 1
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=False,
                max_new_tokens=config.max_new_tokens, pad_token_id=pad_id,
            )  # fmt: skip
            with path.open("a", encoding="utf-8") as f:
                for (key, _), row in zip(chunk, out[:, S:].tolist(), strict=True):
                    text = tokenizer.decode(row, skip_special_tokens=True)
                    done[key] = text
                    rec = {"format": CACHE_FORMAT, "hash": key, "response": text, "settings": settings}
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
    finally:
        model.train(was_training)
    if n_truncated:
        warnings.warn(
            f"max_length: {n_truncated} prompts are longer than {config.max_length} tokens and were "
            "truncated (oldest tokens dropped) before generation",
            stacklevel=2,
        )
    return [done[key] for key in keys]


def complete_pairs(
    model: nn.Module, tokenizer, pairs: Sequence, config: CollectConfig, cache_path: str | Path
):
    """Fill the missing unaligned side of `pairs` with `generate_unaligned` (pairs that have one are kept).

    Args:
        model, tokenizer, config, cache_path: as for `generate_unaligned`.
        pairs: ContrastivePair records.

    Returns:
        list[ContrastivePair]: the same pairs in order, filled in ("generated") where the completion is
        not empty; an empty completion leaves unaligned=None, with a warning.

    Example:
        >>> pairs = complete_pairs(model, tok, pairs, CollectConfig(), "out/unaligned.jsonl")
    """
    missing = [i for i, p in enumerate(pairs) if p.unaligned is None]
    if not missing:
        return list(pairs)
    texts = generate_unaligned(model, tokenizer, [pairs[i] for i in missing], config, cache_path)
    out, empty = list(pairs), 0
    for i, text in zip(missing, texts, strict=True):
        if text.strip():
            out[i] = pairs[i].with_unaligned(text, "generated")
        else:
            empty += 1
    if empty:
        warnings.warn(
            f"pairs: the model's completion was empty for {empty} of {len(missing)} prompts; those pairs "
            "keep unaligned=None (collect_feature_stats uses only their aligned side)",
            stacklevel=2,
        )
    return out
