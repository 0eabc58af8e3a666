"""Shared helpers for the ckptd conformance suite.

This is a plain module (not a conftest) so that pickle can find the classes defined here
by their qualified name (``ckptd_testlib.TaggedTensor`` ...) when a checkpoint that holds
them is loaded; ``tests/`` is on ``sys.path`` because ``tests/conftest.py`` lives there.

Contents:

* :func:`assert_same` -- strict deep comparison of two loaded objects (torch's vs ckptd's).
* :data:`CORPUS` -- named checkpoint builders; each returns an object to ``torch.save``.
* :func:`save_variant` -- writes an object in one of the save variants (zip, legacy,
  zip without crc32, big-endian zip).
* :func:`start_daemon` -- a real ``ckptd serve`` subprocess for the daemon tests, with
  :func:`wait_for`, :func:`report_of` and :func:`cached_entry` to watch it and its clients.
* :func:`saved_as` -- ``torch.save`` writes a location tag this machine cannot save from (``cuda:1``).
* :func:`load_both` -- runs ``torch.load`` and ``ckptd.load`` on the same input and arguments,
  recording warnings and exceptions of each.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import math
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

# ---------------------------------------------------------------------------------------
# Module-level classes pickle must be able to find.
# ---------------------------------------------------------------------------------------


class TaggedTensor(torch.Tensor):
    """A tensor subclass carrying python attributes (only loads with weights_only=False)."""


class CustomThing:
    """A plain custom class: fine for weights_only=False, rejected by weights_only=True."""

    def __init__(self, name: str, values: Any) -> None:
        self.name = name
        self.values = values

    def __eq__(self, other: object) -> bool:
        return type(other) is CustomThing and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"CustomThing({self.name!r}, {self.values!r})"


class Pwn:
    """Pickles as a call to ``os.system`` (the hostile-pickle fixture)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class NonSeekable(io.RawIOBase):
    """A minimal readable stream that cannot seek (a pipe, a socket)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, b) -> int:  # type: ignore[override]
        n = min(len(b), len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


# ---------------------------------------------------------------------------------------
# assert_same
# ---------------------------------------------------------------------------------------

_ATOMS = (type(None), bool, int, float, complex, str, bytes, bytearray)


def storage_bytes(storage: torch.UntypedStorage) -> bytes:
    """Every byte of an untyped storage (copied to the CPU first if needed)."""
    if storage.device.type != "cpu":
        storage = storage.cpu()
    if storage.nbytes() == 0:
        return b""
    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy().tobytes()


class _Walk:
    def __init__(self) -> None:
        # id(expected) -> actual object, and the reverse: pickle's memo gives torch.load's
        # result a definite identity structure (tied weights are one tensor object).
        self.fwd: dict[int, Any] = {}
        self.rev: dict[int, Any] = {}
        self.keep: list[Any] = []  # keep ids stable while walking
        self.tensors: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def identity(self, exp: Any, act: Any, path: str) -> bool:
        """Record exp<->act; return True if exp was already seen (and checked)."""
        seen_a = self.fwd.get(id(exp))
        seen_e = self.rev.get(id(act))
        if seen_a is not None:
            assert seen_a is act, (
                f"{path}: torch.load returned the same object here as elsewhere, ckptd did not"
            )
            return True
        assert seen_e is None, (
            f"{path}: ckptd returned one object in two places where torch.load has two"
        )
        self.fwd[id(exp)] = act
        self.rev[id(act)] = exp
        self.keep += [exp, act]
        return False


def _float_same(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def _same_tensor(exp: torch.Tensor, act: torch.Tensor, path: str, w: _Walk) -> None:
    for attr in ("dtype", "shape", "device", "layout", "requires_grad", "is_leaf", "is_quantized"):
        e, a = getattr(exp, attr), getattr(act, attr)
        assert e == a, f"{path}: {attr} {a!r} (ckptd) != {e!r} (torch)"
    assert (exp.grad_fn is None) == (act.grad_fn is None), f"{path}: grad_fn differs"
    if exp.layout == torch.strided:
        assert act.stride() == exp.stride(), f"{path}: stride {act.stride()} != {exp.stride()}"
        assert act.storage_offset() == exp.storage_offset(), (
            f"{path}: storage_offset {act.storage_offset()} != {exp.storage_offset()}"
        )
    es, as_ = exp.untyped_storage(), act.untyped_storage()
    assert as_.nbytes() == es.nbytes(), f"{path}: storage nbytes {as_.nbytes()} != {es.nbytes()}"
    assert as_.device == es.device, f"{path}: storage device {as_.device} != {es.device}"
    eb, ab = storage_bytes(es), storage_bytes(as_)
    if eb != ab:
        first = next(i for i, (x, y) in enumerate(zip(eb, ab)) if x != y)
        raise AssertionError(f"{path}: storage bytes differ (first at byte {first})")
    if exp.is_quantized:
        assert act.qscheme() == exp.qscheme(), f"{path}: qscheme differs"
        if exp.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            assert _float_same(act.q_scale(), exp.q_scale()), f"{path}: q_scale differs"
            assert act.q_zero_point() == exp.q_zero_point(), f"{path}: q_zero_point differs"
        else:
            assert act.q_per_channel_axis() == exp.q_per_channel_axis(), f"{path}: axis differs"
            assert torch.equal(
                act.q_per_channel_scales(), exp.q_per_channel_scales()
            ), f"{path}: per-channel scales differ"
            assert torch.equal(
                act.q_per_channel_zero_points(), exp.q_per_channel_zero_points()
            ), f"{path}: per-channel zero points differ"
        assert torch.equal(act.int_repr(), exp.int_repr()), f"{path}: int_repr differs"
    elif exp.layout == torch.strided and exp.numel() and exp.dtype in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool
    ):
        # Belt and braces on top of the storage bytes: the view's values (NaN-aware).
        assert torch.equal(
            act.detach().reshape(-1).contiguous().view(torch.uint8),
            exp.detach().reshape(-1).contiguous().view(torch.uint8),
        ), f"{path}: values differ"
    w.tensors.append((path, exp, act))
    _same(exp.__dict__, act.__dict__, f"{path}.__dict__", w)
    _same(exp.grad, act.grad, f"{path}.grad", w)


def _same(exp: Any, act: Any, path: str, w: _Walk) -> None:
    assert type(act) is type(exp), (
        f"{path}: type {type(act).__qualname__} (ckptd) is not {type(exp).__qualname__} (torch)"
    )
    if isinstance(exp, _ATOMS):
        if isinstance(exp, float):
            assert _float_same(exp, act), f"{path}: {act!r} != {exp!r}"
        elif isinstance(exp, complex):
            assert _float_same(exp.real, act.real) and _float_same(exp.imag, act.imag), path
        else:
            assert exp == act, f"{path}: {act!r} (ckptd) != {exp!r} (torch)"
        return
    if isinstance(exp, (torch.dtype, torch.device, torch.layout, torch.memory_format, torch.Size)):
        assert exp == act, f"{path}: {act!r} != {exp!r}"
        return
    if w.identity(exp, act, path):
        return
    if isinstance(exp, torch.Tensor):
        _same_tensor(exp, act, path, w)
        return
    if isinstance(exp, dict):
        assert list(act.keys()) == list(exp.keys()), (
            f"{path}: keys {list(act.keys())!r} (ckptd) != {list(exp.keys())!r} (torch)"
        )
        for k in exp:
            _same(exp[k], act[k], f"{path}[{k!r}]", w)
        # dict subclasses' attributes, e.g. state_dict()'s OrderedDict._metadata
        if hasattr(exp, "__dict__") or hasattr(act, "__dict__"):
            _same(getattr(exp, "__dict__", None), getattr(act, "__dict__", None), f"{path}.__dict__", w)
        return
    if isinstance(exp, (list, tuple)):
        assert len(act) == len(exp), f"{path}: length {len(act)} != {len(exp)}"
        for i, (e, a) in enumerate(zip(exp, act)):
            _same(e, a, f"{path}[{i}]", w)
        return
    if isinstance(exp, (set, frozenset)):
        assert exp == act, f"{path}: {act!r} != {exp!r}"
        return
    if isinstance(exp, (torch.UntypedStorage, torch.storage.TypedStorage)):
        assert exp.nbytes() == act.nbytes(), f"{path}: storage nbytes differ"
        eu = exp if isinstance(exp, torch.UntypedStorage) else exp._untyped_storage
        au = act if isinstance(act, torch.UntypedStorage) else act._untyped_storage
        assert storage_bytes(eu) == storage_bytes(au), f"{path}: storage bytes differ"
        return
    if hasattr(exp, "__dict__"):
        _same(vars(exp), vars(act), f"{path}.__dict__", w)
        return
    assert exp == act, f"{path}: {act!r} != {exp!r}"


def _groups(items: list[torch.Tensor]) -> list[int | None]:
    ids: dict[tuple[str, int], int] = {}
    out: list[int | None] = []
    for t in items:
        s = t.untyped_storage()
        if s.nbytes() == 0:
            out.append(None)  # empty storages have no address to share
            continue
        out.append(ids.setdefault((str(s.device), s.data_ptr()), len(ids)))
    return out


def assert_same(expected: Any, actual: Any) -> None:
    """Assert ``actual`` (ckptd.load's result) is object-for-object what ``expected`` (torch's) is.

    Checks exact types, key order, nested containers, non-tensor values, tensor metadata,
    storage bytes, quantization parameters, python attributes of tensors and objects, the
    identity structure (one object in two places stays one object), and the storage-sharing
    structure (tensors share a storage in one result exactly when they do in the other).
    """
    w = _Walk()
    _same(expected, actual, "obj", w)
    ge = _groups([e for _, e, _ in w.tensors])
    ga = _groups([a for _, _, a in w.tensors])
    if ge != ga:
        lines = [f"  {p}: torch group {x}, ckptd group {y}" for (p, _, _), x, y in zip(w.tensors, ge, ga)]
        raise AssertionError("storage sharing differs:\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------

ALL_VARIANTS = ("zip", "legacy", "zip_nocrc", "zip_big")


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[[], Any]
    weights_only_ok: bool = True
    variants: tuple[str, ...] = ALL_VARIANTS


CORPUS: dict[str, Entry] = {}


def corpus(*, weights_only_ok: bool = True, variants: tuple[str, ...] = ALL_VARIANTS):
    def deco(fn: Callable[[], Any]) -> Callable[[], Any]:
        name = fn.__name__
        CORPUS[name] = Entry(name, fn, weights_only_ok, variants)
        return fn

    return deco


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quiet():
    """Builders only: torch warns when creating quantized/complex32 tensors."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


