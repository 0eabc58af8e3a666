"""The checkpoint corpus: classes pickle must find, named checkpoint builders, save variants.

* :data:`CORPUS` -- named checkpoint builders; each returns an object to ``torch.save``
  (:data:`CORE` the few every variant test runs).
* :func:`save_bytes` -- an object saved in one save variant (zip, legacy, zip without
  crc32, big-endian zip); :func:`rewrite_zip` and :func:`to_big_endian` underneath it.
* :func:`saved_as` -- ``torch.save`` writes a location tag this machine cannot save from
  (``cuda:1``).
* :class:`TaggedTensor`, :class:`CustomThing`, :class:`Pwn`, :class:`NonSeekable` --
  module-level classes (pickle finds them as ``ckptd_testlib.checkpoints.X``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn as nn

from .compare import assert_same

__all__ = [
    "TaggedTensor",
    "CustomThing",
    "Pwn",
    "NonSeekable",
    "ALL_VARIANTS",
    "Entry",
    "CORPUS",
    "PLAIN_CASES",
    "NOT_PLAIN_CASES",
    "corpus",
    "ALL_DTYPES",
    "CORE",
    "rewrite_zip",
    "to_big_endian",
    "save_bytes",
    "saved_as",
]


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


def to_big_endian(raw: bytes, *, record: bool = True) -> bytes:
    """A little-endian torch zip checkpoint rewritten as if saved on a big-endian host.

    ``record=False`` drops the ``byteorder`` record too (but torch 2.13's writer adds one
    back at the end: strip it with :mod:`zipfile` for a file that has none).
    """
    zin = zipfile.ZipFile(io.BytesIO(raw))
    pkl = next(n for n in zin.namelist() if n.endswith("/data.pkl"))
    scan = _StorageScan(zin.read(pkl))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scan.load()

    def transform(name: str, data: bytes) -> bytes | None:
        if name == "byteorder":
            assert data == b"little"
            return b"big" if record else None
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


@contextlib.contextmanager
def saved_as(tag: str) -> Iterator[None]:
    """Inside, ``torch.save`` tags every storage ``tag``: a file as if saved from that device."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.serialization, "location_tag", lambda storage: tag)
        yield


# Corpus cases whose object the plain rebuild (and the compact table) makes; the rest hold
# what only torch's unpickler makes: bytes, complex, sets, dtypes (nested_containers),
# _rebuild_tensor_v3 dtypes (all_dtypes), quantized tensors, subclasses, custom objects,
# whole modules.
PLAIN_CASES = frozenset(
    "module_state_dict plain_dict views_and_ties parameters legacy_dtypes zero_dim_and_empty "
    "memory_formats transformer resnet_state_dict adam_state bare_tensor top_level_list int_keys "
    "many_small big_tensor".split()
)
NOT_PLAIN_CASES = frozenset("nested_containers all_dtypes quantized tensor_subclass custom_object whole_module".split())
