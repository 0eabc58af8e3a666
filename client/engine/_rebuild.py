"""The plain rebuild: torch.load's object built straight from the scan's record.

Most checkpoints are *plain*: dicts, OrderedDicts (with ``_metadata``), lists and tuples
of tensors, Parameters and primitives. For those, running torch's unpickler again after
the scan repeats work the scan already did, at Python speed. Here the scan's record is
turned into the object directly, with the same few torch calls per tensor that
``torch._utils._rebuild_tensor_v2`` makes, and the same storage cache torch's
``persistent_load`` keeps (one storage object per key, empty ones never shared).

Nothing is taken on trust: the pickle must use only opcodes torch's restricted unpickler
accepts, name only the globals rebuilt here, and every call and storage reference the
unpickler would make must be reachable from the root (nothing on the side). Anything else
returns ``None``, and the caller runs torch's own unpickler exactly as before.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import _weights_only_unpickler

from ckptd.formats import Call, Format, Global, Layout, PersistentId, ScanResult, no_gc, scan, storage_dtype

from ._storages import StorageSet

_ORDERED_DICT = ("collections", "OrderedDict")
_TENSOR_V2 = ("torch._utils", "_rebuild_tensor_v2")
_PARAMETER = ("torch._utils", "_rebuild_parameter")
_REBUILDERS = frozenset({_ORDERED_DICT, _TENSOR_V2, _PARAMETER})

# Values kept as they are (immutable; torch.load's copies are equal and of the same type).
_ATOMS = frozenset({str, int, float, bool, type(None), bytes})
# Deeper nesting goes to torch's unpickler (iterative) instead of this recursive walk.
_MAX_DEPTH = 200
_BUSY = object()  # a tuple being built: reaching it again is a cycle only a list could close


@dataclass(frozen=True)
class Built:
    """The rebuilt object (a box, since ``None`` is a valid checkpoint)."""

    value: Any


class _NotPlain(Exception):
    """The record holds something the plain rebuild does not make; torch's unpickler will."""


def rebuild_plain(
    layout: Layout, storages: StorageSet, pickle_module: Any, load_args: dict[str, Any]
) -> Built | None:
    """torch.load's result for a plain checkpoint, or ``None`` where torch's unpickler must run.

    >>> import io, torch
    >>> from ckptd.formats import open_source, read_layout
    >>> from ckptd.engine import read_storages
    >>> buf = io.BytesIO(); torch.save({"w": torch.ones(2)}, buf)
    >>> layout = read_layout(open_source(buf.getvalue()))
    >>> storages = read_storages(open_source(buf.getvalue()), layout, layout.storages, None)
    >>> rebuild_plain(layout, storages, torch._weights_only_unpickler, {"encoding": "utf-8"}).value
    {'w': tensor([1., 1.])}
    """
    if not _applies(layout, pickle_module, load_args):
        return None
    assert layout.pickle is not None
    scanned: ScanResult | None = layout.scanned
    if scanned is None:
        scanned = scan(layout.pickle, layout.name, names=False)  # a layout from the daemon's manifest
    if not scanned.utf8:
        return None
    with no_gc():
        if callable(storages.map_location) and _build(scanned, storages, dry=True) is None:
            return None  # found out before the callable ran: torch's unpickler calls it once per storage
        return _build(scanned, storages, dry=False)


def _build(scanned: ScanResult, storages: StorageSet, dry: bool) -> Built | None:
    """Build the object; ``dry`` builds it on meta storages, to learn whether it is plain."""
    try:
        return Built(_Builder(storages, dry).build_root(scanned))
    except _NotPlain:
        return None


def _applies(layout: Layout, pickle_module: Any, load_args: dict[str, Any]) -> bool:
    return (
        layout.format is Format.TORCH_ZIP
        and layout.pickle is not None
        and pickle_module in (pickle, _weights_only_unpickler)
        and load_args == {"encoding": "utf-8"}
        and not _modes_active()
        and plain_opcodes(layout.pickle)
    )


def _modes_active() -> bool:
    """A torch function or dispatch mode (``with torch.device(...)``, fake tensors) changes
    what torch's rebuild functions do: those loads take torch's own path."""
    function_modes = getattr(torch._C, "_len_torch_function_stack", None)
    dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
    if function_modes is None or dispatch_modes is None:
        return True
    return bool(function_modes() or dispatch_modes())


# --- the opcode check -----------------------------------------------------------------

