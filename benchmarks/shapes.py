"""Named real-model shapes shared by every benchmark (and the gpu test tier).

Projection shapes are (in_features, out_features) of nn.Linear; SAE shapes are (d_model, d_sae).
Sources: each model's config.json (hidden_size, intermediate_size, heads x head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShapes:
    name: str
    hidden: int
    q_out: int  # num_attention_heads * head_dim
    kv_out: int  # num_key_value_heads * head_dim
    intermediate: int
    sae_width: int  # latents of the SAE this project benchmarks at that model's width

    def projections(self) -> dict[str, tuple[int, int]]:
        return {
            "q_proj": (self.hidden, self.q_out),
            "k_proj": (self.hidden, self.kv_out),
            "v_proj": (self.hidden, self.kv_out),
            "o_proj": (self.q_out, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }


MODELS: dict[str, ModelShapes] = {
    # SmolLM2-135M: 9 heads x 64, 3 kv heads; SAE 8x
    "smollm2-135m": ModelShapes("smollm2-135m", 576, 576, 192, 1536, 4608),
    # Gemma-2-2B: 8 heads x 256, 4 kv heads; Gemma Scope 16K
    "gemma-2-2b": ModelShapes("gemma-2-2b", 2304, 2048, 1024, 9216, 16384),
    # Gemma-2-9B: 16 heads x 256, 8 kv heads; Gemma Scope 16K
    "gemma-2-9b": ModelShapes("gemma-2-9b", 3584, 4096, 2048, 14336, 16384),
    # Llama-3.1-8B: 32 heads x 128, 8 kv heads; Llama Scope 8x (32K)
    "llama-3.1-8b": ModelShapes("llama-3.1-8b", 4096, 4096, 1024, 14336, 32768),
}

# token counts of the GPU goals in the issues
GOAL_TOKENS_LORA = 8192
GOAL_TOKENS_SAE = 65536
GOAL_RANK = 16


def projection(model: str, name: str) -> tuple[int, int]:
    """(in_features, out_features) of a named projection, e.g. projection("gemma-2-9b", "q_proj")."""
    return MODELS[model].projections()[name]
