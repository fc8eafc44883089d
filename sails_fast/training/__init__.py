"""Pipeline step "train": QLoRA-style supervised fine-tuning of the adapters. `config` (TrainConfig, the
schedule), `sft` (batches, response-only loss), `checkpoints` (atomic, resumable), `data_parallel` (DDP
over torchrun ranks) and `loop` (train).

May import: sails_fast.pairs, sails_fast.integrations, sails_fast.models, sails_fast.fused, sails_fast.core.
"""

from sails_fast.training.config import TrainConfig
from sails_fast.training.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
