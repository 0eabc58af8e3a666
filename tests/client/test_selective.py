"""Selective loading: tensor_name / prefix / select give exactly torch.load's entries.

Each selected tensor is compared with ``assert_same`` against the matching entry of
torch.load's full result (so dtype, strides, offsets, storage size and sharing between
selected views all match), for the zip and legacy formats; the byte-count test proves that
only the selected storages are read from disk.
"""

from __future__ import annotations

import io
import os
import threading
import warnings

import pytest
import torch
import torch.nn as nn

from ckptd_testlib import assert_same, save_bytes

pytestmark = pytest.mark.usefixtures("ckptd_mod")


def _selective_obj():
    g = torch.Generator().manual_seed(21)
    d: dict = {}
    for i in range(5):
        d[f"layers.{i}.q.weight"] = torch.randn(4, 4, generator=g)
        d[f"layers.{i}.q.bias"] = torch.randn(4, generator=g)
    d["layers.30.x"] = torch.ones(2)  # starts with "layers.3" but not with "layers.3."
    base = torch.arange(40.0).reshape(8, 5)
    d["shared.a"] = base
    d["shared.b"] = base[2:, 1:]  # a view into the same storage, at an offset
    d["shared.c"] = base.t()
    d["model"] = {"w": torch.randn(3, 2, generator=g), "sub": {"b": torch.zeros(3, dtype=torch.int64)}}
    d["state"] = {0: {"exp_avg": torch.randn(2, generator=g), "step": torch.tensor(3.0)}, 1: {"exp_avg": torch.ones(5)}}
    d["groups"] = [torch.arange(3), {"x": torch.tensor(True)}]
    d["param"] = nn.Parameter(torch.randn(2, 2, generator=g))
    d["half"] = torch.randn(6, generator=g).to(torch.bfloat16)
    d["scalar"] = torch.tensor(2.5)
    d["empty"] = torch.empty(0, 3)
    d["epoch"] = 5
    return d


def _quantized_obj():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(22))
        return {
            "w": torch.ones(2),
            "quant": torch.quantize_per_tensor(x, 0.1, 2, torch.quint8),
            "qc": torch.quantize_per_channel(x, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), torch.tensor([0, 1, 2]), 0, torch.qint8),
            "v": torch.zeros(3),
        }


# name -> how to reach it in torch.load's full result
NAMES = {
    "layers.0.q.weight": lambda o: o["layers.0.q.weight"],
    "layers.4.q.bias": lambda o: o["layers.4.q.bias"],
    "layers.30.x": lambda o: o["layers.30.x"],
    "shared.a": lambda o: o["shared.a"],
    "shared.b": lambda o: o["shared.b"],
    "shared.c": lambda o: o["shared.c"],
    "model.w": lambda o: o["model"]["w"],
    "model.sub.b": lambda o: o["model"]["sub"]["b"],
    "state.0.exp_avg": lambda o: o["state"][0]["exp_avg"],
    "state.0.step": lambda o: o["state"][0]["step"],
    "state.1.exp_avg": lambda o: o["state"][1]["exp_avg"],
    "groups.0": lambda o: o["groups"][0],
    "groups.1.x": lambda o: o["groups"][1]["x"],
    "param": lambda o: o["param"],
    "half": lambda o: o["half"],
    "scalar": lambda o: o["scalar"],
    "empty": lambda o: o["empty"],
}


def _expected(full, name):
    return NAMES[name](full) if name in NAMES else full[name]


@pytest.fixture(scope="module", params=["zip", "legacy"])
def ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("selective") / f"sel.{request.param}.pt"
    path.write_bytes(save_bytes(_selective_obj(), request.param))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation on the quantized entry
        full = torch.load(path)
    return path, full


