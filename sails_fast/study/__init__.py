"""The studies on top of the pipeline: the comparison with baselines (`compare_config`, `compare_methods`,
`compare`, `compare_outputs`, `baselines`) and the synthetic check of the paper's identification theorem
(`theory_problem`, `theory_estimators`, `theory`).

May import: sails_fast.pipeline and what it may import (sails_fast.training, sails_fast.evaluation,
sails_fast.lora_init, sails_fast.subspace, sails_fast.selection, sails_fast.statistics, sails_fast.pairs,
sails_fast.sae, sails_fast.models, sails_fast.data, sails_fast.core).
"""
