"""Deprecated: moved to `sails_fast.pipeline.run`; names forward to their new homes."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "DataConfig": "sails_fast.pipeline.config",
        "ModelConfig": "sails_fast.pipeline.config",
        "RETAIN_FILE": "sails_fast.pipeline.data",
        "RunConfig": "sails_fast.pipeline.config",
        "RunState": "sails_fast.pipeline.state",
        "SAEConfig": "sails_fast.pipeline.config",
        "STATE_FILE": "sails_fast.pipeline.state",
        "STEPS": "sails_fast.pipeline.fingerprints",
        "_RESULT_FREE": "sails_fast.pipeline.fingerprints",
        "_from_pretrained": "sails_fast.models.loading",
        "_looks_local": "sails_fast.models.loading",
        "_own": "sails_fast.pipeline.fingerprints",
        "_step_inputs": "sails_fast.pipeline.fingerprints",
        "check_no_leak": "sails_fast.pipeline.data",
        "flatten": "sails_fast.pipeline.state",
        "input_digests": "sails_fast.pipeline.fingerprints",
        "load_model": "sails_fast.models.loading",
        "load_sources": "sails_fast.pipeline.data",
        "prepare_data": "sails_fast.pipeline.data",
        "read_retain": "sails_fast.pipeline.data",
        "resolve_model_path": "sails_fast.models.loading",
        "split_sources": "sails_fast.pipeline.data",
        "stable_hash": "sails_fast.pipeline.state",
        "step_configs": "sails_fast.pipeline.fingerprints",
        "step_fingerprints": "sails_fast.pipeline.fingerprints",
        "write_json_atomic": "sails_fast.pipeline.state",
        "write_retain": "sails_fast.pipeline.data",
    },
    "sails_fast.pipeline.run",
)
