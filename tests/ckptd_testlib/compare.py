"""Comparing ckptd's results with torch's.

* :func:`assert_same` -- strict deep comparison of two loaded objects (torch's vs ckptd's).
* :func:`load_both` -- runs ``torch.load`` and ``ckptd.load`` on the same input and
  arguments, recording warnings and exceptions of each; :func:`assert_conform` compares
  the two :class:`Outcome` s.
* :class:`LocationRecorder` -- a ``map_location`` callable that records its calls.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pathlib
import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "storage_bytes",
    "assert_same",
    "FORMS",
    "Outcome",
    "load_both",
    "assert_conform",
    "LocationRecorder",
]


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
        # a fresh dense copy: contiguous() keeps the stride of a single element (3 in a
        # mutated checkpoint), which view() then refuses
        assert torch.equal(
            act.detach().reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8),
            exp.detach().reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8),
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
