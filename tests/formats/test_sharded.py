"""read_sharded_index on real Hugging Face style indexes, and on hostile ones."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from ckptd.formats._errors import CheckpointError, CheckpointNotFoundError
from ckptd.formats._sharded import ShardedIndex, is_sharded_index, read_sharded_index

INDEX = "model.safetensors.index.json"


def _write_index(folder: Path, document: Any, name: str = INDEX) -> Path:
    path = folder / name
    path.write_text(json.dumps(document))
    return path


def _shard(folder: Path, name: str, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    path = folder / name
    save_file(tensors or {"x": torch.zeros(1)}, str(path))
    return path


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    _shard(folder, "model-00001-of-00002.safetensors", {"a.weight": torch.ones(2), "c": torch.ones(1)})
    _shard(folder, "model-00002-of-00002.safetensors", {"b.weight": torch.ones(3)})
    return folder


def _good_document() -> dict[str, Any]:
    # The second shard is named first, so first-appearance order differs from sorted order.
    return {
        "metadata": {"total_size": 24, "format": "pt"},
        "weight_map": {
            "b.weight": "model-00002-of-00002.safetensors",
            "a.weight": "model-00001-of-00002.safetensors",
            "c": "model-00001-of-00002.safetensors",
        },
    }


def test_reads_index(model_dir: Path) -> None:
    path = _write_index(model_dir, _good_document())
    index = read_sharded_index(str(path))
    assert isinstance(index, ShardedIndex)
    assert index.name == str(path)
    assert index.directory == str(model_dir) and os.path.isabs(index.directory)
    assert dict(index.weight_map) == _good_document()["weight_map"]
    assert index.shards == (
        str(model_dir / "model-00002-of-00002.safetensors"),
        str(model_dir / "model-00001-of-00002.safetensors"),
    )
    assert all(os.path.isabs(shard) and os.path.isfile(shard) for shard in index.shards)
    assert dict(index.metadata) == {"total_size": 24, "format": "pt"}


def test_pathlike_and_relative_path(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_index(model_dir, _good_document(), "pytorch_model.bin.index.json")
    monkeypatch.chdir(model_dir)
    index = read_sharded_index(Path("pytorch_model.bin.index.json"))
    assert index.directory == str(model_dir)
    assert set(index.shards) == {str(p) for p in model_dir.glob("*.safetensors")}
    assert read_sharded_index(path).shards == index.shards


def test_metadata_is_optional(model_dir: Path) -> None:
    path = _write_index(model_dir, {"weight_map": {"a.weight": "model-00001-of-00002.safetensors"}})
    index = read_sharded_index(str(path))
    assert dict(index.metadata) == {}
    assert index.shards == (str(model_dir / "model-00001-of-00002.safetensors"),)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.safetensors.index.json", True),
        ("/a/b/pytorch_model.bin.index.json", True),
        (Path("x.index.json"), True),
        ("model.safetensors", False),
        ("index.json.bak", False),
        ("model.json", False),
    ],
)
def test_is_sharded_index(name: str | Path, expected: bool) -> None:
    assert is_sharded_index(name) is expected


def test_missing_shard(model_dir: Path) -> None:
    document = _good_document()
    document["weight_map"]["d"] = "model-00003-of-00003.safetensors"
    path = _write_index(model_dir, document)
    with pytest.raises(CheckpointNotFoundError) as caught:
        read_sharded_index(str(path))
    assert isinstance(caught.value, FileNotFoundError)
    assert "model-00003-of-00003.safetensors" in str(caught.value) and str(path) in str(caught.value)


def test_missing_index(tmp_path: Path) -> None:
    path = tmp_path / INDEX
    with pytest.raises(CheckpointNotFoundError, match="no such file") as caught:
        read_sharded_index(str(path))
    assert str(path) in str(caught.value)


def test_directory_instead_of_index(tmp_path: Path) -> None:
    folder = tmp_path / "dir.index.json"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="directory") as caught:
        read_sharded_index(str(folder))
    assert str(folder) in str(caught.value)


@pytest.mark.parametrize(
    "shard_name",
    ["../outside.safetensors", "sub/inner.safetensors", "sub\\inner.safetensors", "..", ".", "", "a\0b"],
)
def test_non_plain_shard_names_are_rejected(model_dir: Path, shard_name: str) -> None:
    # The targets exist, so only the name check can reject them.
    _shard(model_dir.parent, "outside.safetensors")
    (model_dir / "sub").mkdir()
    _shard(model_dir / "sub", "inner.safetensors")
    path = _write_index(model_dir, {"weight_map": {"w": shard_name}})
    with pytest.raises(CheckpointError, match="not a plain file name") as caught:
        read_sharded_index(str(path))
    assert str(path) in str(caught.value)
    assert not isinstance(caught.value, CheckpointNotFoundError)


def test_absolute_shard_path_is_rejected(model_dir: Path) -> None:
    outside = _shard(model_dir.parent, "outside.safetensors")
    for target in (outside, model_dir / "model-00001-of-00002.safetensors"):
        path = _write_index(model_dir, {"weight_map": {"w": str(target)}})
        with pytest.raises(CheckpointError, match="not a plain file name") as caught:
            read_sharded_index(str(path))
        assert str(path) in str(caught.value)


def test_symlink_escaping_directory_is_rejected(model_dir: Path) -> None:
    outside = _shard(model_dir.parent, "secret.safetensors")
    (model_dir / "evil.safetensors").symlink_to(outside)
    path = _write_index(model_dir, {"weight_map": {"w": "evil.safetensors"}})
    with pytest.raises(CheckpointError, match="outside the index's directory") as caught:
        read_sharded_index(str(path))
    assert str(path) in str(caught.value)


def test_symlink_inside_directory_is_allowed(model_dir: Path) -> None:
    (model_dir / "alias.safetensors").symlink_to("model-00001-of-00002.safetensors")
    path = _write_index(model_dir, {"weight_map": {"w": "alias.safetensors"}})
    assert read_sharded_index(str(path)).shards == (str(model_dir / "alias.safetensors"),)


def test_dangling_symlink_is_not_found(model_dir: Path) -> None:
    (model_dir / "gone.safetensors").symlink_to("nothing-here.safetensors")
    path = _write_index(model_dir, {"weight_map": {"w": "gone.safetensors"}})
    with pytest.raises(CheckpointNotFoundError):
        read_sharded_index(str(path))


def test_shard_that_is_a_directory_is_not_found(model_dir: Path) -> None:
    (model_dir / "folder.safetensors").mkdir()
    path = _write_index(model_dir, {"weight_map": {"w": "folder.safetensors"}})
    with pytest.raises(CheckpointNotFoundError, match="folder.safetensors"):
        read_sharded_index(str(path))


def test_hugging_face_cache_layout(tmp_path: Path) -> None:
    # models--org--name/snapshots/<rev>/<file> -> ../../blobs/<hash>, as huggingface_hub stores it.
    repo = tmp_path / "models--org--name"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    _shard(blobs, "1f2e3d")
    (blobs / "9a8b7c").write_text(json.dumps({"weight_map": {"x": "model.safetensors"}}))
    (snapshot / "model.safetensors").symlink_to("../../blobs/1f2e3d")
    (snapshot / INDEX).symlink_to("../../blobs/9a8b7c")
    index = read_sharded_index(str(snapshot / INDEX))
    assert index.shards == (str(snapshot / "model.safetensors"),)
    # The blobs folder is the only extra place allowed: not the rest of the repo, nor a sibling.
    other = tmp_path / "models--other--repo"
    other.mkdir()
    for target in (_shard(other, "stolen.safetensors"), _shard(repo, "loose.safetensors")):
        evil = snapshot / f"evil-{target.stem}.safetensors"
        evil.symlink_to(target)
        (blobs / "9a8b7c").write_text(json.dumps({"weight_map": {"x": evil.name}}))
        with pytest.raises(CheckpointError, match="outside"):
            read_sharded_index(str(snapshot / INDEX))


_BAD_DOCUMENTS: dict[str, tuple[str, str]] = {
    "bad_json": ('{"weight_map": ', "not valid JSON"),
    "deep_nesting": ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    "list": ("[1, 2]", "not an object"),
    "no_weight_map": ('{"metadata": {}}', "no 'weight_map'"),
    "weight_map_null": ('{"weight_map": null}', "no 'weight_map'"),
    "weight_map_list": ('{"weight_map": ["a"]}', "not an object"),
    "weight_map_empty": ('{"weight_map": {}}', "empty"),
    "value_not_string": ('{"weight_map": {"w": 3}}', "not a file name"),
    "value_list": ('{"weight_map": {"w": ["a.safetensors"]}}', "not a file name"),
    "metadata_list": (
        '{"metadata": [], "weight_map": {"w": "model-00001-of-00002.safetensors"}}',
        "'metadata'",
    ),
}


@pytest.mark.parametrize("case", sorted(_BAD_DOCUMENTS))
def test_malformed_index_is_rejected(model_dir: Path, case: str) -> None:
    text, words = _BAD_DOCUMENTS[case]
    path = model_dir / f"bad-{case}.index.json"
    path.write_text(text)
    with pytest.raises(CheckpointError) as caught:
        read_sharded_index(str(path))
    assert str(path) in str(caught.value) and words in str(caught.value)


def test_index_not_utf8(model_dir: Path) -> None:
    path = model_dir / INDEX
    path.write_bytes(b'{"weight_map": {"\xff": "a"}}')
    with pytest.raises(CheckpointError, match="UTF-8") as caught:
        read_sharded_index(str(path))
    assert str(path) in str(caught.value)
