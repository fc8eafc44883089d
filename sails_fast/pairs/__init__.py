"""Pipeline step "pairs": contrastive (aligned, unaligned) pairs. `config` (CollectConfig, shared with the
statistics step), `tokenize` (prompt + response to tokens, shared by every step that runs the model) and
`generation` (the unaligned side: the model's own completions, generated once and cached).

May import: sails_fast.models, sails_fast.data, sails_fast.core.
"""

from sails_fast.pairs.config import CollectConfig
from sails_fast.pairs.generation import complete_pairs, generate_unaligned
from sails_fast.pairs.tokenize import prompt_ids, tokenize_example

__all__ = ["CollectConfig", "complete_pairs", "generate_unaligned", "prompt_ids", "tokenize_example"]