@corpus()
def module_state_dict():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.LayerNorm(2))
    sd = m.state_dict()
    assert hasattr(sd, "_metadata")
    return sd


@corpus()
def plain_dict():
    g = _gen(2)
    return {"weight": torch.randn(3, 4, generator=g), "bias": torch.zeros(4), "step": 7}


@corpus()
def nested_containers():
    g = _gen(3)
    return {
        "model": {"w": torch.randn(2, 3, generator=g), "layers": [torch.ones(2), {"x": torch.arange(5)}]},
        "epoch": 3,
        "lr": 0.125,
        "name": "run-héllo ✓",
        "none": None,
        "blob": b"\x00\xffbytes",
        "tup": (1, "a", torch.tensor([1.5, -2.0]), (None, 2.5)),
        "flag": True,
        "inf": float("inf"),
        "nan": float("nan"),
        "negzero": -0.0,
        "big": 2**70,
        "neg": -12,
        "cplx": 1 + 2j,
        3: "int key",
        "set": {1, 2, 3},
        "empty": {},
        "empty_list": [],
        "od": collections.OrderedDict([("z", torch.tensor(1)), ("a", 2)]),
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "size": torch.Size([2, 3]),
    }


@corpus()
def views_and_ties():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    w = torch.randn(5, 3, generator=_gen(4))
    return {
        "base": base,
        "t": base.t(),
        "slice": base[1:3, 2:],
        "row": base[2],
        "step": base[:, ::2],
        "flat_tail": base.view(-1)[7:],
        "empty_view": base.view(-1)[5:5],
        "expand": torch.arange(3.0).expand(4, 3),
        "enc.weight": w,
        "dec.weight": w,  # the same tensor object twice
        "dec.view": w.view(15),  # another view of the tied storage
        "other": torch.ones(3, dtype=torch.float64),
    }


