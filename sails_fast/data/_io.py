"""Reading rows (dicts) from user sources: JSONL, JSON, CSV/TSV files, `datasets` objects, hub ids, lists.

Every row comes with a location string ("file.jsonl:12", "file.json[3]", "name[7]") so that errors can
point at the offending line.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

Format = Literal["jsonl", "json", "csv", "tsv"]
FORMATS: tuple[str, ...] = ("jsonl", "json", "csv", "tsv")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv"}

Row = tuple[str, dict[str, Any]]


def _is_datasets_object(obj: object) -> bool:
    # checked by module name so that `datasets` is imported only by users who pass its objects
    return type(obj).__module__.split(".")[0] == "datasets"


def _format_of(path: Path, format: str | None) -> str:
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"format: unknown format {format!r}; expected one of {FORMATS}")
        return format
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"format: unknown format for {str(path)!r} (extension {path.suffix!r}); expected a file "
            f"ending in {sorted(_EXTENSIONS)} or format= one of {FORMATS}"
        )
    return fmt


def _read_text(path: Path) -> str:
    """The file as text (UTF-8, a BOM dropped); a file in another encoding is named with its line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with io.StringIO(_read_text(path)) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: malformed JSONL line ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}"
                )
            rows.append((f"{path}:{lineno}", obj))
    return rows


def _read_json(path: Path) -> list[Row]:
    try:
        obj = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    # our own set files keep their rows under "prompts" beside the metadata
    if isinstance(obj, dict) and isinstance(obj.get("prompts"), list):
        obj = obj["prompts"]
    if not isinstance(obj, list):
        raise ValueError(f"{path}: expected a JSON list of objects (or an object with a 'prompts' list)")
    rows = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise ValueError(f"{path}[{i}]: expected a JSON object, got {type(item).__name__}")
        rows.append((f"{path}[{i}]", item))
    return rows


def _read_csv(path: Path, delimiter: str) -> list[Row]:
    rows = []
    with io.StringIO(_read_text(path), newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            return []
        start = 2
        for row in reader:
            if None in row:
                raise ValueError(
                    f"{path}:{start}: more cells than the {len(reader.fieldnames)} header columns"
                )
            # an empty cell means "no value" (None, like null in JSON); the column itself stays known
            rows.append((f"{path}:{start}", {k: (None if v == "" else v) for k, v in row.items()}))
            # a quoted cell may span lines: the next row starts after the last line read
            start = reader.line_num + 1
    return rows


def read_rows(source: Any, *, format: str | None = None, split: str = "train") -> tuple[str, list[Row]]:
    """Rows of a user source, each with its location.

    Args:
        source: a path (str or PathLike) to a .jsonl / .json / .csv / .tsv file; a `datasets.Dataset` or
            `DatasetDict`; a hub dataset id (str that is not an existing path, loaded with
            `datasets.load_dataset(source, split=split)`, needs network); or a list of dicts.
        format: force a file format instead of using the extension.
        split: the split to take from a DatasetDict or a hub dataset.

    Returns:
        (name, rows): a default source name (file stem or dataset id) and a list of (location, dict).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            fmt = _format_of(path, format)
            if fmt == "jsonl":
                return path.stem, _read_jsonl(path)
            if fmt == "json":
                return path.stem, _read_json(path)
            return path.stem, _read_csv(path, "," if fmt == "csv" else "\t")
        looks_like_path = (
            isinstance(source, os.PathLike)
            or path.suffix.lower() in _EXTENSIONS
            or str(source).startswith((".", "/", "~"))
            or path.exists()
        )
        if looks_like_path:
            raise ValueError(f"source: no such file {str(source)!r}")
        return str(source), _load_hub(str(source), split)
    if _is_datasets_object(source):
        return _dataset_rows(source, split, name=getattr(getattr(source, "info", None), "dataset_name", None))
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        rows = []
        for i, item in enumerate(source):
            if not isinstance(item, Mapping):
                raise ValueError(f"source[{i}]: expected a dict per row, got {type(item).__name__}")
            rows.append((f"rows[{i}]", dict(item)))
        return "rows", rows
    raise ValueError(
        "source: expected a file path, a datasets.Dataset / DatasetDict, a hub dataset id or a list "
        "of dicts, "
        f"got {type(source).__name__}"
    )


def _dataset_rows(ds: Any, split: str, name: str | None) -> tuple[str, list[Row]]:
    # DatasetDict and IterableDatasetDict are dicts of splits
    if isinstance(ds, dict):
        splits = list(ds.keys())
        if split not in splits:
            raise ValueError(f"split: {split!r} is not in this DatasetDict; available splits: {splits}")
        ds = ds[split]
    if type(ds).__name__.startswith("Iterable"):
        rows = [(f"{name or 'dataset'}[{i}]", dict(r)) for i, r in enumerate(ds)]
    else:
        rows = [(f"{name or 'dataset'}[{i}]", dict(ds[i])) for i in range(len(ds))]
    return name or "dataset", rows


def _load_hub(dataset_id: str, split: str) -> list[Row]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"loading the hub dataset {dataset_id!r} needs the `datasets` package: pip install datasets"
        ) from None
    ds = datasets.load_dataset(dataset_id, split=split)
    return _dataset_rows(ds, split, name=dataset_id)[1]
