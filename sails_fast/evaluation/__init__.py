"""Pipeline step "eval": refusal and harmfulness before and after training. `config` (EvalConfig),
`generation` (greedy responses), `refusal` (the refusal matcher), `logit_score`, `judge` (an LLM judge),
`results` (EvalResult, the before/after table) and `run` (evaluate, evaluate_before_after).

May import: sails_fast.models, sails_fast.core.
"""

from sails_fast.evaluation.config import EvalConfig
from sails_fast.evaluation.refusal import RefusalMatcher
from sails_fast.evaluation.results import EvalResult, compare
from sails_fast.evaluation.run import evaluate, evaluate_before_after

__all__ = ["EvalConfig", "EvalResult", "RefusalMatcher", "compare", "evaluate", "evaluate_before_after"]