@corpus()
def parameters():
    g = _gen(5)
    return {
        "p_grad": nn.Parameter(torch.randn(3, generator=g)),
        "p_nograd": nn.Parameter(torch.randn(2, generator=g), requires_grad=False),
        "rg": torch.randn(3, generator=g).requires_grad_(),
        "plain": torch.randn(2, generator=g),
        "p_int": nn.Parameter(torch.arange(4), requires_grad=False),
    }


def _dtype_tensors(dtypes: list[torch.dtype]) -> dict[str, torch.Tensor]:
    g = _gen(6)
    out: dict[str, torch.Tensor] = {}
    raw = torch.randint(0, 256, (64,), dtype=torch.uint8, generator=g)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, 65504.0, -3.5])
    ctx = _quiet()
    try:
        for d in dtypes:
            key = str(d).removeprefix("torch.")
            if key in ("bits8", "bits1x8", "bits2x4", "bits4x2", "float4_e2m1fn_x2"):
                out[key] = raw[:16].clone().view(d)
            elif d.is_floating_point and d.itemsize >= 2:
                out[key] = torch.cat([specials, torch.randn(24, generator=g)]).to(d).reshape(4, 8)
            elif d.is_floating_point:  # float8 and friends
                out[key] = raw[:32].clone().view(d).reshape(4, 8) if "e8m0" in key else torch.randn(32, generator=g).to(d).reshape(4, 8)
            elif d.is_complex:
                out[key] = torch.complex(torch.randn(12, generator=g), torch.randn(12, generator=g)).to(d).reshape(3, 4)
            elif d == torch.bool:
                out[key] = raw[:12].clone() > 127
            elif d in (torch.uint8, torch.int8):
                out[key] = raw[:16].clone().view(d)
            elif key == "bits16":
                out[key] = raw[:16].clone().view(torch.int16).view(d)
            else:  # wide ints: full-range bit patterns
                out[key] = raw.clone().view(d)
    finally:
        ctx.__exit__(None, None, None)
    return out


