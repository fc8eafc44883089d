"""The library's version (pyproject.toml carries the same string; tests/test_architecture.py checks they
agree)."""

__version__ = "0.1.0"
