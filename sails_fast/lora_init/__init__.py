"""Pipeline step "init": LoRA adapters initialised from the safety subspace (`config`: InitConfig; `init`:
init_lora_from_subspace, which module gets which basis).

May import: sails_fast.subspace, sails_fast.selection, sails_fast.models, sails_fast.core.
"""

from sails_fast.lora_init.config import InitConfig
from sails_fast.lora_init.init import (
    InitReport,
    choose_basis_layer,
    init_lora_from_subspace,
    make_lora_config,
)

__all__ = ["InitConfig", "InitReport", "choose_basis_layer", "init_lora_from_subspace", "make_lora_config"]