_LEGACY_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.complex64, torch.complex128, torch.bool,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
]
_EXTRA_DTYPE_NAMES = [
    "complex32", "uint16", "uint32", "uint64",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2",
]
ALL_DTYPES = _LEGACY_DTYPES + [getattr(torch, n) for n in _EXTRA_DTYPE_NAMES if hasattr(torch, n)]


# torch's legacy (non-zip) format cannot load the newer dtypes back (torch itself fails with an
# AttributeError), so the full dtype set is a zip-only entry.
@corpus(variants=("zip", "zip_nocrc", "zip_big"))
def all_dtypes():
    return _dtype_tensors(ALL_DTYPES)


@corpus()
def legacy_dtypes():
    return _dtype_tensors(_LEGACY_DTYPES)


@corpus()
def quantized():
    ctx = _quiet()
    try:
        x = torch.randn(4, 6, generator=_gen(7))
        return {
            "qt_quint8": torch.quantize_per_tensor(x, 0.05, 10, torch.quint8),
            "qt_qint8": torch.quantize_per_tensor(x, 0.1, -3, torch.qint8),
            "qt_qint32": torch.quantize_per_tensor(x, 0.001, 0, torch.qint32),
            "qc_axis0": torch.quantize_per_channel(
                x, torch.tensor([0.1, 0.2, 0.05, 0.3], dtype=torch.float64), torch.tensor([0, 1, 2, 3]), 0, torch.qint8
            ),
            "qc_axis1": torch.quantize_per_channel(
                x, torch.linspace(0.01, 0.06, 6, dtype=torch.float64), torch.arange(6), 1, torch.quint8
            ),
        }
    finally:
        ctx.__exit__(None, None, None)


