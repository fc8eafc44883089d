"""Pipeline artifacts on disk: safetensors tensors plus a JSON sidecar.

An artifact is two files, `<stem>.safetensors` (tensors only, no pickle) and `<stem>.json` (the sidecar):

    {"kind": "sails_fast.FeatureSelection", "format_version": 1, "config": {...}, "meta": {...},
     "versions": {"sails_fast": ..., "torch": ..., "transformers": ..., ...}, "git_commit": "..." | null,
     "created": "2026-11-23T12:00:00+00:00", "tensors_sha256": "..."}

`config` is the configuration that produced the artifact (the key for step reuse), `meta` the artifact's
own non-tensor fields. Both files are written to a tmp name and renamed, tensors first, so a sidecar on
disk always describes a complete tensor file; the sidecar's sha256 of the tensor file catches a tensor file
replaced or damaged later.

Example:
    >>> save_artifact("out/selection", "sails_fast.FeatureSelection", {"ids": torch.arange(4)},
    ...               config={"top_k": 4})
    >>> art = load_artifact("out/selection", "sails_fast.FeatureSelection")
    >>> art.tensors["ids"], art.config
    (tensor([0, 1, 2, 3]), {'top_k': 4})
"""

from __future__ import annotations

import datetime
import functools
import json
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch

from sails_fast.core.digests import file_sha256

FORMAT_VERSION = 1


_VERSIONED = (
    "sails_fast",
    "torch",
    "triton",
    "transformers",
    "peft",
    "safetensors",
    "bitsandbytes",
    "sae-lens",
)


@dataclass
class Artifact:
    """A loaded artifact: `tensors` (name -> CPU tensor), the producing `config`, the kind's `meta`, and
    `info` (the whole sidecar: versions, git commit, created time, ...)."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    meta: dict[str, Any]
    info: dict[str, Any]


def artifact_paths(path: str | Path) -> tuple[Path, Path]:
    """(tensor file, sidecar) for an artifact stem; a trailing .safetensors or .json is dropped first."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries an artifact depends on (None where not installed)."""
    out = {}
    for dist in _VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the source tree sails_fast runs from (suffixed "-dirty" with local changes), or None."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


def _canonical(config: dict[str, Any]) -> dict[str, Any]:
    # a JSON round trip turns tuples into lists, so a config compares equal to its saved copy
    return json.loads(json.dumps(config, sort_keys=True))