# Opcodes of fixed length that torch's restricted unpickler (torch/_weights_only_unpickler.py)
# accepts, matched in runs at C speed: no-argument ones, then 1-, 2-, 4- and 8-byte arguments.
# Strings shorter than 128 bytes (BINUNICODE, SHORT_BINSTRING) are matched too, one branch
# per length (the engine skips a branch on its first byte): names and keys stay in the run.
_NO_ARG = re.escape(b"\x81RbaesutN\x85\x86\x87\x89\x88)]}\x8fQ(")
_SHORT_TEXT = b"|".join(re.escape(bytes([n])) + b"\\x00\\x00\\x00" + b".{%d}" % n for n in range(128))
_SHORT_BYTES = b"|".join(re.escape(bytes([n])) + b".{%d}" % n for n in range(128))
_FIXED_RUN = re.compile(
    b"(?:[" + _NO_ARG + b"]|[Khq].|M..|[Jjr]....|G........|X(?:" + _SHORT_TEXT + b")|U(?:" + _SHORT_BYTES + b"))*+",
    re.DOTALL,
)
_BINUNICODE, _SHORT_BINSTRING, _LONG1, _GLOBAL, _PROTO, _STOP = b"XU\x8ac\x80."
_STORAGE_CLASSES = frozenset(f"{name}Storage" for name in (
    "Double Float Half Long Int Short Char Byte Bool BFloat16 ComplexDouble ComplexFloat "
    "QUInt8 QInt8 QInt32 QUInt4x2 QUInt2x4 Untyped".split()
))


def plain_opcodes(data: bytes) -> bool:
    """Whether every opcode of the pickle is one torch's restricted unpickler accepts, its
    protocol is torch's (2: no warning), and every global it names is rebuilt here.

    >>> import pickle
    >>> plain_opcodes(pickle.dumps({"a": [1, 2.5]}, protocol=2))
    True
    >>> plain_opcodes(pickle.dumps({"a": [1, 2.5]}, protocol=4))
    False
    """
    pos, end = 0, len(data)
    match = _FIXED_RUN.match
    while True:
        pos = match(data, pos).end()  # type: ignore[union-attr]  # the pattern matches the empty run
        if pos >= end:
            return False  # no STOP
        op = data[pos]
        if op == _BINUNICODE:
            pos += 5 + int.from_bytes(data[pos + 1 : pos + 5], "little")
        elif op == _SHORT_BINSTRING or op == _LONG1:
            pos += 2 + (data[pos + 1] if pos + 1 < end else 0)
        elif op == _GLOBAL:
            module_end = data.find(b"\n", pos + 1)
            name_end = data.find(b"\n", module_end + 1)
            if module_end < 0 or name_end < 0 or not _plain_global(data[pos + 1 : module_end], data[module_end + 1 : name_end]):
                return False
            pos = name_end + 1
        elif op == _PROTO:
            if data[pos + 1 : pos + 2] != b"\x02":
                return False
            pos += 2
        else:
            return op == _STOP


def _plain_global(module: bytes, name: bytes) -> bool:
    if module == b"torch":
        return name.decode("latin-1") in _STORAGE_CLASSES
    return (module.decode("latin-1"), name.decode("latin-1")) in _REBUILDERS


# --- the builder ----------------------------------------------------------------------


def storage_pid(pid: PersistentId) -> tuple[Global, str, str]:
    """A torch zip storage id's storage type, key and saved location, as the plain rebuild
    accepts it (a ``("storage", type, key, location, numel)`` tuple naming a storage class);
    anything else is not plain.

    >>> storage_pid(PersistentId(("storage", Global.named("torch", "FloatStorage"), "0", "cpu", 2)))[1:]
    ('0', 'cpu')
    """
    value = pid.value
    if type(value) is not tuple or len(value) != 5:
        raise _NotPlain
    kind, storage_type, key, location, _numel = value
    if kind != "storage" or type(key) is not str or type(location) is not str or type(storage_type) is not Global:
        raise _NotPlain
    return storage_type, key, location


