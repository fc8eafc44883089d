"""The token map: FeatureStats' argmax token indices mapped back to (pair, position), for the report's
snippets."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

TOKEN_MAP_FORMAT = "sails_fast.TokenMap"


TOKEN_MAP_VERSION = 1


# ----- token index -> (example, position)


@dataclass
class TokenMap:
    """The stream of response tokens that `collect_feature_stats` fed the SAE, in order.

    Attributes:
        offsets [E + 1] int64: example e's response tokens are stream indices offsets[e] .. offsets[e+1]-1.
        pair_index [E] int64: the pair each example came from.
        label [E] int64: 0 aligned, 1 unaligned.
        tokens [T] int64: the response token ids, T = offsets[-1] = FeatureStats.tokens_seen.

    Example:
        >>> tm = build_token_map(tok, pairs, CollectConfig())
        >>> tm.locate(int(stats.act_argmax[0, 123]))     # (example, position in its response)
    """

    offsets: torch.Tensor
    pair_index: torch.Tensor
    label: torch.Tensor
    tokens: torch.Tensor

    def __post_init__(self) -> None:
        E = self.pair_index.shape[0]
        for name, shape in (("offsets", (E + 1,)), ("label", (E,)), ("tokens", (int(self.offsets[-1]),))):
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != torch.int64:
                raise ValueError(f"{name}: expected {list(shape)} int64, got {list(t.shape)} {t.dtype}")
        if E and bool((self.offsets[1:] < self.offsets[:-1]).any()):
            raise ValueError("offsets: expected a non-decreasing sequence")

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(example, position within its response) of stream token `index`."""
        if not 0 <= index < self.num_tokens:
            raise ValueError(f"index: expected a stream index in [0, {self.num_tokens}), got {index}")
        e = int(torch.searchsorted(self.offsets, torch.tensor(index), right=True)) - 1
        return e, index - int(self.offsets[e])

    def snippet(self, tokenizer, index: int, context: int = 8) -> tuple[str, str, str]:
        """(text before, the token, text after) around stream token `index`, within its response."""
        e, _ = self.locate(index)
        lo, hi = int(self.offsets[e]), int(self.offsets[e + 1])
        dec = lambda a, b: tokenizer.decode(self.tokens[a:b].tolist()) if b > a else ""
        return (
            dec(max(lo, index - context), index),
            dec(index, index + 1),
            dec(index + 1, min(hi, index + 1 + context)),
        )

    def save(self, path: str | Path) -> Path:
        """Write safetensors with a small JSON header, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {k: getattr(self, k).contiguous() for k in ("offsets", "pair_index", "label", "tokens")}
        header = {"format": TOKEN_MAP_FORMAT, "version": TOKEN_MAP_VERSION}
        save_file(tensors, str(tmp), {"header": json.dumps(header)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TokenMap:
        """Read a file written by `save`; ValueError naming the path when it is not one."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = json.loads((f.metadata() or {}).get("header", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            if header.get("format") != TOKEN_MAP_FORMAT or header.get("version") != TOKEN_MAP_VERSION:
                raise ValueError(f"header {header}")
            return cls(**tensors)
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise ValueError(f"path: {path} is not a readable TokenMap ({err})") from err


def build_token_map(tokenizer, pairs: Sequence, config) -> TokenMap:
    """The TokenMap of `collect_feature_stats(model, tokenizer, saes, pairs, config)`.

    Uses the collect step's own example order and tokenisation (`tokenize_example`, truncation included),
    so stream index i here is stream index i there.

    Args:
        tokenizer: the tokenizer given to collect_feature_stats.
        pairs: the same ContrastivePair records, in the same order.
        config: the same CollectConfig (chat_template, max_length).

    Returns:
        TokenMap with T = the FeatureStats' tokens_seen.

    Example:
        >>> build_token_map(tok, pairs, cfg).save(run_dir / "stats" / "token_map.safetensors")
    """
    import warnings

    from sails_fast.pairs.tokenize import tokenize_example
    from sails_fast.statistics.collect import _examples

    offsets, pair_index, label, tokens = [0], [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for prompt, response, lab, i in _examples(pairs):
            ids, n_prompt, _ = tokenize_example(
                tokenizer, prompt, response, chat_template=config.chat_template, max_length=config.max_length
            )
            resp = ids[n_prompt:]
            tokens += resp
            offsets.append(offsets[-1] + len(resp))
            pair_index.append(i)
            label.append(lab)
    as_t = lambda x: torch.tensor(x, dtype=torch.int64)
    return TokenMap(as_t(offsets), as_t(pair_index), as_t(label), as_t(tokens))
