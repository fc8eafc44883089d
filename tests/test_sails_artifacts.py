"""Artifacts: round trip, reuse status, damaged files, wrong kinds, atomic writes."""

import hashlib
import json
from importlib import metadata

import pytest
import torch

from sails_fast.core.artifacts import (
    artifact_matches,
    artifact_paths,
    artifact_status,
    load_artifact,
    save_artifact,
)
from sails_fast.pipeline.config import SailsConfig

KIND = "test.Thing"


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g),
        "ids": torch.tensor([4, 1, 7], dtype=torch.int64),
        "half": torch.randn(7, generator=g).to(torch.bfloat16),
    }


def test_round_trip(tmp_path):
    tensors = _tensors()
    config = SailsConfig().to_dict()
    stem = tmp_path / "sub" / "thing"
    tensor_path, sidecar_path = save_artifact(stem, KIND, tensors, config=config, meta={"n": 3})
    assert tensor_path == tmp_path / "sub" / "thing.safetensors" and sidecar_path.name == "thing.json"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["thing.json", "thing.safetensors"]
    art = load_artifact(tmp_path / "sub" / "thing.safetensors", KIND)
    assert art.tensors.keys() == tensors.keys()
    for k, v in tensors.items():
        assert art.tensors[k].dtype == v.dtype and torch.equal(art.tensors[k], v)
    assert art.config == config and art.meta == {"n": 3}
    assert SailsConfig.from_dict(art.config) == SailsConfig()
    info = art.info
    assert info["kind"] == KIND and info["versions"]["torch"] == metadata.version("torch")
    assert "transformers" in info["versions"] and "sails_fast" in info["versions"]
    assert "git_commit" in info and info["created"].endswith("+00:00")


def test_status_for_reuse(tmp_path):
    path = tmp_path / "thing"
    cfg = {"rank": 4, "targets": ("q_proj", "o_proj")}
    assert artifact_status(path, KIND, cfg) == "missing"
    save_artifact(path, KIND, _tensors(), config=cfg)
    # tuples and lists compare equal: the saved config went through JSON
    assert artifact_status(path, KIND, {"targets": ["q_proj", "o_proj"], "rank": 4}) == "match"
    assert artifact_matches(path, KIND, cfg)
    assert artifact_status(path, KIND, {"rank": 8, "targets": ["q_proj", "o_proj"]}) == "other_config"
    assert not artifact_matches(path, KIND, {"rank": 8})
    with pytest.raises(ValueError, match="expected 'other.Kind'"):
        artifact_status(path, "other.Kind", cfg)


def test_wrong_kind(tmp_path):
    save_artifact(tmp_path / "thing", KIND, _tensors(), config={})
    with pytest.raises(ValueError, match=r"thing\.json.*'test\.Thing'.*expected 'other\.Kind'"):
        load_artifact(tmp_path / "thing", "other.Kind")


def test_damaged_tensor_file(tmp_path):
    tensor_path, _ = save_artifact(tmp_path / "thing", KIND, _tensors(), config={})
    raw = bytearray(tensor_path.read_bytes())
    raw[-3] ^= 0xFF
    tensor_path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"thing\.safetensors.*checksum"):
        load_artifact(tmp_path / "thing", KIND)
    tensor_path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"thing\.safetensors"):
        load_artifact(tmp_path / "thing", KIND)
    tensor_path.unlink()
    with pytest.raises(ValueError, match=r"thing\.safetensors.*missing"):
        load_artifact(tmp_path / "thing", KIND)


def test_damaged_tensor_file_with_matching_checksum(tmp_path):
    # a sidecar that vouches for a file safetensors cannot parse: the parse error still names the path
    tensor_path, sidecar_path = save_artifact(tmp_path / "thing", KIND, _tensors(), config={})
    tensor_path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}xxx")
    info = json.loads(sidecar_path.read_text())
    info["tensors_sha256"] = hashlib.sha256(tensor_path.read_bytes()).hexdigest()
    sidecar_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"thing\.safetensors is not a readable safetensors file"):
        load_artifact(tmp_path / "thing", KIND)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"kind": "test.Thing"}', ""])
def test_damaged_sidecar(tmp_path, content):
    _, sidecar_path = save_artifact(tmp_path / "thing", KIND, _tensors(), config={})
    sidecar_path.write_text(content)
    with pytest.raises(ValueError, match=r"thing\.json"):
        load_artifact(tmp_path / "thing", KIND)
    with pytest.raises(ValueError, match=r"thing\.json"):
        artifact_status(tmp_path / "thing", KIND, {})


def test_missing_artifact(tmp_path):
    with pytest.raises(ValueError, match=r"nothing\.json"):
        load_artifact(tmp_path / "nothing", KIND)


def test_overwrite_and_no_tmp_left(tmp_path):
    save_artifact(tmp_path / "thing", KIND, {"x": torch.zeros(2)}, config={"v": 1})
    save_artifact(tmp_path / "thing", KIND, {"x": torch.ones(3)}, config={"v": 2})
    art = load_artifact(tmp_path / "thing", KIND)
    assert torch.equal(art.tensors["x"], torch.ones(3)) and art.config == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing.json", "thing.safetensors"]


def test_bad_input_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="config/meta"):
        save_artifact(tmp_path / "thing", KIND, {"x": torch.zeros(2)}, config={"f": object()})
    with pytest.raises(ValueError, match=r"tensors\['x'\]"):
        save_artifact(tmp_path / "thing", KIND, {"x": [1, 2]}, config={})
    with pytest.raises(ValueError, match="kind"):
        save_artifact(tmp_path / "thing", "", {}, config={})
    assert not any(tmp_path.iterdir())


def test_paths():
    assert artifact_paths("a/b.json") == artifact_paths("a/b") == artifact_paths("a/b.safetensors")