@corpus()
def zero_dim_and_empty():
    return {
        "s": torch.tensor(3.5),
        "i": torch.tensor(7),
        "b": torch.tensor(True),
        "e0": torch.empty(0),
        "e2": torch.empty(0, 5),
        "e3": torch.zeros(2, 0, 3, dtype=torch.int64),
    }


@corpus()
def memory_formats():
    g = _gen(8)
    return {
        "channels_last": torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
        "transposed": torch.randn(6, 4, generator=g).t(),
        "narrow": torch.randn(10, 10, generator=g)[2:8:2, 1:9:3],
    }


@corpus(weights_only_ok=False)
def tensor_subclass():
    t = torch.arange(6.0).reshape(2, 3).as_subclass(TaggedTensor)
    t.tag = "hello"
    t.meta = {"k": 1, "v": [1, 2]}
    u = torch.ones(2).as_subclass(TaggedTensor)
    return {"tagged": t, "plain_sub": u, "normal": torch.zeros(2)}


@corpus(weights_only_ok=False)
def custom_object():
    return {"cfg": CustomThing("cfg", {"depth": 3, "rate": 0.5}), "w": torch.ones(3), "fs": frozenset({1}), "sl": slice(1, 5, 2)}


@corpus()
def transformer():
    torch.manual_seed(9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but ..."
        m = nn.Transformer(d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64)
    return m.state_dict()


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def _resnet() -> nn.Module:
    torch.manual_seed(10)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        _Block(8), _Block(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
    m.train()
    m(torch.randn(2, 3, 8, 8))  # move the BatchNorm running stats off their defaults
    return m


@corpus()
def resnet_state_dict():
    return _resnet().state_dict()


@corpus()
def adam_state():
    torch.manual_seed(11)
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m(torch.randn(5, 4)).sum().backward()
    opt.step()
    return {"model": m.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}


@corpus(weights_only_ok=False)
def whole_module():
    torch.manual_seed(12)
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.BatchNorm1d(3))
    m.eval()
    return m


@corpus()
def bare_tensor():
    return torch.arange(10, dtype=torch.int32).reshape(2, 5)[:, 1:]


@corpus()
def top_level_list():
    t = torch.ones(3)
    return [t, t[1:], 1, "x", (torch.zeros(2), None)]


@corpus()
def int_keys():
    return {0: torch.ones(2), 1: {2: torch.zeros(3), "a": [torch.tensor(1)]}}


@corpus()
def many_small():
    return {f"layers.{i}.w": torch.full((i % 7 + 1,), float(i)) for i in range(300)}


@corpus()
def big_tensor():
    return {"big": torch.randn(1024, 1024, generator=_gen(13)), "small": torch.ones(3)}


CORE = ("nested_containers", "views_and_ties", "quantized")

# ---------------------------------------------------------------------------------------
# Save variants
# ---------------------------------------------------------------------------------------


class _StorageScan(pickle.Unpickler):
    """Unpickles data.pkl with placeholder storages, noting each storage key's dtype."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.dtypes: dict[str, torch.dtype] = {}

    def find_class(self, module: str, name: str):
        if "Storage" in name:
            try:
                return torch.serialization.StorageType(name)
            except KeyError:
                pass
        return super().find_class(module, name)

    def persistent_load(self, pid):
        _, storage_type, key, _location, numel = pid
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        self.dtypes[key] = dtype
        nbytes = numel * torch._utils._element_size(dtype)
        return torch.storage.TypedStorage(
            wrap_storage=torch.UntypedStorage(nbytes), dtype=dtype, _internal=True
        )


def rewrite_zip(raw: bytes, transform: Callable[[str, bytes], bytes | None]) -> bytes:
    """Rebuild a torch zip checkpoint record by record with torch's own writer (64-byte aligned).

    ``transform(name, data)`` gets each record's name (without the archive prefix) and returns
    its new bytes, or ``None`` to drop it. ``version`` and ``.data/serialization_id`` are
    written by the writer itself.
    """
    zin = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(out, True, 64)
    for info in zin.infolist():
        name = info.filename.split("/", 1)[1]
        if name in ("version", ".data/serialization_id"):
            continue
        data = transform(name, zin.read(info))
        if data is not None:
            writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    return out.getvalue()


def to_big_endian(raw: bytes) -> bytes:
    """A little-endian torch zip checkpoint rewritten as if saved on a big-endian host."""
    zin = zipfile.ZipFile(io.BytesIO(raw))
    pkl = next(n for n in zin.namelist() if n.endswith("/data.pkl"))
    scan = _StorageScan(zin.read(pkl))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan.load()

    def transform(name: str, data: bytes) -> bytes:
        if name == "byteorder":
            assert data == b"little"
            return b"big"
        if name.startswith("data/"):
            key = name[len("data/"):]
            if not data:
                return data
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            storage = buf.untyped_storage()
            storage.byteswap(scan.dtypes[key])
            return buf.numpy().tobytes()
        return data

    return rewrite_zip(raw, transform)


def save_bytes(obj: Any, variant: str) -> bytes:
    buf = io.BytesIO()
    if variant == "legacy":
        torch.save(obj, buf, _use_new_zipfile_serialization=False)
    elif variant == "zip_nocrc":
        previous = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(obj, buf)
        finally:
            torch.serialization.set_crc32_options(previous)
    elif variant in ("zip", "zip_big"):
        torch.save(obj, buf)
    else:
        raise ValueError(variant)
    raw = buf.getvalue()
    if variant == "zip_big":
        big = to_big_endian(raw)
        assert big != raw
        # torch must read the big-endian rewrite back to the original before we trust it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert_same(torch.load(io.BytesIO(raw), weights_only=False), torch.load(io.BytesIO(big), weights_only=False))
        raw = big
    return raw


# ---------------------------------------------------------------------------------------
# Running both loaders
# ---------------------------------------------------------------------------------------

FORMS = ("str", "pathlib", "file", "bytesio", "bytes")


def _quiet_warning(w: warnings.WarningMessage) -> bool:
    msg = str(w.message)
    # Process-wide "warn once" noise that depends on what ran before, not on the loader.
    return msg.startswith("TypedStorage is deprecated") or "Triggered internally" in msg


@dataclasses.dataclass
class Outcome:
    value: Any = None
    exc: BaseException | None = None
    warnings: list[tuple[type, str]] = dataclasses.field(default_factory=list)


def _run(fn: Callable[[], Any]) -> Outcome:
    out = Outcome()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out.value = fn()
        except Exception as e:  # noqa: BLE001 - compared by the caller
            out.exc = e
    out.warnings = [(w.category, str(w.message)) for w in caught if not _quiet_warning(w)]
    return out


def _open_form(path: pathlib.Path, form: str, for_ckptd: bool, stack: list):
    if form == "str":
        return str(path)
    if form == "pathlib":
        return path
    if form == "file":
        f = open(path, "rb")  # noqa: SIM115
        stack.append(f)
        return f
    if form == "bytesio":
        return io.BytesIO(path.read_bytes())
    if form == "bytes":
        return path.read_bytes() if for_ckptd else io.BytesIO(path.read_bytes())
    raise ValueError(form)


def load_both(path: pathlib.Path, form: str = "str", *, map_location_factory=None, **kwargs) -> tuple[Outcome, Outcome]:
    """torch.load and ckptd.load of the same file in the same input form with the same arguments.

    ``map_location_factory``, if given, is called once per loader to make its map_location
    (so each loader gets its own recorder).
    """
    import ckptd

    outcomes = []
    for loader, for_ckptd in ((torch.load, False), (ckptd.load, True)):
        stack: list = []
        try:
            f = _open_form(path, form, for_ckptd, stack)
            kw = dict(kwargs)
            if map_location_factory is not None:
                kw["map_location"] = map_location_factory()
                outcomes.append((_run(lambda: loader(f, **kw)), kw["map_location"]))
            else:
                outcomes.append((_run(lambda: loader(f, **kw)), None))
        finally:
            for s in stack:
                s.close()
    (t, tml), (c, cml) = outcomes
    if map_location_factory is not None:
        return t, c, tml, cml  # type: ignore[return-value]
    return t, c


def assert_conform(t: Outcome, c: Outcome, *, same_message: bool = True) -> None:
    """The two outcomes agree: equal results, or ckptd raises what torch raises (or a subclass)."""
    if t.exc is not None:
        assert c.exc is not None, f"torch.load raised {t.exc!r} but ckptd.load returned"
        assert isinstance(c.exc, type(t.exc)), (
            f"ckptd raised {type(c.exc).__mro__} which is not a {type(t.exc).__name__}: {c.exc}"
        )
        if same_message:
            assert str(t.exc) in str(c.exc), f"message differs:\n torch: {t.exc}\n ckptd: {c.exc}"
    else:
        if c.exc is not None:
            raise AssertionError(f"torch.load succeeded but ckptd.load raised {c.exc!r}") from c.exc
        assert_same(t.value, c.value)
    assert c.warnings == t.warnings, f"warnings differ:\n torch: {t.warnings}\n ckptd: {c.warnings}"


class LocationRecorder:
    """A map_location callable that records each call; returns None (torch's default restore)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, bytes]] = []

    def __call__(self, storage, location):
        self.calls.append((type(storage).__name__, location, storage.nbytes(), storage_bytes(storage)))
        return None


# ---------------------------------------------------------------------------------------
# A real daemon.
# ---------------------------------------------------------------------------------------


READY_PREFIX = "ckptd: serving on "


@dataclasses.dataclass
class Daemon:
    """A running daemon: its process, socket, checkpoint root and shared-memory dir."""

    proc: subprocess.Popen
    sock: str
    root: Path
    shm: Path

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def arenas(self) -> list[Path]:
        return sorted(p for p in self.shm.iterdir() if p.is_file())


def start_daemon(root: Path, shm: Path, *extra: str) -> Iterator[Daemon]:
    """Run ``ckptd serve`` until the generator resumes; then SIGTERM it and check it left cleanly.

    The socket lives in a short directory under /tmp (a Unix socket path must stay under
    108 bytes, which pytest's tmp_path can exceed); the ready line printed once the
    daemon listens is the start signal, so nothing sleeps.
    """
    sockdir = tempfile.mkdtemp(prefix="ck", dir="/tmp")
    sock = os.path.join(sockdir, "d.sock")
    cmd = [sys.executable, "-m", "ckptd", "serve", "--socket", sock, "--root", str(root), "--shm-dir", str(shm), "--lease-ttl", "1", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the daemon is listening (or exits)
        assert line.startswith(READY_PREFIX), f"daemon did not start: {line!r} (exit {proc.poll()})"
        assert line.strip() == f"{READY_PREFIX}unix://{sock}"
        yield Daemon(proc, sock, root, shm)
        assert proc.poll() is None, "daemon died during the test"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not os.path.exists(sock), "socket left behind after SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        shutil.rmtree(sockdir, ignore_errors=True)


def daemon_in(base: Path, *extra: str) -> Iterator[Daemon]:
    """:func:`start_daemon` with its checkpoint root and shared-memory dir made under ``base``."""
    (base / "root").mkdir()
    (base / "shm").mkdir()
    yield from start_daemon(base / "root", base / "shm", *extra)


def wait_for(condition: Callable[[], Any], what: str = "condition", timeout: float = 10.0) -> Any:
    """Poll ``condition`` until it is true (returned) or ``timeout`` seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def report_of(proc: subprocess.Popen, out: Path, timeout: float = 60.0) -> dict:
    """The JSON a client process writes to ``out`` (then it blocks on stdin); fails if it exits first."""

    def written() -> bool:
        if proc.poll() is not None and not out.exists():
            raise AssertionError(f"client process exited with {proc.returncode} before reporting")
        return out.exists()

    wait_for(written, "the client's report", timeout)
    return json.loads(out.read_text())


def cached_entry(client: Any, path: Path) -> dict:
    """The daemon's one entry for ``path`` (``Client.checkpoints()``), symlinks resolved."""
    matches = [c for c in client.checkpoints() if os.path.realpath(c["path"]) == os.path.realpath(path)]
    assert len(matches) == 1, client.checkpoints()
    return matches[0]


@contextlib.contextmanager
def saved_as(tag: str) -> Iterator[None]:
    """Inside, ``torch.save`` tags every storage ``tag``: a file as if saved from that device."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.serialization, "location_tag", lambda storage: tag)
        yield


def named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Named tensors of a loaded object as ckptd names them (dotted keys, ints in decimal)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from named_tensors(value, f"{prefix}.{index}" if prefix else str(index))


def layout_of(path: Path) -> Any:
    """ckptd's layout of the checkpoint at ``path``."""
    from ckptd.formats import open_source, read_layout

    with open_source(str(path)) as source:
        return read_layout(source)


def file_bytes(path: Path, offset: int, nbytes: int) -> bytes:
    """``nbytes`` of the file at ``offset``."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(nbytes)


def tensor_storage_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes of the whole storage under ``tensor``."""
    storage = tensor.untyped_storage()
    return bytes(storage.tolist()) if storage.nbytes() else b""


def assert_layout_storages(path: Path, layout: Any, loaded: Any) -> None:
    """Names equal torch.load's; each name's storage read from the file equals torch's storage bytes."""
    expected = dict(named_tensors(loaded))
    got = layout.tensor_map()
    assert sorted(got) == sorted(expected)
    assert len(layout.tensors) == len(expected)
    for name, tensor in expected.items():
        entry = got[name]
        assert len(entry.storage_keys) == 1, name
        record = layout.storages[entry.storage_keys[0]]
        assert record.nbytes == tensor.untyped_storage().nbytes(), name
        assert record.numel * record.dtype.itemsize == record.nbytes, name
        assert file_bytes(path, record.offset, record.nbytes) == tensor_storage_bytes(tensor), name


def assert_layout_matches(path: Path, layout: Any, loaded: Any) -> None:
    """As :func:`assert_layout_storages`, and dtypes, shapes, strides, storage offsets and
    locations equal torch.load's (``loaded``: what torch.load returned for ``path``)."""
    assert_layout_storages(path, layout, loaded)
    got = layout.tensor_map()
    for name, tensor in named_tensors(loaded):
        entry = got[name]
        assert entry.dtype == tensor.dtype, name
        assert entry.shape == tuple(tensor.shape), name
        assert entry.stride == tuple(tensor.stride()), name
        assert entry.storage_offset == tensor.storage_offset(), name
        assert entry.location == "cpu", name
        assert entry.nbytes == tensor.numel() * tensor.element_size(), name
