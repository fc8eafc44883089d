"""Packaging: `kernels/` at the top of the repo installs as `sails_fast.kernels`.

It must never become a top-level module named `kernels`: that name belongs to the Hugging Face hub package
which bitsandbytes and transformers probe at import time.
"""

from setuptools import find_packages, setup

setup(
    # every package under sails_fast/ (one per concern: core, fused, ..., pipeline, study), plus kernels/
    packages=["sails_fast", *(f"sails_fast.{p}" for p in find_packages("sails_fast")), "sails_fast.kernels"],
    package_dir={"sails_fast": "sails_fast", "sails_fast.kernels": "kernels"},
    # the project's own prompt sets (harmless, safe-but-scary) ship as JSON inside the package, and so
    # does the measured strategy table "auto" reads
    package_data={"sails_fast.data": ["*.json"], "sails_fast.fused": ["strategy_table.json"]},
)
