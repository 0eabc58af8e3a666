"""Reading storages: neighbours in the file are read as one span, each still at its own view."""

from __future__ import annotations

from pathlib import Path

import torch

from ckptd.engine import read_storages
from ckptd.engine._plan import _runs
from ckptd.formats import open_source, read_layout
from ckptd_testlib import assert_same


def _small_tensors(n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"experts.{i}.w": torch.randn(8, 16, generator=gen).bfloat16() for i in range(n)}


def test_many_small_storages_are_one_read(tmp_path: Path) -> None:
    path = tmp_path / "moe.pt"
    torch.save(_small_tensors(300), path)
    layout = read_layout(open_source(path))
    runs = _runs(list(layout.storages.values()))
    assert len(runs) == 1 and len(runs[0].records) == 300
    with open_source(path) as source:
        storages = read_storages(source, layout, layout.storages, "cpu")
    expected = torch.load(path)
    for entry in layout.tensors:  # every view holds its own storage's bytes
        got = torch.empty(0, dtype=entry.dtype).set_(storages.get(entry.storage_keys[0], "cpu"), 0, entry.shape, entry.stride)
        assert torch.equal(got, expected[entry.name])


def test_far_apart_and_unaligned_storages_are_read_apart(tmp_path: Path) -> None:
    state = {"a": torch.ones(4), "big": torch.zeros(1 << 16), "b": torch.full((4,), 2.0)}
    path = tmp_path / "gap.pt"
    torch.save(state, path)
    layout = read_layout(open_source(path))
    wanted = [layout.storages[entry.storage_keys[0]] for entry in layout.tensors if entry.name != "big"]
    assert len(_runs(wanted)) == 2  # 256 KiB between them: not worth reading
    legacy = tmp_path / "legacy.pt"
    torch.save(_small_tensors(5), legacy, _use_new_zipfile_serialization=False)
    records = list(read_layout(open_source(legacy)).storages.values())
    assert len(_runs(records)) == 5  # legacy storages are not 64-byte aligned: each alone


def test_selective_load_of_every_other_tensor(tmp_path: Path) -> None:
    import ckptd

    path = tmp_path / "moe.pt"
    state = _small_tensors(50)
    torch.save(state, path)
    names = list(state)[::2]
    assert_same({name: state[name] for name in names}, ckptd.load(path, select=names))


def test_progress_counts_storage_bytes(tmp_path: Path) -> None:
    path = tmp_path / "moe.pt"
    torch.save(_small_tensors(200), path)
    layout = read_layout(open_source(path))
    seen: list[int] = []
    with open_source(path) as source:
        read_storages(source, layout, layout.storages, "cpu", progress=seen.append)
    assert sum(seen) == layout.nbytes  # not the zip headers read along with them


def test_big_storages_are_read_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    torch.save({"a": torch.ones(1 << 15), "b": torch.zeros(1 << 15), "c": torch.ones(3)}, path)  # 128 KiB each
    records = list(read_layout(open_source(path)).storages.values())
    assert len(_runs(records)) == 3  # no bytes between storages read for them
