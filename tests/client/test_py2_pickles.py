"""Python 2-era checkpoints: OrderedDicts built by REDUCE from ``[key, value]`` pairs.

Python 2's pickler wrote an OrderedDict as ``REDUCE(OrderedDict, ([[k, v], ...],))`` with
its ``_metadata`` as BUILD state, and ``str`` keys as byte strings (SHORT_BINSTRING); the
weights shipped inside packages such as ``lpips`` look like that. The files here are
written the same way (torch.save with such a pickler, strings rewritten to Python 2's
opcode), loaded with torch.load for reference, and must give ckptd the same object and
every tensor name: ``inspect`` lists them, ``tensor_name=`` and ``select=`` find them.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ckptd
import ckptd.engine._load
from ckptd.engine._rebuild import rebuild_plain
from ckptd._cli import main
from ckptd.formats._pickle_scan import Call, scan
from ckptd_testlib import assert_same, rewrite_zip


class _Py2Pickler(pickle.Pickler):
    """Pickles OrderedDicts the way Python 2 did: a list of [key, value] pairs through REDUCE."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is collections.OrderedDict:
            return collections.OrderedDict, ([[k, v] for k, v in obj.items()],), vars(obj) or None
        return NotImplemented


class _Py2PickleModule:
    """The part of a pickle module torch.save uses."""

    Pickler = _Py2Pickler

    @staticmethod
    def dump(obj: Any, f: Any, protocol: int = 2) -> None:
        _Py2Pickler(f, protocol=protocol).dump(obj)


def _py2_strings(data: bytes, start: int = 0) -> tuple[bytes, int]:
    """The pickle at ``data[start:]`` with short ASCII strings as Python 2's SHORT_BINSTRING; and its end."""
    out = bytearray()
    ops = list(pickletools.genops(io.BytesIO(data[start:])))
    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else pos + 1
        if op.name == "BINUNICODE" and arg.isascii() and len(arg) < 256:
            out += b"U" + bytes([len(arg)]) + arg.encode("ascii")
        else:
            out += data[start + pos : start + end]
    return bytes(out), start + ops[-1][2] + 1


def py2_checkpoint(obj: Any, variant: str) -> bytes:
    """``obj`` saved as a Python 2-era torch would have pickled it (``zip`` or ``legacy``)."""
    buf = io.BytesIO()
    torch.save(obj, buf, pickle_module=_Py2PickleModule, _use_new_zipfile_serialization=variant == "zip")
    raw = buf.getvalue()
    if variant == "zip":
        return rewrite_zip(raw, lambda name, data: _py2_strings(data)[0] if name == "data.pkl" else data)
    pieces, pos = [], 0
    for _ in range(5):  # magic, protocol, sys info, the object, the storage keys; then raw storages
        piece, pos = _py2_strings(raw, pos)
        pieces.append(piece)
    return b"".join(pieces) + raw[pos:]


def _state() -> collections.OrderedDict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(collections.OrderedDict([("conv", nn.Conv2d(3, 4, 1)), ("norm", nn.BatchNorm2d(4))]))
    return net.state_dict()


@pytest.fixture(params=["zip", "legacy"])
def py2_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / f"py2.{request.param}.pt"
    path.write_bytes(py2_checkpoint(_state(), request.param))
    return path


def test_the_file_is_written_the_python_2_way(py2_file: Path) -> None:
    layout = ckptd.inspect(py2_file)
    ops = [op.name for op, _, _ in pickletools.genops(io.BytesIO(layout.pickle))]
    assert "SHORT_BINSTRING" in ops and "BINUNICODE" not in ops
    root = scan(layout.pickle, "py2").root  # OrderedDict([[k, v], ...]): no SETITEM(S) on it
    assert isinstance(root, Call) and root.func.qualname == "collections.OrderedDict"
    assert root.items == [] and [pair[0] for pair in root.args[0]] == list(_state())
    loaded = torch.load(py2_file, weights_only=True)
    assert type(loaded) is collections.OrderedDict and list(loaded) == list(_state())
    assert loaded._metadata == _state()._metadata


@pytest.mark.parametrize("weights_only", [True, False])
def test_loads_as_torch_does(py2_file: Path, weights_only: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[bool] = []

    def spy(*args: Any) -> Any:
        built = rebuild_plain(*args)
        taken.append(built is not None)
        return built

    monkeypatch.setattr(ckptd.engine._load, "rebuild_plain", spy)
    assert_same(torch.load(py2_file, weights_only=weights_only), ckptd.load(py2_file, weights_only=weights_only))
    # the plain rebuild makes OrderedDict([[k, v], ...]) itself (zip files; legacy ones go to torch)
    assert taken == [py2_file.name == "py2.zip.pt"]


def test_scan_names_every_tensor(py2_file: Path) -> None:
    layout = ckptd.inspect(py2_file)
    expected = torch.load(py2_file, weights_only=True)
    assert [entry.name for entry in layout.tensors] == list(expected)
    for entry in layout.tensors:
        tensor = expected[entry.name]
        assert (entry.dtype, entry.shape, entry.stride) == (tensor.dtype, tuple(tensor.shape), tensor.stride())


def test_inspect_lists_the_tensors(py2_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(py2_file)]) == 0
    out = capsys.readouterr().out
    assert "no tensors" not in out
    for name in _state():
        assert name in out


def test_tensor_name_and_select(py2_file: Path) -> None:
    expected = torch.load(py2_file, weights_only=True)
    assert torch.equal(ckptd.load(py2_file, tensor_name="conv.weight"), expected["conv.weight"])
    assert torch.equal(ckptd.load(py2_file, tensor_name="weight", prefix="norm"), expected["norm.weight"])
    picked = ckptd.load(py2_file, select=["norm.running_mean", "conv.bias"])
    assert list(picked) == ["norm.running_mean", "conv.bias"]
    assert all(torch.equal(picked[name], expected[name]) for name in picked)
    assert list(ckptd.load(py2_file, select="norm.")) == [name for name in expected if name.startswith("norm.")]


def test_nested_pairs_and_plain_dicts(tmp_path: Path) -> None:
    """Pairs inside pairs, a plain dict around them: every level is named."""
    inner = collections.OrderedDict([("w", torch.ones(2)), ("deep", collections.OrderedDict([("b", torch.zeros(3))]))])
    obj = {"model": inner, "epoch": 3}
    path = tmp_path / "nested.pt"
    path.write_bytes(py2_checkpoint(obj, "legacy"))
    names = [entry.name for entry in ckptd.inspect(path).tensors]
    assert names == ["model.w", "model.deep.b"]
    assert_same(torch.load(path, weights_only=True), ckptd.load(path))
    assert torch.equal(ckptd.load(path, tensor_name="model.deep.b"), torch.zeros(3))