def save_artifact(
    path: str | Path,
    kind: str,
    tensors: dict[str, torch.Tensor],
    *,
    config: dict[str, Any],
    meta: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write an artifact atomically; an existing one at `path` is replaced.

    Args:
        path: the stem (`out/selection` writes `out/selection.safetensors` and `out/selection.json`).
        kind: what the artifact holds, e.g. "sails_fast.Subspace"; checked again on load.
        tensors: name -> tensor (any shape, any dtype safetensors takes); stored contiguous on CPU.
        config: JSON-able config that produced it (compared by `artifact_status` for step reuse).
        meta: JSON-able non-tensor fields of the artifact.

    Returns:
        (tensor file, sidecar) paths.
    """
    from safetensors.torch import save_file

    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind: expected a non-empty string, got {kind!r}")
    if not isinstance(config, dict):
        raise ValueError(f"config: expected a dict, got {type(config).__name__}")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{name!r}]: expected a torch.Tensor, got {type(t).__name__}")
    tensor_path, sidecar_path = artifact_paths(path)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        config_json = _canonical(config)
        meta_json = _canonical(meta or {})
    except (TypeError, ValueError) as err:
        raise ValueError(f"config/meta: not JSON-serialisable ({err})") from err

    tmp_tensors = tensor_path.with_name(tensor_path.name + ".tmp")
    tmp_sidecar = sidecar_path.with_name(sidecar_path.name + ".tmp")
    try:
        # the old sidecar goes first: a crash between the two renames then leaves no sidecar that
        # vouches for a tensor file it was not written with
        sidecar_path.unlink(missing_ok=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp_tensors),
            {"kind": kind, "format_version": str(FORMAT_VERSION)},
        )
        tmp_tensors.replace(tensor_path)
        info = {
            "kind": kind,
            "format_version": FORMAT_VERSION,
            "config": config_json,
            "meta": meta_json,
            "versions": library_versions(),
            "git_commit": git_commit(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tensors_sha256": file_sha256(tensor_path),
        }
        tmp_sidecar.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        tmp_sidecar.replace(sidecar_path)
    finally:
        tmp_tensors.unlink(missing_ok=True)
        tmp_sidecar.unlink(missing_ok=True)
    return tensor_path, sidecar_path


def read_sidecar(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The sidecar dict of the artifact at `path`, checked for kind and format (tensors not read).

    Raises ValueError naming the path when it is missing, not JSON, another kind or another format version.
    """
    _, sidecar_path = artifact_paths(path)
    try:
        info = json.loads(sidecar_path.read_text())
    except OSError as err:
        raise ValueError(f"path: no artifact sidecar at {sidecar_path} ({err})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"path: {sidecar_path} is not a valid artifact sidecar (bad JSON: {err})") from err
    if not isinstance(info, dict) or not isinstance(info.get("kind"), str) or "config" not in info:
        raise ValueError(f"path: {sidecar_path} is not a sails_fast artifact sidecar (no kind / config)")
    if kind is not None and info["kind"] != kind:
        raise ValueError(f"path: {sidecar_path} holds a {info['kind']!r} artifact, expected {kind!r}")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"path: {sidecar_path} has artifact format version {info.get('format_version')!r}, "
            f"this library reads {FORMAT_VERSION}"
        )
    return info


def load_artifact(path: str | Path, kind: str) -> Artifact:
    """Read and verify an artifact written by `save_artifact`.

    Args:
        path: the stem (or either file's path).
        kind: the expected kind.

    Returns:
        Artifact with CPU tensors.

    Raises:
        ValueError naming the path: a missing or damaged file, a tensor file that does not match its
        sidecar's checksum, or an artifact of another kind.
    """
    from safetensors import safe_open

    tensor_path, _ = artifact_paths(path)
    info = read_sidecar(path, kind)
    if not tensor_path.is_file():
        raise ValueError(f"path: the tensor file {tensor_path} of this artifact is missing")
    if file_sha256(tensor_path) != info.get("tensors_sha256"):
        raise ValueError(
            f"path: {tensor_path} does not match the checksum in its sidecar (damaged or replaced)"
        )
    try:
        with safe_open(str(tensor_path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as err:  # safetensors raises its own error types on damaged files
        raise ValueError(f"path: {tensor_path} is not a readable safetensors file ({err})") from err
    if header.get("kind") != kind:
        raise ValueError(f"path: {tensor_path} holds a {header.get('kind')!r} tensor file, expected {kind!r}")
    return Artifact(tensors=tensors, config=info["config"], meta=info.get("meta", {}), info=info)


def artifact_status(
    path: str | Path, kind: str, config: dict[str, Any]
) -> Literal["missing", "match", "other_config"]:
    """Whether the artifact at `path` can be reused for `config`.

    Returns:
        "missing": no sidecar there (nothing, or a write that never finished);
        "match": a sidecar of this kind made with an equal config (reuse it; `load_artifact` then
            verifies the tensor file against the sidecar's checksum);
        "other_config": one of this kind made with another config (never overwrite it silently).

    Raises:
        ValueError naming the path: a sidecar that is damaged or of another kind.
    """
    _, sidecar_path = artifact_paths(path)
    if not sidecar_path.exists():
        return "missing"
    info = read_sidecar(path, kind)
    return "match" if info["config"] == _canonical(config) else "other_config"


def artifact_matches(path: str | Path, kind: str, config: dict[str, Any]) -> bool:
    """True when an artifact of `kind` exists at `path` for the same `config` (see `artifact_status`)."""
    return artifact_status(path, kind, config) == "match"
