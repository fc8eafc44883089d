"""Pipeline step "subspace": orthonormal safety bases from the selected features' decoder directions
(`config`: SubspaceConfig; `subspace`: Subspace, build_subspace).

May import: sails_fast.selection, sails_fast.core.
"""

from sails_fast.subspace.config import SubspaceConfig
from sails_fast.subspace.subspace import POOLED, Subspace, SubspaceBasis, build_subspace

__all__ = ["POOLED", "Subspace", "SubspaceBasis", "SubspaceConfig", "build_subspace"]
