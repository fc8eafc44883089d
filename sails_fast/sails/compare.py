"""Deprecated: moved to `sails_fast.study.compare` (each name forwards to its new home;
docs/architecture.md)."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "CompareConfig": "sails_fast.study.compare_config",
        "ConfigBase": "sails_fast.core.config",
        "HIDDEN_METHODS": "sails_fast.study.baselines",
        "METHOD_KINDS": "sails_fast.study.compare_config",
        "MethodKind": "sails_fast.study.compare_config",
        "MethodSpec": "sails_fast.study.compare_config",
        "NEEDS_FULL_PRECISION_BASE": "sails_fast.study.baselines",
        "PEFT_INITS": "sails_fast.study.baselines",
        "RESULT_FORMAT": "sails_fast.study.compare_config",
        "RunConfig": "sails_fast.pipeline.config",
        "SelectConfig": "sails_fast.selection.config",
        "Shared": "sails_fast.study.compare_methods",
        "SubspaceConfig": "sails_fast.subspace.config",
        "_calibration_batches": "sails_fast.study.compare_methods",
        "_eval_metrics": "sails_fast.study.compare_methods",
        "_evaluate_model": "sails_fast.study.compare_methods",
        "_probe_config": "sails_fast.study.compare_methods",
        "_trainable_params": "sails_fast.study.compare_methods",
        "build_method_model": "sails_fast.study.compare_methods",
        "default_methods": "sails_fast.study.compare_config",
        "load_training_base": "sails_fast.pipeline.training_model",
        "probe_safety": "sails_fast.study.compare_methods",
        "response_perplexity": "sails_fast.study.compare_methods",
        "run_method": "sails_fast.study.compare_methods",
        "steps_to_held_target": "sails_fast.study.compare_methods",
        "steps_to_target": "sails_fast.study.compare_methods",
    },
    "sails_fast.study.compare",
)
