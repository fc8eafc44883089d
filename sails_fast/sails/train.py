"""Deprecated: moved to `sails_fast.training.loop` (each name forwards to its new home;
docs/architecture.md)."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "CHECKPOINT_FORMAT": "sails_fast.training.checkpoints",
        "ConfigBase": "sails_fast.core.config",
        "TrainConfig": "sails_fast.training.config",
        "_RESUME_FREE": "sails_fast.training.checkpoints",
        "_STEP_DIR": "sails_fast.training.checkpoints",
        "_checkpoints": "sails_fast.training.checkpoints",
        "_fingerprint": "sails_fast.training.sft",
        "_fsync_dir": "sails_fast.training.checkpoints",
        "_load": "sails_fast.training.checkpoints",
        "_restore": "sails_fast.training.checkpoints",
        "_rng_state": "sails_fast.training.checkpoints",
        "_save_checkpoint": "sails_fast.training.checkpoints",
        "_set_rng_state": "sails_fast.training.checkpoints",
        "_sft_examples": "sails_fast.training.sft",
        "_trim_log": "sails_fast.training.checkpoints",
        "load_base_4bit": "sails_fast.models.loading",
        "lr_factor": "sails_fast.training.config",
        "response_loss": "sails_fast.training.sft",
        "sft_batch": "sails_fast.training.sft",
        "tokenize_example": "sails_fast.pairs.tokenize",
    },
    "sails_fast.training.loop",
)
