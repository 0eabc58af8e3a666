"""A Hugging Face model directory loads like its checkpoint file: ``model.safetensors``,
``model.safetensors.index.json`` (shards), ``pytorch_model.bin`` or its index, in
transformers' order of preference; a directory without one is a clear not-found error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ckptd
from ckptd_testlib import assert_same


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.weight": torch.randn(8, 4, generator=g) for i in range(3)} | {
        "lm_head.weight": torch.randn(4, 8, generator=g)
    }


def _sharded(folder: Path, state: dict[str, torch.Tensor], suffix: str) -> Path:
    names = list(state)
    shards = {f"model-0000{i + 1}-of-00002{suffix}": names[i::2] for i in range(2)}
    for shard, keys in shards.items():
        part = {k: state[k] for k in keys}
        save_file(part, folder / shard) if suffix == ".safetensors" else torch.save(part, folder / shard)
    index = folder / ("model.safetensors.index.json" if suffix == ".safetensors" else "pytorch_model.bin.index.json")
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}))
    return index


@pytest.mark.parametrize("kind", ["model.safetensors", "safetensors index", "pytorch_model.bin", "bin index"])
def test_directory_loads_like_its_file(tmp_path: Path, kind: str) -> None:
    state = _state()
    if kind == "model.safetensors":
        save_file(state, tmp_path / kind)
        file = tmp_path / kind
    elif kind == "pytorch_model.bin":
        torch.save(state, tmp_path / kind)
        file = tmp_path / kind
    else:
        file = _sharded(tmp_path, state, ".safetensors" if kind.startswith("safetensors") else ".bin")
    (tmp_path / "config.json").write_text("{}")
    assert_same(ckptd.load(file), ckptd.load(tmp_path))
    assert_same(ckptd.load(file, select="lm_head.weight"), ckptd.load(str(tmp_path), select="lm_head.weight"))
    assert [t.name for t in ckptd.inspect(tmp_path).tensors] == [t.name for t in ckptd.inspect(file).tensors]


def test_safetensors_is_preferred_as_transformers_does(tmp_path: Path) -> None:
    save_file(_state(1), tmp_path / "model.safetensors")
    torch.save(_state(2), tmp_path / "pytorch_model.bin")
    loaded = ckptd.load(tmp_path)
    assert_same(ckptd.load(tmp_path / "model.safetensors"), loaded)
    assert torch.equal(loaded["lm_head.weight"], _state(1)["lm_head.weight"])


def test_directory_without_a_checkpoint(tmp_path: Path) -> None:
    """Fails as torch.load fails on a directory (not as a missing file), naming what was looked for."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(IsADirectoryError):
        torch.load(tmp_path)
    with pytest.raises(ckptd.CheckpointError, match="Hugging Face model directory: no model.safetensors") as info:
        ckptd.load(tmp_path)
    assert not isinstance(info.value, FileNotFoundError) and str(tmp_path) in str(info.value)
