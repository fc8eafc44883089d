"""Old import paths, kept for one release: each module that moved in 0.1's reshape left a thin alias
behind (`sails_fast/sails/*.py`, `sails_fast/lora.py`, ...) that warns once on import and forwards every
name to its new home. They go in 0.2; docs/architecture.md maps old paths to new ones."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def alias(old: str, homes: dict[str, str], default: str) -> Callable[[str], Any]:
    """The module `__getattr__` of the alias `old`: name -> getattr(import(homes.get(name, default)), name).

    Warns (DeprecationWarning, pointing at the importing line) when the alias is imported.
    """
    targets = sorted({default, *homes.values()})
    warnings.warn(
        f"{old} moved; import from {', '.join(targets)} (the old path goes in sails_fast 0.2)",
        DeprecationWarning,
        stacklevel=3,
    )

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        home = importlib.import_module(homes.get(name, default))
        try:
            return getattr(home, name)
        except AttributeError:
            raise AttributeError(f"module {old!r} has no attribute {name!r}") from None

    return __getattr__
