"""Bad input: every broken, foreign or hostile file is a CkptdError naming the file.

Never a bare KeyError / struct.error / zipfile.BadZipFile / EOFError, and a hostile pickle
is refused under weights_only without running anything (nor does scanning it run anything).
"""

from __future__ import annotations

import io
import os
import pickle
import random
import warnings

import pytest
import torch

from ckptd_testlib import Pwn, rewrite_zip

pytestmark = pytest.mark.usefixtures("ckptd_mod")


def _expect_checkpoint_error(ckptd, path, **kwargs):
    """ckptd.load(path) raises a CheckpointError naming the file; returns the exception."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ckptd.CkptdError) as exc:
            ckptd.load(path, **kwargs)
    assert isinstance(exc.value, ckptd.CheckpointError), repr(exc.value)
    assert os.path.basename(str(path)) in str(exc.value), f"message does not name the file: {exc.value}"
    return exc.value


def _torch_fails(path, **kwargs) -> BaseException:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BaseException) as exc:  # noqa: PT011 - torch raises all sorts
            torch.load(path, **kwargs)
    return exc.value


@pytest.fixture
def good_zip(saved):
    return saved("views_and_ties", "zip").read_bytes()


@pytest.fixture
def good_legacy(saved):
    return saved("views_and_ties", "legacy").read_bytes()


def _write(tmp_path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


# ---------------------------------------------------------------------------------------
# Garbage, foreign, truncated
# ---------------------------------------------------------------------------------------


def test_empty_file(ckptd_mod, tmp_path):
    p = _write(tmp_path, "empty.pt", b"")
    _torch_fails(p)
    _expect_checkpoint_error(ckptd_mod, p)


@pytest.mark.parametrize("size", [1, 7, 64, 4096, 100_000])
def test_random_garbage(ckptd_mod, tmp_path, size):
    data = random.Random(size).randbytes(size)
    p = _write(tmp_path, f"garbage{size}.pt", data)
    _torch_fails(p)
    _expect_checkpoint_error(ckptd_mod, p)


def test_garbage_bytes_input(ckptd_mod):
    with pytest.raises(ckptd_mod.CheckpointError):
        ckptd_mod.load(random.Random(1).randbytes(1000))
    with pytest.raises(ckptd_mod.CheckpointError):
        ckptd_mod.load(io.BytesIO(b""))


def test_text_file(ckptd_mod, tmp_path):
    p = _write(tmp_path, "notes.txt", b"this is not a checkpoint\n" * 50)
    _torch_fails(p)
    _expect_checkpoint_error(ckptd_mod, p)


def test_zip_magic_then_garbage(ckptd_mod, tmp_path):
    p = _write(tmp_path, "pkjunk.pt", b"PK\x03\x04" + random.Random(2).randbytes(500))
    _torch_fails(p)
    _expect_checkpoint_error(ckptd_mod, p)


def test_other_zip_archive(ckptd_mod, tmp_path):
    import zipfile

    p = tmp_path / "other.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "hello")
        z.writestr("dir/data.bin", b"\x00" * 100)
    _torch_fails(p)
    _expect_checkpoint_error(ckptd_mod, p)


@pytest.mark.parametrize("cut", [4, 30, 100, 0.25, 0.5, 0.9, -200, -100, -22, -1])
def test_truncated_zip(ckptd_mod, tmp_path, good_zip, cut):
    n = int(len(good_zip) * cut) if isinstance(cut, float) else (cut if cut > 0 else len(good_zip) + cut)
    p = _write(tmp_path, f"trunc{n}.pt", good_zip[:n])
    _torch_fails(p)
    _expect_checkpoint_error(ckptd_mod, p)


@pytest.mark.parametrize("cut", [1, 10, 0.3, 0.6, 0.95, -1])
def test_truncated_legacy(ckptd_mod, tmp_path, good_legacy, cut):
    n = int(len(good_legacy) * cut) if isinstance(cut, float) else (cut if cut > 0 else len(good_legacy) + cut)
    p = _write(tmp_path, f"legtrunc{n}.pt", good_legacy[:n])
    _torch_fails(p)
    _expect_checkpoint_error(ckptd_mod, p)


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_truncated_selective(ckptd_mod, tmp_path, saved, kind):
    """A selective load of a truncated file fails as cleanly as a full one."""
    data = saved("many_small", kind).read_bytes()
    p = _write(tmp_path, f"sel_trunc.{kind}.pt", data[: len(data) * 3 // 4])
    with pytest.raises(ckptd_mod.CkptdError) as exc:
        ckptd_mod.load(p, tensor_name="layers.299.w")
    assert p.name in str(exc.value)


def test_zip_without_data_pkl(ckptd_mod, tmp_path, good_zip):
    p = _write(tmp_path, "nopkl.pt", rewrite_zip(good_zip, lambda n, d: None if n == "data.pkl" else d))
    _torch_fails(p)
    _expect_checkpoint_error(ckptd_mod, p)


def test_zip_missing_storage_record(ckptd_mod, tmp_path, good_zip):
    p = _write(tmp_path, "nostorage.pt", rewrite_zip(good_zip, lambda n, d: None if n == "data/0" else d))
    _torch_fails(p)
    _expect_checkpoint_error(ckptd_mod, p)


@pytest.mark.parametrize("keep", [0, 0.5, -1])
def test_zip_storage_record_shorter_than_pickle_says(ckptd_mod, tmp_path, good_zip, keep):
    def shorten(name, data):
        if name == "data/0":
            return data[: int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)]
        return data

    p = _write(tmp_path, "short.pt", rewrite_zip(good_zip, shorten))
    _torch_fails(p)
    _expect_checkpoint_error(ckptd_mod, p)


def test_zip_storage_record_shorter_selective(ckptd_mod, tmp_path, saved):
    good = saved("plain_dict", "zip").read_bytes()
    p = _write(tmp_path, "short_sel.pt", rewrite_zip(good, lambda n, d: d[:-4] if n.startswith("data/") else d))
    with pytest.raises(ckptd_mod.CheckpointError) as exc:
        ckptd_mod.load(p, tensor_name="weight")
    assert p.name in str(exc.value)


def test_zip_garbage_pickle(ckptd_mod, tmp_path, good_zip):
    p = _write(tmp_path, "badpkl.pt", rewrite_zip(good_zip, lambda n, d: b"\x80\x02garbage" if n == "data.pkl" else d))
    _torch_fails(p)
    with pytest.raises(ckptd_mod.CkptdError) as exc:
        ckptd_mod.load(p)
    assert "badpkl.pt" in str(exc.value) or isinstance(exc.value, pickle.UnpicklingError), repr(exc.value)


def test_zip_bad_byteorder(ckptd_mod, tmp_path, good_zip):
    p = _write(tmp_path, "middle.pt", rewrite_zip(good_zip, lambda n, d: b"middle" if n == "byteorder" else d))
    _torch_fails(p)
    _expect_checkpoint_error(ckptd_mod, p)


def test_legacy_bad_magic(ckptd_mod, tmp_path):
    p = _write(tmp_path, "magic.pt", pickle.dumps(123456789, protocol=2) + b"\x00" * 64)
    _torch_fails(p)
    _expect_checkpoint_error(ckptd_mod, p)


def test_plain_pickle_of_a_dict(ckptd_mod, tmp_path):
    """A plain pickle (not torch.save) is not a checkpoint for torch either."""
    p = _write(tmp_path, "plain.pkl", pickle.dumps({"a": 1}, protocol=2))
    _torch_fails(p)
    _expect_checkpoint_error(ckptd_mod, p)


def test_directory(ckptd_mod, tmp_path):
    d = tmp_path / "a_directory"
    d.mkdir()
    _torch_fails(d)
    err = _expect_checkpoint_error(ckptd_mod, d)
    assert not isinstance(err, ckptd_mod.CheckpointNotFoundError)


@pytest.mark.parametrize("as_str", [True, False])
def test_missing_path(ckptd_mod, tmp_path, as_str):
    p = tmp_path / "does_not_exist.pt"
    missing = str(p) if as_str else p
    assert isinstance(_torch_fails(missing), FileNotFoundError)
    err = _expect_checkpoint_error(ckptd_mod, missing)
    assert isinstance(err, ckptd_mod.CheckpointNotFoundError)
    assert isinstance(err, FileNotFoundError)


def test_missing_path_selective(ckptd_mod, tmp_path):
    with pytest.raises(ckptd_mod.CheckpointNotFoundError):
        ckptd_mod.load(tmp_path / "nope.pt", tensor_name="w")


# ---------------------------------------------------------------------------------------
# Hostile pickles
# ---------------------------------------------------------------------------------------


def _hostile_files(tmp_path):
    marker = tmp_path / "pwned"
    cmd = f"echo pwned > {marker}"
    files = {}
    # 1. a raw pickle whose first object calls os.system (the legacy reader's first load)
    files["raw"] = _write(tmp_path, "raw_hostile.pt", pickle.dumps(Pwn(cmd), protocol=2))
    # 2. a torch.save zip whose data.pkl calls os.system (saving only pickles the reduce)
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2), "evil": Pwn(cmd)}, buf)
    files["zip"] = _write(tmp_path, "zip_hostile.pt", buf.getvalue())
    # 3. the same in the legacy format
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2), "evil": Pwn(cmd)}, buf, _use_new_zipfile_serialization=False)
    files["legacy"] = _write(tmp_path, "legacy_hostile.pt", buf.getvalue())
    # 4. a legacy file whose magic-number pickle itself is hostile
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf, _use_new_zipfile_serialization=False)
    files["legacy_header"] = _write(tmp_path, "legacy_header_hostile.pt", pickle.dumps(Pwn(cmd), protocol=2) + buf.getvalue())
    assert not marker.exists()
    return files, marker


@pytest.mark.parametrize("kind", ["raw", "zip", "legacy", "legacy_header"])
@pytest.mark.parametrize("weights_only", [True, None])
@pytest.mark.parametrize("form", ["path", "bytes"])
def test_hostile_pickle_refused(ckptd_mod, tmp_path, kind, weights_only, form):
    files, marker = _hostile_files(tmp_path)
    path = files[kind]
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not marker.exists()
    f = path if form == "path" else path.read_bytes()
    with pytest.raises(ckptd_mod.CkptdError) as exc:
        ckptd_mod.load(f, weights_only=weights_only)
    assert isinstance(exc.value, ckptd_mod.UnpicklingError), repr(exc.value)
    assert isinstance(exc.value, pickle.UnpicklingError)
    assert not marker.exists(), "ckptd.load executed the hostile pickle"


@pytest.mark.parametrize("kind", ["raw", "zip", "legacy", "legacy_header"])
def test_hostile_pickle_selective_refused(ckptd_mod, tmp_path, kind):
    files, marker = _hostile_files(tmp_path)
    with pytest.raises(ckptd_mod.CkptdError):
        ckptd_mod.load(files[kind], tensor_name="w")
    assert not marker.exists(), "a selective ckptd.load executed the hostile pickle"


@pytest.mark.parametrize("kind", ["raw", "zip", "legacy", "legacy_header"])
def test_hostile_pickle_inspect_runs_nothing(ckptd_mod, tmp_path, kind):
    if not hasattr(ckptd_mod, "inspect"):
        pytest.skip("no ckptd.inspect")
    files, marker = _hostile_files(tmp_path)
    try:
        ckptd_mod.inspect(files[kind])
    except ckptd_mod.CkptdError:
        pass
    assert not marker.exists(), "ckptd.inspect executed the hostile pickle"


@pytest.mark.parametrize("name", ["views_and_ties", "quantized", "whole_module", "tensor_subclass", "custom_object"])
@pytest.mark.parametrize("variant", ["zip", "legacy"])
def test_inspect_runs_no_code_on_good_files(ckptd_mod, saved, name, variant, monkeypatch):
    """Scanning never builds user objects: no module __setstate__, no subclass rebuild."""
    if not hasattr(ckptd_mod, "inspect"):
        pytest.skip("no ckptd.inspect")
    path = saved(name, variant)  # saved before the patches below (torch.save uses them)

    def boom(*a, **k):
        raise AssertionError("inspect ran object-building code from the pickle")

    monkeypatch.setattr(torch.nn.Module, "__setstate__", boom)
    monkeypatch.setattr(torch._tensor, "_rebuild_from_type_v2", boom)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ckptd_mod.inspect(path)
        except ckptd_mod.CkptdError:
            pass


def test_hostile_with_weights_only_false_is_torchs_contract(tmp_path):
    """Sanity: the hostile files really are hostile (torch runs them with weights_only=False).

    Only checked on torch, and only for the raw pickle, so the suite proves its fixture bites.
    """
    files, marker = _hostile_files(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception):  # noqa: B017,PT011 - os.system returns an int, torch then chokes
            torch.load(files["raw"], weights_only=False)
    assert marker.exists()


def test_checkpoint_error_hierarchy(ckptd_mod):
    assert issubclass(ckptd_mod.CheckpointError, ckptd_mod.CkptdError)
    assert issubclass(ckptd_mod.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(ckptd_mod.NotSeekableError, io.UnsupportedOperation)
    assert issubclass(ckptd_mod.TensorNotFoundError, LookupError)
    assert issubclass(ckptd_mod.UnpicklingError, pickle.UnpicklingError)
    assert issubclass(ckptd_mod.DeviceError, RuntimeError)
    for name in ("CheckpointError", "CheckpointNotFoundError", "NotSeekableError", "TensorNotFoundError", "UnpicklingError", "DeviceError"):
        assert issubclass(getattr(ckptd_mod, name), ckptd_mod.CkptdError), name