class _Builder:
    """Walks the scan's record from the root, building each object once (the pickle's memo)."""

    def __init__(self, storages: StorageSet, dry: bool) -> None:
        self.storages = storages
        self.dry = dry
        self.memo: dict[int, Any] = {}
        self.loaded: dict[str, tuple[torch.UntypedStorage, torch.dtype]] = {}
        self.calls = 0
        self.pids = 0

    def build_root(self, scanned: ScanResult) -> Any:
        """The scanned object built whole; not plain where the pickle does anything beside
        building it (a call or storage id its root does not reach)."""
        value = self.build(scanned.root, 0)
        if self.calls != scanned.calls or self.pids != len(scanned.persistent_ids):
            raise _NotPlain
        return value

    def build(self, obj: Any, depth: int) -> Any:
        kind = type(obj)
        if kind in _ATOMS:
            return obj
        found = self.memo.get(id(obj))
        if found is not None:
            if found is _BUSY:
                raise _NotPlain
            return found
        if depth > _MAX_DEPTH:
            raise _NotPlain
        if kind is dict:
            out: Any = {}
            self.memo[id(obj)] = out
            self._fill(out, obj.items(), depth)
            return out
        if kind is list:
            out = []
            self.memo[id(obj)] = out
            out.extend([self.build(item, depth + 1) for item in obj])
            return out
        if kind is tuple:
            self.memo[id(obj)] = _BUSY
            out = tuple([self.build(item, depth + 1) for item in obj])
            self.memo[id(obj)] = out
            return out
        if kind is Call:
            return self._call(obj, depth)
        raise _NotPlain

    def _fill(self, out: dict[Any, Any], pairs: Any, depth: int) -> None:
        for key, value in pairs:
            if type(key) not in _ATOMS:
                raise _NotPlain
            out[key] = self.build(value, depth + 1)

    def _call(self, call: Call, depth: int) -> Any:
        func = call.func
        if type(func) is not Global or call.appended:
            raise _NotPlain
        self.calls += 1
        target = (func.module, func.name)
        if target == _ORDERED_DICT:
            return self._ordered_dict(call, depth)
        if call.items or call.built:
            raise _NotPlain
        if target == _TENSOR_V2:
            out = self._tensor(call)
        elif target == _PARAMETER:
            out = self._parameter(call, depth)
        else:
            raise _NotPlain
        self.memo[id(call)] = out
        return out

    def _ordered_dict(self, call: Call, depth: int) -> OrderedDict[Any, Any]:
        out: OrderedDict[Any, Any] = OrderedDict()
        self.memo[id(call)] = out
        args = call.args
        if args:  # Python 2-era pickles: OrderedDict([[key, value], ...]) through REDUCE
            if len(args) != 1 or type(args[0]) is not list:
                raise _NotPlain
            for pair in args[0]:
                if type(pair) not in (list, tuple) or len(pair) != 2:
                    raise _NotPlain
            self._fill(out, args[0], depth)
        self._fill(out, call.items, depth)
        if call.built:  # torch's BUILD for an OrderedDict: inst.__dict__.update(state)
            state = call.state
            if type(state) is not dict or not all(type(key) is str for key in state):
                raise _NotPlain
            out.__dict__.update({key: self.build(value, depth + 1) for key, value in state.items()})
        return out

    def _hooks(self, hooks: Any) -> OrderedDict[Any, Any]:
        """The (empty) backward-hooks OrderedDict torch saves with every tensor."""
        found = self.memo.get(id(hooks))
        if found is not None:
            return found  # type: ignore[no-any-return]
        if (
            type(hooks) is not Call
            or type(hooks.func) is not Global
            or (hooks.func.module, hooks.func.name) != _ORDERED_DICT
            or hooks.args not in ((), ([],))  # ([],): Python 2-era picklers wrote OrderedDict([])
            or hooks.items
            or hooks.appended
            or hooks.built
        ):
            raise _NotPlain
        self.calls += 1
        built: OrderedDict[Any, Any] = OrderedDict()
        self.memo[id(hooks)] = built
        return built

    def _tensor(self, call: Call) -> torch.Tensor:
        """``torch._utils._rebuild_tensor_v2`` with the storage from torch's persistent_load cache."""
        args = call.args
        if type(args) is not tuple or len(args) not in (6, 7) or (len(args) == 7 and args[6]):
            raise _NotPlain  # metadata (conjugate/negative bits...) is torch's to apply
        pid, offset, size, stride, requires_grad, hooks = args[:6]
        if (
            type(pid) is not PersistentId
            or type(offset) is not int
            or not _ints(size)
            or not _ints(stride)
            or type(requires_grad) is not bool
        ):
            raise _NotPlain
        storage, dtype = self._storage(pid)
        tensor = torch.empty((0,), dtype=dtype, device=storage.device)
        try:
            tensor.set_(storage, offset, size, stride)
            tensor.requires_grad = requires_grad
        except RuntimeError as exc:  # torch's own path raises it, with its own context
            raise _NotPlain from exc
        tensor._backward_hooks = self._hooks(hooks)
        return tensor

    def _parameter(self, call: Call, depth: int) -> torch.nn.Parameter:
        args = call.args
        if type(args) is not tuple or len(args) != 3 or type(args[1]) is not bool:
            raise _NotPlain
        data, requires_grad, hooks = args
        if type(data) is not Call or type(data.func) is not Global or (data.func.module, data.func.name) != _TENSOR_V2:
            raise _NotPlain
        tensor = self.build(data, depth + 1)
        try:
            return torch._utils._rebuild_parameter(tensor, requires_grad, self._hooks(hooks))
        except RuntimeError as exc:
            raise _NotPlain from exc

    def _storage(self, pid: PersistentId) -> tuple[torch.UntypedStorage, torch.dtype]:
        """torch's zip ``persistent_load``: one storage per key, except empty ones (no address)."""
        found = self.memo.get(id(pid))
        if found is not None:
            return found  # type: ignore[no-any-return]
        self.pids += 1
        storage_type, key, location = storage_pid(pid)
        loaded = self.loaded.get(key)
        if loaded is None:
            storage = self._get(key, location)
            if type(storage) is not torch.UntypedStorage:
                raise _NotPlain
            loaded = (storage, storage_dtype(storage_type, ""))
            if storage.data_ptr() != 0:
                self.loaded[key] = loaded
        self.memo[id(pid)] = loaded
        return loaded

    def _get(self, key: str, location: str) -> torch.UntypedStorage:
        if not self.dry:
            return self.storages.get(key, location)
        record = self.storages.layout.storages.get(key)
        if record is None:
            raise _NotPlain
        return torch.UntypedStorage(record.nbytes, device="meta")


def _ints(value: Any) -> bool:
    return type(value) is tuple and all(type(v) is int for v in value)