def _load(ckptd, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation (quantized)
        return ckptd.load(*args, **kwargs)


@pytest.mark.parametrize("name", list(NAMES))
def test_tensor_name(ckptd_mod, ckpt, name):
    path, full = ckpt
    assert_same(NAMES[name](full), _load(ckptd_mod, path, tensor_name=name))


@pytest.mark.parametrize("form", ["str", "bytes", "bytesio", "file"])
def test_tensor_name_input_forms(ckptd_mod, ckpt, form):
    path, full = ckpt
    if form == "str":
        got = _load(ckptd_mod, str(path), tensor_name="shared.b")
    elif form == "bytes":
        got = _load(ckptd_mod, path.read_bytes(), tensor_name="shared.b")
    elif form == "bytesio":
        got = _load(ckptd_mod, io.BytesIO(path.read_bytes()), tensor_name="shared.b")
    else:
        with open(path, "rb") as f:
            got = _load(ckptd_mod, f, tensor_name="shared.b")
    assert_same(full["shared.b"], got)


def _check_select(full, got: dict, names: list[str]) -> None:
    assert isinstance(got, dict)
    assert sorted(got) == sorted(names), f"selected {sorted(got)}, wanted {sorted(names)}"
    # Same order as ckptd chose, so assert_same also compares sharing between selected views.
    assert_same({n: _expected(full, n) for n in got}, got)


@pytest.mark.parametrize(
    "names",
    [
        ["layers.2.q.weight"],
        ["shared.a", "shared.b", "shared.c"],
        ["shared.b", "model.sub.b", "state.1.exp_avg", "groups.0", "param"],
        ["layers.1.q.bias", "layers.0.q.weight"],
        list(NAMES),
    ],
    ids=["one", "shared", "mixed", "reverse-order", "all"],
)
def test_select_list(ckptd_mod, ckpt, names):
    path, full = ckpt
    _check_select(full, _load(ckptd_mod, path, select=names), names)


@pytest.mark.parametrize(
    ("start", "names"),
    [
        ("layers.3.", ["layers.3.q.weight", "layers.3.q.bias"]),
        ("shared.", ["shared.a", "shared.b", "shared.c"]),
        ("state.0.", ["state.0.exp_avg", "state.0.step"]),
        ("model.", ["model.w", "model.sub.b"]),
    ],
)
def test_select_name_start(ckptd_mod, ckpt, start, names):
    path, full = ckpt
    _check_select(full, _load(ckptd_mod, path, select=start), names)


def test_prefix_missing_in_file(ckptd_mod, ckpt):
    """The request carries a module prefix the saved names lack."""
    path, full = ckpt
    got = _load(ckptd_mod, path, tensor_name="model.layers.0.q.weight", prefix="model")
    assert_same(full["layers.0.q.weight"], got)


def test_prefix_present_in_file(ckptd_mod, ckpt):
    """The saved names carry the prefix (nested dict 'model': {...}) the request lacks."""
    path, full = ckpt
    assert_same(full["model"]["w"], _load(ckptd_mod, path, tensor_name="w", prefix="model"))
    assert_same(full["model"]["sub"]["b"], _load(ckptd_mod, path, tensor_name="sub.b", prefix="model"))


def test_prefix_flat_keys_with_prefix(ckptd_mod, tmp_path):
    """Saved flat keys 'model.layers.0.q.weight', requested without the prefix."""
    obj = {"model.layers.0.q.weight": torch.randn(2, 2), "model.layers.0.q.bias": torch.ones(2)}
    path = tmp_path / "flat.pt"
    torch.save(obj, path)
    full = torch.load(path)
    got = ckptd_mod.load(path, tensor_name="layers.0.q.weight", prefix="model")
    assert_same(full["model.layers.0.q.weight"], got)
    # And the exact name still works with a prefix given.
    got = ckptd_mod.load(path, tensor_name="model.layers.0.q.bias", prefix="model")
    assert_same(full["model.layers.0.q.bias"], got)


def test_prefix_with_select(ckptd_mod, ckpt):
    path, full = ckpt
    got = _load(ckptd_mod, path, select=["model.layers.1.q.bias"], prefix="model")
    assert len(got) == 1
    (value,) = got.values()
    assert_same(full["layers.1.q.bias"], value)


@pytest.mark.parametrize("variant", ["zip", "legacy"])
@pytest.mark.parametrize(
    "request_",
    [{"tensor_name": "w"}, {"tensor_name": "quant"}, {"tensor_name": "qc"}, {"select": ["quant", "v"]}, {"select": "q"}],
    ids=["plain-beside-quantized", "quantized", "per-channel", "select-list", "select-start"],
)
def test_selective_with_quantized_entries(ckptd_mod, tmp_path, variant, request_):
    path = tmp_path / "q.pt"
    path.write_bytes(save_bytes(_quantized_obj(), variant))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = torch.load(path)
    got = _load(ckptd_mod, path, **request_)
    if "tensor_name" in request_:
        assert_same(full[request_["tensor_name"]], got)
    else:
        assert_same({k: full[k] for k in got}, got)
        assert sorted(got) == sorted(["quant", "v"] if isinstance(request_["select"], list) else ["quant", "qc"])


def test_missing_name_lists_near_matches(ckptd_mod, ckpt):
    path, _ = ckpt
    with pytest.raises(ckptd_mod.TensorNotFoundError) as exc:
        _load(ckptd_mod, path, tensor_name="layers.0.q.weigth")
    assert isinstance(exc.value, LookupError)
    assert isinstance(exc.value, ckptd_mod.CkptdError)
    assert "layers.0.q.weight" in str(exc.value)


def test_missing_name_in_select(ckptd_mod, ckpt):
    path, _ = ckpt
    with pytest.raises(ckptd_mod.TensorNotFoundError) as exc:
        _load(ckptd_mod, path, select=["layers.0.q.weight", "model.ww"])
    assert "model.w" in str(exc.value)


def test_missing_name_start(ckptd_mod, ckpt):
    path, _ = ckpt
    with pytest.raises(ckptd_mod.TensorNotFoundError):
        _load(ckptd_mod, path, select="nope.")


def test_missing_name_with_prefix(ckptd_mod, ckpt):
    path, _ = ckpt
    with pytest.raises(LookupError):
        _load(ckptd_mod, path, tensor_name="model.layers.9.q.weight", prefix="model")


# ---------------------------------------------------------------------------------------
# Only the selected storages are read
# ---------------------------------------------------------------------------------------

N_TENSORS = 200
TENSOR_BYTES = 1 << 20


@pytest.fixture(scope="module")
def big_ckpt(tmp_path_factory):
    obj = {f"layers.{i}.w": torch.full((TENSOR_BYTES // 4,), float(i)) for i in range(N_TENSORS)}
    path = tmp_path_factory.mktemp("big") / "big.pt"
    torch.save(obj, path)
    import zipfile

    with zipfile.ZipFile(path) as z:
        pkl = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    return path, pkl.file_size


class _ReadSpy:
    """Counts bytes read through os.pread/os.preadv/os.sendfile from one file (by device and inode)."""

    def __init__(self, path, monkeypatch) -> None:
        st = os.stat(path)
        self.ident = (st.st_dev, st.st_ino)
        self.bytes = 0
        self.calls = 0
        self._lock = threading.Lock()
        real_pread, real_preadv, real_sendfile = os.pread, os.preadv, os.sendfile

        def pread(fd, n, offset):
            data = real_pread(fd, n, offset)
            self._note(fd, len(data))
            return data

        def preadv(fd, buffers, offset, *flags):
            n = real_preadv(fd, buffers, offset, *flags)
            self._note(fd, n)
            return n

        def sendfile(out_fd, in_fd, offset, count, *args):
            n = real_sendfile(out_fd, in_fd, offset, count, *args)
            self._note(in_fd, n)
            return n

        monkeypatch.setattr(os, "pread", pread)
        monkeypatch.setattr(os, "preadv", preadv)
        monkeypatch.setattr(os, "sendfile", sendfile)

    def _note(self, fd: int, n: int) -> None:
        try:
            st = os.fstat(fd)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self.ident:
            with self._lock:
                self.bytes += n
                self.calls += 1


@pytest.mark.slow
@pytest.mark.parametrize("how", ["tensor_name", "select_list", "select_start"])
def test_selective_reads_only_selected_storage(ckptd_mod, big_ckpt, monkeypatch, how):
    path, pickle_bytes = big_ckpt
    spy = _ReadSpy(path, monkeypatch)
    if how == "tensor_name":
        got = ckptd_mod.load(path, tensor_name="layers.123.w")
    elif how == "select_list":
        got = ckptd_mod.load(path, select=["layers.123.w"])["layers.123.w"]
    else:
        got = ckptd_mod.load(path, select="layers.123.")["layers.123.w"]
    monkeypatch.undo()
    assert torch.equal(got, torch.full((TENSOR_BYTES // 4,), 123.0))
    assert spy.calls, "no os.pread/os.preadv/os.sendfile reads of the checkpoint were seen: is the spy bypassed?"
    assert spy.bytes >= TENSOR_BYTES, f"only {spy.bytes} bytes seen read: storage read some other way?"
    limit = 2 * TENSOR_BYTES + pickle_bytes + 64 * 1024
    assert spy.bytes < limit, f"read {spy.bytes} bytes for one {TENSOR_BYTES}-byte tensor (limit {limit})"


@pytest.mark.slow
def test_full_load_reads_everything_once(ckptd_mod, big_ckpt, monkeypatch):
    """Calibrates the spy: a full load reads every storage, and not much more than once."""
    path, _ = big_ckpt
    spy = _ReadSpy(path, monkeypatch)
    got = ckptd_mod.load(path)
    monkeypatch.undo()
    assert len(got) == N_TENSORS
    assert torch.equal(got["layers.7.w"], torch.full((TENSOR_BYTES // 4,), 7.0))
    total = N_TENSORS * TENSOR_BYTES
    assert total <= spy.bytes < total * 1.1 + (1 << 20), f"read {spy.bytes} bytes for {total} bytes of storages"
