"""Orchestration: the SAILS pipeline end to end in a run directory. `config` (RunConfig and its sections,
SailsConfig), `data` (the run's data sources and splits, the leak check), `fingerprints` (what each step
depends on), `state` (run_state.json: what finished, with what, verified on reuse), `training_model`
(the base and LoRA model of init, train and eval), `run` (run_pipeline), `summary` and `demo`.

May import: the pipeline steps (sails_fast.pairs, sails_fast.statistics, sails_fast.selection,
sails_fast.subspace, sails_fast.lora_init, sails_fast.training, sails_fast.evaluation, sails_fast.report),
sails_fast.sae_training, sails_fast.sae, sails_fast.models, sails_fast.data, sails_fast.core.
"""

from sails_fast.pipeline.config import RunConfig
from sails_fast.pipeline.fingerprints import STEPS
from sails_fast.pipeline.run import RunResult, run_pipeline

__all__ = ["STEPS", "RunConfig", "RunResult", "run_pipeline"]
