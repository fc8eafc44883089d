"""Deprecated: moved to `sails_fast.evaluation.run` (each name forwards to its new home;
docs/architecture.md)."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "COMPLIANCE_OPENINGS": "sails_fast.evaluation.config",
        "ConfigBase": "sails_fast.core.config",
        "EvalConfig": "sails_fast.evaluation.config",
        "EvalResult": "sails_fast.evaluation.results",
        "JUDGE_PREFIX": "sails_fast.evaluation.judge",
        "JUDGE_TEMPLATE": "sails_fast.evaluation.judge",
        "JudgeResult": "sails_fast.evaluation.results",
        "REFUSAL_OPENINGS": "sails_fast.evaluation.config",
        "RESULT_FORMAT": "sails_fast.evaluation.config",
        "RESULT_VERSION": "sails_fast.evaluation.config",
        "RefusalMatcher": "sails_fast.evaluation.refusal",
        "SETS": "sails_fast.evaluation.config",
        "SetResult": "sails_fast.evaluation.results",
        "_bar": "sails_fast.evaluation.generation",
        "_check_int": "sails_fast.evaluation.config",
        "_check_strings": "sails_fast.evaluation.config",
        "_device": "sails_fast.evaluation.generation",
        "_encode_all": "sails_fast.evaluation.generation",
        "_fmt": "sails_fast.evaluation.results",
        "_format_table": "sails_fast.evaluation.results",
        "_left_pad": "sails_fast.evaluation.generation",
        "_pad_id": "sails_fast.evaluation.generation",
        "_prompt_ids": "sails_fast.evaluation.generation",
        "_prompt_text": "sails_fast.evaluation.generation",
        "compare": "sails_fast.evaluation.results",
        "generate_responses": "sails_fast.evaluation.generation",
        "judge_responses": "sails_fast.evaluation.judge",
        "load_judge": "sails_fast.evaluation.judge",
        "logit_refusal_scores": "sails_fast.evaluation.logit_score",
        "opening_token_ids": "sails_fast.evaluation.logit_score",
        "parse_judge_score": "sails_fast.evaluation.judge",
    },
    "sails_fast.evaluation.run",
)
