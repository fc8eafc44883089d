"""What a run reads from outside its directory, by content: the digests its step fingerprints are made of.

A path in a config says where an input is, not what it holds: a data file edited in place, or a model
folder whose weights were replaced, keeps its path. So every input enters the fingerprints as a digest of
its content:

- prompt sets and pair files: `sails_fast.data.fingerprint` of the records they parse to (named sets, local
  files and hub datasets alike; an edit that changes no record changes nothing);
- a local model or SAE folder: sha256 over its files (names, sizes, bytes), each file's digest cached by
  its path, size and modification time, so a rerun does not read gigabytes again;
- a hub id: the revision the local hub cache resolves it to ("unresolved" when it holds none);
- "embedded": the embedded model's converted folder, like any local folder.

Example:
    >>> digest_path("my_model/")     # 'folder:3f1c...'
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sails_fast.core.paths import default_cache_dir

_CACHE_NAME = "digests.json"


# folders with more unhashed bytes than this show a progress bar
PROGRESS_BYTES = 256 * 2**20


def _cache_path() -> Path:

    return default_cache_dir() / _CACHE_NAME


class _DigestCache:
    """{absolute path: [size, mtime_ns, sha256]} on disk; a damaged or unwritable cache is only slower."""

    def __init__(self) -> None:
        self.path = _cache_path()
        self.entries: dict[str, list] = {}
        self.dirty = False
        try:
            loaded = json.loads(self.path.read_text())
            if isinstance(loaded, dict):
                self.entries = loaded
        except (OSError, ValueError):
            pass

    def cached(self, path: Path) -> str | None:
        stat = path.stat()
        hit = self.entries.get(str(path.resolve()))
        if isinstance(hit, list) and hit[:2] == [stat.st_size, stat.st_mtime_ns]:
            return hit[2]
        return None

    def digest(self, path: Path, bar=None) -> str:
        hit = self.cached(path)
        if hit is not None:
            return hit
        stat = path.stat()
        key = str(path.resolve())
        value = file_sha256(path, bar)
        self.entries[key] = [stat.st_size, stat.st_mtime_ns, value]
        self.dirty = True
        return value

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries))
            tmp.replace(self.path)
        except OSError:
            pass


def file_sha256(path: Path, bar=None) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks (`bar`: a progress bar to advance)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (cached by path, size and mtime)."""
    cache = _DigestCache()
    try:
        return cache.digest(Path(path))
    finally:
        cache.save()


def _folder_files(root: Path) -> list[Path]:
    # hidden entries (.cache, .git, lock files) are not the model
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return files


def folder_digest(path: str | os.PathLike) -> str:
    """sha256 over a folder's files: relative names and contents (hidden entries skipped)."""
    from tqdm.auto import tqdm

    root = Path(path)
    cache = _DigestCache()
    files = _folder_files(root)
    todo = sum(f.stat().st_size for f in files if cache.cached(f) is None)
    h = hashlib.sha256()
    # the first read of a large model takes a while: say so (later runs hit the cache)
    with tqdm(total=todo, unit="B", unit_scale=True, desc=f"hashing {root.name}",
              disable=todo < PROGRESS_BYTES) as bar:  # fmt: skip
        try:
            for file in files:
                h.update(f"{file.relative_to(root).as_posix()}\0{cache.digest(file, bar)}\n".encode())
        finally:
            cache.save()
    return h.hexdigest()


def hub_revision(repo_id: str, repo_type: str = "model") -> str:
    """The commit the local hub cache holds for `repo_id` at "main", or "unresolved" (never a download)."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return "unresolved"
    folder = Path(HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "refs" / "main"
    try:
        return folder.read_text().strip() or "unresolved"
    except OSError:
        return "unresolved"


def digest_path(spec: str | os.PathLike, repo_type: str = "model") -> str:
    """A local file or folder by content; anything else as a hub id at its cached revision."""
    path = Path(spec).expanduser()
    if path.is_file():
        return f"file:{file_digest(path)}"
    if path.is_dir():
        return f"folder:{folder_digest(path)}"
    return f"hub:{spec}@{hub_revision(str(spec), repo_type)}"
