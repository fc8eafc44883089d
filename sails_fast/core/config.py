"""ConfigBase: the dict / JSON round trip every config dataclass shares.

A config is a dataclass that validates itself in `__post_init__` (ValueError naming the field and what was
allowed); ConfigBase adds `to_dict` / `from_dict` (unknown keys rejected, nested configs and tuples
handled), atomic JSON `save` / `load`, and `_check_literals` for Literal-typed fields. It imports nothing
from the library, so any module can use it without import cycles.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin


class ConfigBase:
    """Shared plumbing: Literal checks, dict and JSON round trips with unknown keys rejected."""

    def _check_literals(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            hint = hints[f.name]
            if get_origin(hint) is Literal:
                allowed = get_args(hint)
                value = getattr(self, f.name)
                if value not in allowed:
                    raise ValueError(
                        f"{type(self).__name__}.{f.name}: expected one of {list(allowed)}, got {value!r}"
                    )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists, nested configs become dicts)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a dict like `to_dict` returns. Unknown keys raise ValueError naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a dict, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}; allowed keys are {names}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in data.items():
            sub = config_class(hints[name])
            if sub is not None and isinstance(value, dict):
                value = sub.from_dict(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        """Write `to_dict()` as indented JSON, atomically (tmp file + rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path):
        """Read a JSON (or YAML) file written by `save` or by hand; ValueError naming the path if bad."""
        return cls.from_dict(read_config_file(path, "path: cannot read a config"))


def read_config_file(path: str | Path, error: str) -> Any:
    """The parsed config file at `path`: JSON, or YAML (.yaml / .yml) when PyYAML is installed.

    Raises ValueError("{error} from {path}: why") for a missing or unreadable file, bad JSON or YAML (with
    the line), or a YAML file without PyYAML.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{error} from {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{error} from {path}: {err}") from err
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"{error} from {path}: a YAML config needs PyYAML (pip install pyyaml), or give a JSON file"
            ) from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{error} from {path}: bad YAML ({err})") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        hint = " (a YAML file? name it .yaml)" if path.suffix.lower() != ".json" else ""
        where = f"line {err.lineno}, column {err.colno}"
        raise ValueError(f"{error} from {path}: bad JSON at {where}: {err.msg}{hint}") from err


def config_class(hint: Any) -> type | None:
    """The config dataclass (one with `from_dict`) inside a type hint like `X` or `X | None`, else None."""
    candidates = [hint]
    if get_origin(hint) in (Union, types.UnionType):
        candidates = list(get_args(hint))
    for c in candidates:
        if isinstance(c, type) and dataclasses.is_dataclass(c) and hasattr(c, "from_dict"):
            return c
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_names(owner: str, name: str, value: Any, allow_empty: bool = False) -> None:
    if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{owner}.{name}: expected a list of non-empty module names, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"{owner}.{name}: expected at least one module name, got none")
