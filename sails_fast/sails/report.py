"""Deprecated: moved to `sails_fast.report.html`; names forward to their new homes."""

from sails_fast._deprecated import alias

__getattr__ = alias(
    __name__,
    {
        "PLOTS": "sails_fast.report.plots",
        "TOKEN_MAP_FORMAT": "sails_fast.report.token_map",
        "TOKEN_MAP_VERSION": "sails_fast.report.token_map",
        "TokenMap": "sails_fast.report.token_map",
        "_figure": "sails_fast.report.plots",
        "_png": "sails_fast.report.plots",
        "_safety_rows": "sails_fast.report.plots",
        "_same_module": "sails_fast.report.shares",
        "adapter_update_shares": "sails_fast.report.shares",
        "build_token_map": "sails_fast.report.token_map",
        "plot_explained_variance": "sails_fast.report.plots",
        "plot_feature_scores": "sails_fast.report.plots",
        "plot_loss": "sails_fast.report.plots",
        "plot_safety": "sails_fast.report.plots",
        "plot_update_shares": "sails_fast.report.plots",
        "update_in_span": "sails_fast.report.shares",
    },
    "sails_fast.report.html",
)
