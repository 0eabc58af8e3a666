"""ckptd.jit_load against torch.jit.load on real TorchScript archives."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

import ckptd


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.register_buffer("scale", torch.full((8,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x)) * self.scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.block = Block()
        self.alias = self.block  # one submodule under two names
        self.conv = nn.Conv1d(8, 4, 3)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.alias(self.block(self.embed(ids)))
        return self.bn(self.conv(h.transpose(1, 2))) + torch.tensor(1.5)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = Net().eval()
    path = tmp_path_factory.mktemp("jit") / "net.pt"
    torch.jit.save(torch.jit.script(net), str(path), _extra_files={"config.json": b'{"layers": 1}'})
    return path


def _ids() -> torch.Tensor:
    return torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("form", ["str", "path", "bytes", "bytesio", "file"])
def test_outputs_equal_torch_jit_load(archive: Path, form: str) -> None:
    expected = torch.jit.load(str(archive))
    f: object = {"str": str(archive), "path": archive, "bytes": archive.read_bytes(), "bytesio": io.BytesIO(archive.read_bytes())}.get(form)
    if form == "file":
        with open(archive, "rb") as handle:
            module = ckptd.jit_load(handle)
    else:
        module = ckptd.jit_load(f)  # type: ignore[arg-type]
    assert torch.equal(module(_ids()), expected(_ids()))
    assert module.code == expected.code


def test_extra_files_are_filled(archive: Path) -> None:
    extra = {"config.json": ""}
    ckptd.jit_load(archive, _extra_files=extra)
    assert extra["config.json"] == b'{"layers": 1}'


def test_parameters_and_buffers_live_in_one_arena(archive: Path) -> None:
    module = ckptd.jit_load(archive, map_location="cpu")
    expected = torch.jit.load(str(archive), map_location="cpu")
    ours = dict(module.state_dict(keep_vars=True))
    theirs = expected.state_dict()
    assert list(ours) == list(theirs) and "alias.proj.weight" in ours
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    pointers = sorted(t.untyped_storage().data_ptr() for t in ours.values())
    total = sum(t.untyped_storage().nbytes() for t in ours.values())
    assert pointers[-1] - pointers[0] < total + 64 * len(pointers)  # one contiguous arena
    assert ours["block.proj.weight"].data_ptr() == ours["alias.proj.weight"].data_ptr()


def test_torch_load_of_an_archive_dispatches_like_torch(archive: Path) -> None:
    with pytest.warns(UserWarning, match="TorchScript archive"), pytest.raises(RuntimeError) as theirs:
        torch.load(archive)
    with pytest.warns(UserWarning, match="TorchScript archive"), pytest.raises(ckptd.UsageError) as ours:
        ckptd.load(archive)
    assert str(ours.value) == str(theirs.value)
    with pytest.warns(UserWarning, match="TorchScript archive"):
        module = ckptd.load(archive, weights_only=False)
    assert torch.equal(module(_ids()), torch.jit.load(str(archive))(_ids()))


def test_jit_load_of_a_plain_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save({"w": torch.ones(1)}, path)
    with pytest.raises(ckptd.CheckpointError, match="not a TorchScript archive"):
        ckptd.jit_load(path)
