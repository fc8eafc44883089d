"""Deprecated: moved to `sails_fast.study.theory`; names forward to their new homes."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "DTYPE": "sails_fast.study.theory_problem",
        "PairedData": "sails_fast.study.theory_problem",
        "SaeSubspace": "sails_fast.study.theory_estimators",
        "SyntheticProblem": "sails_fast.study.theory_problem",
        "TheoryConfig": "sails_fast.study.theory_problem",
        "_MAG_HI": "sails_fast.study.theory_problem",
        "_MAG_LO": "sails_fast.study.theory_problem",
        "_MAG_MEAN": "sails_fast.study.theory_problem",
        "_MAG_SQ": "sails_fast.study.theory_problem",
        "_check_pair": "sails_fast.study.theory_problem",
        "_unit_rows": "sails_fast.study.theory_problem",
        "complete_basis": "sails_fast.study.theory_estimators",
        "diff_of_means_direction": "sails_fast.study.theory_estimators",
        "estimate_all": "sails_fast.study.theory_estimators",
        "estimate_direct": "sails_fast.study.theory_estimators",
        "estimate_sae": "sails_fast.study.theory_estimators",
        "make_problem": "sails_fast.study.theory_problem",
        "pca_floor_bound": "sails_fast.study.theory_estimators",
        "pca_of_differences": "sails_fast.study.theory_estimators",
        "polysemantic_dictionary": "sails_fast.study.theory_problem",
        "population_errors": "sails_fast.study.theory_estimators",
        "population_moments": "sails_fast.study.theory_estimators",
        "projector_distance": "sails_fast.study.theory_estimators",
        "sae_subspace": "sails_fast.study.theory_estimators",
        "sample_pairs": "sails_fast.study.theory_problem",
        "subspace_from_directions": "sails_fast.study.theory_estimators",
        "with_polysemanticity": "sails_fast.study.theory_problem",
    },
    "sails_fast.study.theory",
)
