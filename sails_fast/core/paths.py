"""Where the library keeps its caches (built models, trained SAEs, input digests)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """The cache root: $SAILS_FAST_CACHE if set, else ~/.cache/sails_fast.

    Returns:
        Path: the folder (not created here).

    Example:
        >>> default_cache_dir()  # doctest: +SKIP
        PosixPath('/home/me/.cache/sails_fast')
    """
    env = os.environ.get("SAILS_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sails_fast"


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """`cache_dir` as a Path, or the default one; ValueError if it names an existing file."""
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise ValueError(f"cache_dir: expected a path or None, got {type(cache_dir).__name__}")
    root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise ValueError(f"cache_dir: {root} exists and is not a directory")
    return root
