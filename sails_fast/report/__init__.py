"""Pipeline step "report": an HTML report of a run. `token_map` (where each feature fires), `shares` (how
much of each update lies in its basis), `plots` (PNGs) and `html` (report).

May import: the steps before it (sails_fast.pairs, sails_fast.statistics, sails_fast.selection,
sails_fast.subspace, sails_fast.lora_init, sails_fast.training, sails_fast.evaluation), sails_fast.data,
sails_fast.core.
"""

from sails_fast.report.html import report

__all__ = ["report"]
