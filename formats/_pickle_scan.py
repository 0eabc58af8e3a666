"""A pickle scanner that reads structure and runs nothing, at C speed.

torch checkpoints keep their object graph in a pickle. To plan reads (which storages
exist, their dtypes, sizes and locations, and which named tensor uses which storage)
ckptd runs Python's C unpickler with every effect replaced by a record: each global the
pickle names becomes an inert stub class of ckptd's own (:class:`Global`), calling or
instantiating one yields a :class:`Call` record, persistent ids stay data
(:class:`PersistentId`). No module is imported, no global resolved, no function of the
checkpoint called, so a hostile file can make the scan fail but never act. Containers
(dicts, lists, tuples, sets) are the real builtins the pickle builds. The real object is
rebuilt later, by torch's own unpickler or by ckptd's plain rebuild from this record.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import pickle
import pickletools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ._errors import CheckpointError, UnsupportedFormatError
from ._layout import TensorEntry

# How many distinct globals one pickle may name: real checkpoints name a few dozen; each
# stub is a class, so a crafted pickle naming millions is refused rather than obeyed.
_MAX_GLOBALS = 100_000


class Global(type):
    """A global named in the pickle, never imported: the stub class that stands for it.

    The unpickler calls it (REDUCE, INST, OBJ) or instantiates it (NEWOBJ): both only
    record a :class:`Call`. Stubs are immutable, so a pickle cannot re-wire one.

    >>> stub = Global.named("os", "system")
    >>> call = stub("true")
    >>> call.func.qualname, call.args
    ('os.system', ('true',))
    """

    module: str
    name: str

    tally: list[int]  # calls recorded by the scan that made this stub: [count]

    @classmethod
    def named(mcs, module: str, name: str, tally: list[int] | None = None) -> Global:
        """A new stub for ``module.name``; its calls are counted in ``tally``."""
        namespace = {"module": module, "name": name, "tally": [0] if tally is None else tally}
        return mcs("Global", (), {**namespace, "__new__": _instantiate, "__slots__": ()})

    def __call__(cls, *args: Any, **kwargs: Any) -> Call:
        cls.tally[0] += 1
        return Call(cls, args)

    def __setattr__(cls, key: str, value: Any) -> None:
        raise TypeError(f"the stub for {cls.qualname} is immutable")

    @property
    def qualname(cls) -> str:
        return f"{cls.module}.{cls.name}"

    def __repr__(cls) -> str:
        return f"Global({cls.module!r}, {cls.name!r})"


def _instantiate(cls: Global, *args: Any, **kwargs: Any) -> Call:
    # NEWOBJ / NEWOBJ_EX call ``cls.__new__(cls, *args)``: recorded like a call (kwargs
    # are structure only).
    cls.tally[0] += 1
    return Call(cls, args)


class Call:
    """``func(*args)`` as the pickle describes it, with what was applied afterwards.

    ``items`` records SETITEM(S), ``appended`` APPEND(S)/ADDITEMS, ``state`` BUILD
    (``built`` tells a BUILD with ``None`` from none).
    """

    __slots__ = ("func", "args", "state", "built", "items", "appended")

    def __init__(self, func: Any, args: Any) -> None:
        self.func = func
        self.args = args
        self.state: Any = None
        self.built = False
        self.items: list[tuple[Any, Any]] = []
        self.appended: list[Any] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Call:
        func = self.func
        while type(func) is Call:
            func = func.func
        func.tally[0] += 1  # every call chain starts at a stub
        return Call(self, args)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.appended.append(value)

    def extend(self, values: Any) -> None:
        self.appended.extend(values)

    def add(self, value: Any) -> None:
        self.appended.append(value)

    def __setstate__(self, state: Any) -> None:
        self.state = state
        self.built = True

    def __repr__(self) -> str:
        return f"Call({self.func!r}, {self.args!r})"


@dataclass(frozen=True, eq=False)
class PersistentId:
    """The argument of a PERSID/BINPERSID opcode: how torch refers to a storage."""

    value: Any


@dataclass(frozen=True)
class StorageRef:
    """A storage as a persistent id names it (location and size, not yet placed in a file).

    ``view`` is ``(view_key, element_offset, element_count)`` for legacy storage views.
    """

    key: str
    dtype: torch.dtype
    numel: int
    location: str
    view: tuple[str, int, int] | None = None


@dataclass
class ScanResult:
    """What the scan found: the root object, storages in first-use order, named tensors.

    ``utf8`` is False when the pickle's Python 2 strings are not UTF-8 (they were read
    as latin-1 for the names; torch.load's default decoding would differ). ``calls`` counts
    every call and instantiation the pickle makes, ``persistent_ids`` every storage
    reference, reachable from the root or not.
    """

    root: Any
    storages: dict[str, StorageRef]
    tensors: list[TensorEntry]
    end: int
    utf8: bool = True
    calls: int = 0
    persistent_ids: list[Any] = field(default_factory=list)


class _NoBuffers:
    """The out-of-band buffer source: refuses, so NEXT_BUFFER fails with ckptd's error."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __iter__(self) -> _NoBuffers:
        return self

    def __next__(self) -> Any:
        raise UnsupportedFormatError(self.name, "out-of-band pickle buffers are not supported")


class _Recorder(pickle.Unpickler):
    """The C unpickler with every global a stub and every persistent id recorded."""

    def __init__(self, stream: io.BytesIO, name: str, encoding: str) -> None:
        super().__init__(stream, encoding=encoding, fix_imports=False, buffers=_NoBuffers(name))
        self.name = name
        self.globals: dict[tuple[str, str], Global] = {}
        self.persistent_ids: list[Any] = []
        self.tally = [0]

    def find_class(self, module: str, name: str) -> Global:
        stub = self.globals.get((module, name))
        if stub is None:
            if len(self.globals) >= _MAX_GLOBALS:
                raise CheckpointError(self.name, "pickle names too many globals: hostile input")
            stub = self.globals[(module, name)] = Global.named(module, name, self.tally)
        return stub

    def persistent_load(self, pid: Any) -> PersistentId | Global:
        self.persistent_ids.append(pid)
        if type(pid) is tuple and len(pid) > 1 and _text(pid[0]) == "module":
            # legacy whole-module pickles name each module class this way, then instantiate it
            cls = pid[1]
            return cls if isinstance(cls, Global) else self.find_class("<module>", str(_text(cls)))
        return PersistentId(pid)


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while a graph of many small objects is built.

    Building tens of thousands of records triggers collections that walk every live object
    (a scan of a 20,000-tensor pickle took 4x longer with them); nothing built here is
    garbage until the caller drops it.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# What the C unpickler raises on malformed input (stubs raise nothing of their own).
_MALFORMED = (
    pickle.UnpicklingError, ValueError, IndexError, KeyError, TypeError, EOFError,
    AttributeError, OverflowError, MemoryError, RecursionError,
)


def scan(data: bytes | memoryview, name: str, *, start: int = 0, names: bool = True) -> ScanResult:
    """Interpret the pickle at ``data[start:]`` without running it.

    ``names=False`` records the object only (no storage table, no named tensors): what a
    rebuild from the record needs.

    >>> import pickle
    >>> scan(pickle.dumps({"a": 1}), "x").root
    {'a': 1}
    """
    with no_gc():
        utf8 = True
        try:
            root, recorder, end = _run(data, name, start, "utf-8")
        except UnicodeDecodeError:  # Python 2 byte strings that are not UTF-8: names as latin-1
            utf8 = False
            try:
                root, recorder, end = _run(data, name, start, "latin-1")
            except UnicodeDecodeError as exc:  # a text opcode that is not UTF-8 either
                raise CheckpointError(name, f"malformed pickle ({exc})") from exc
        storages = _storage_refs(recorder.persistent_ids, name) if names else {}
        tensors = list(_named_tensors(root, storages)) if names else []
    return ScanResult(root, storages, tensors, end, utf8, recorder.tally[0], recorder.persistent_ids)


def _run(data: bytes | memoryview, name: str, start: int, encoding: str) -> tuple[Any, _Recorder, int]:
    try:
        return _unpickle(data, name, start, encoding)
    except _UnknownProtocol:
        # torch's weights-only unpickler reads a PROTO opcode's number and ignores it, wherever
        # the opcode stands; the C one refuses a number it does not know: patch those, once
        return _unpickle(_known_protocols(data, start), name, start, encoding)


class _UnknownProtocol(Exception):
    """The C unpickler met a PROTO opcode whose number it does not know."""


def _unpickle(data: bytes | memoryview | bytearray, name: str, start: int, encoding: str) -> tuple[Any, _Recorder, int]:
    stream = io.BytesIO(data)
    stream.seek(start)
    recorder = _Recorder(stream, name, encoding)
    try:
        root = recorder.load()
    except (CheckpointError, UnicodeDecodeError):
        raise
    except ValueError as exc:
        if str(exc).startswith("unsupported pickle protocol"):
            raise _UnknownProtocol from exc
        raise CheckpointError(name, f"malformed pickle ({type(exc).__name__}: {exc})") from exc
    except _MALFORMED as exc:
        raise CheckpointError(name, f"malformed pickle ({type(exc).__name__}: {exc})") from exc
    return root, recorder, stream.tell()


def _known_protocols(data: bytes | memoryview | bytearray, start: int) -> bytearray:
    """``data`` with the number of every PROTO opcode above what this Python knows set to 2.

    The opcodes are found by walking the pickle (a 0x80 byte inside a string is no opcode),
    at Python speed: only pickles that need it pay. The walk stops where the pickle stops
    making sense; the C unpickler then reports that place as it would have.

    >>> bytes(_known_protocols(b"\\x80\\x02K\\x01\\x80\\x09.", 0))
    b'\\x80\\x02K\\x01\\x80\\x02.'
    """
    patched = bytearray(data)
    stream = io.BytesIO(patched)
    stream.seek(start)
    try:
        for opcode, arg, at in pickletools.genops(stream):
            if opcode.name == "PROTO" and arg > pickle.HIGHEST_PROTOCOL:
                patched[at + 1] = 2  # ``at``: the opcode's offset in the whole stream
    except (ValueError, EOFError):
        pass  # malformed from here on: the C unpickler fails there with its own message
    return patched


def _text(value: Any) -> Any:
    # Python 2 era checkpoints (and encoding='bytes') keep internal strings as bytes.
    return value.decode("ascii") if isinstance(value, bytes) else value


def storage_dtype(storage_type: Any, name: str) -> torch.dtype:
    """The dtype a storage class named in the pickle stands for (looked up, not imported)."""
    if not isinstance(storage_type, Global) or not storage_type.name.endswith("Storage"):
        raise CheckpointError(name, f"persistent id names {storage_type!r}, not a storage class")
    dtype = _storage_class_dtype(storage_type.name)
    if dtype is None:
        raise CheckpointError(name, f"unknown storage type {storage_type.name!r}")
    return dtype


@functools.lru_cache(maxsize=256)
def _storage_class_dtype(name: str) -> torch.dtype | None:
    if name == "UntypedStorage":
        return torch.uint8
    try:
        return torch.serialization.StorageType(name).dtype
    except (KeyError, AttributeError):
        return None


def _storage_refs(pids: list[Any], name: str) -> dict[str, StorageRef]:
    refs: dict[str, StorageRef] = {}
    first: dict[str, tuple[Any, ...]] = {}
    for pid in pids:
        if type(pid) is tuple and len(pid) == 5 and type(pid[2]) is str:
            if first.get(pid[2]) == pid:
                continue  # the same storage named again (a tie, a view): nothing new to check
            first.setdefault(pid[2], pid)
        ref = _storage_ref(pid, name, refs)
        if ref is None:
            continue
        # torch.load keeps the storage its first reference made and ignores the size
        # later ones declare (a tensor that does not fit it then fails in torch's set_)
        refs.setdefault(ref.key, ref)
    return refs


def _storage_ref(pid: Any, name: str, refs: dict[str, StorageRef]) -> StorageRef | None:
    """Decode ``('storage', type, key, location, numel[, view])``; other ids give ``None``.

    ``refs`` holds the storages decoded so far (a storage type may name one of them).
    """
    if type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and type(pid[2]) is str and type(pid[3]) is str:
        numel = pid[4]
        if type(numel) is int and numel >= 0:  # torch.save's own ids: nothing to decode
            return StorageRef(pid[2], _pid_dtype(pid[1], name, refs), numel, pid[3])
    if not isinstance(pid, tuple) or not pid:
        raise CheckpointError(name, f"persistent id {pid!r} is not a tuple")
    kind = _text(pid[0])
    if kind == "module":
        return None  # legacy whole-module pickles record their source; no storage
    if kind != "storage" or len(pid) not in (5, 6):
        raise CheckpointError(name, f"unknown persistent id {kind!r}")
    storage_type, key, location, numel = pid[1:5]
    key, location = str(_text(key)), _text(location)
    if key in refs:
        # torch hands out the storage the key's first id made: of a later id it evaluates
        # only ``storage_type.dtype`` (its location and size are never looked at)
        _pid_dtype(storage_type, name, refs)
        return None
    if not isinstance(location, str) or not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise CheckpointError(name, f"storage {key!r} has a malformed table entry")
    view = None
    if len(pid) == 6 and pid[5] is not None:
        view = _view(pid[5], key, name)
    return StorageRef(key, _pid_dtype(storage_type, name, refs), numel, location, view)


def _pid_dtype(storage_type: Any, name: str, refs: dict[str, StorageRef]) -> torch.dtype:
    """The dtype torch's ``persistent_load`` takes from a storage id's type: ``storage_type.dtype``.

    That is a storage class's dtype in every file torch writes, but torch asks any object for
    its ``dtype``: a tensor or a storage rebuilt earlier in the pickle answers too (a mutated
    memo index does that), and torch.load then succeeds. Those answer here as they do there.
    """
    if isinstance(storage_type, Global):
        return storage_dtype(storage_type, name)
    if type(storage_type) is PersistentId:  # a storage: its dtype is the one it was first loaded with
        ref = refs.get(_pid_key(storage_type))
        if ref is not None:
            return ref.dtype
    elif _is_tensor_call(storage_type):
        base = _find_rebuild_v2(storage_type)
        ref = refs.get(_pid_key(base.args[0])) if base is not None else None
        if ref is not None:
            return _v3_dtype(base) or ref.dtype  # type: ignore[arg-type]
    raise CheckpointError(name, f"persistent id names {storage_type!r}, not a storage class")


def _view(meta: Any, key: str, name: str) -> tuple[str, int, int]:
    if not (isinstance(meta, tuple) and len(meta) == 3):
        raise CheckpointError(name, f"storage {key!r} has malformed view metadata")
    view_key, offset, size = meta
    if not (isinstance(offset, int) and isinstance(size, int) and offset >= 0 and size >= 0):
        raise CheckpointError(name, f"storage view of {key!r} has a bad offset or size")
    return str(_text(view_key)), offset, size


# --- named tensors -------------------------------------------------------------------

_REBUILD_MODULES = ("torch._utils", "torch._tensor", "torch.nn.parameter")


def _is_tensor_call(obj: Any) -> bool:
    return (
        isinstance(obj, Call)
        and isinstance(obj.func, Global)
        and obj.func.module in _REBUILD_MODULES
        and obj.func.name.startswith("_rebuild")
    )


# How many names one container may be reached under: enough for submodules shared by a
# few attributes, while a pickle that reuses containers 2**40 ways costs linear work.
_MAX_NAMES_PER_OBJECT = 8


# A path is a chain of (parent, key) pairs: extending it is O(1), however deep the nesting.
_Path = tuple[Any, Any] | None


def _parts(node: _Path) -> tuple[str | int, ...]:
    parts: list[str | int] = []
    while node is not None:
        node, key = node
        parts.append(key)
    return tuple(reversed(parts))


_LEAVE = object()  # on the walk's stack: the end of a container's expansion


def _named_tensors(root: Any, storages: dict[str, StorageRef]) -> Iterator[TensorEntry]:
    """Walk containers (dicts, lists, object state) from the root; yield each tensor found.

    Iterative and bounded: each container is expanded under at most a few names, so
    cycles, deep nesting and shared sub-trees cost linear work. A tensor reachable under
    two names (a shared submodule) is yielded under both.
    """
    todo: list[tuple[Any, Any]] = [(None, root)]
    expanded: dict[int, int] = {}
    on_path: set[int] = set()  # containers being expanded above the current one: a cycle
    while todo:
        node, obj = todo.pop()
        kind = type(obj)
        if node is _LEAVE:
            on_path.discard(obj)
        elif kind not in _CONTAINERS:
            continue  # atoms, stubs, persistent ids: nothing named below
        elif kind is Call and _is_tensor_call(obj):
            entry = _tensor_entry(_parts(node), obj, storages)
            if entry is not None:
                yield entry
        elif id(obj) not in on_path and expanded.get(id(obj), 0) < _MAX_NAMES_PER_OBJECT:
            ident = id(obj)
            expanded[ident] = expanded.get(ident, 0) + 1
            on_path.add(ident)
            todo.append((_LEAVE, ident))
            todo.extend([((node, key), child) for key, child in reversed(list(_children(obj)))])


_CONTAINERS = frozenset({dict, list, tuple, Call})


# Globals whose call builds a mapping from ``args[0]`` (a list of pairs, or a dict): how
# Python 2-era pickles wrote OrderedDicts (REDUCE, not SETITEMS).
_MAPPING_TYPES = frozenset({"collections.OrderedDict", "builtins.dict", "__builtin__.dict"})


def _children(obj: Any) -> Iterator[tuple[str | int, Any]]:
    kind = type(obj)
    if kind is dict:
        pairs: Any = obj.items()
    elif kind is list or kind is tuple:
        yield from enumerate(obj)
        return
    elif kind is Call:
        pairs = list(obj.items)
        pairs += _call_pairs(obj)
        state = obj.state
        if type(state) is tuple and state:
            state = state[0]
        if type(state) is dict:
            pairs += state.items()
    else:
        return
    for key, value in pairs:
        key = _text(key)
        if isinstance(key, (str, int)) and not isinstance(key, bool):
            yield key, value


def _call_pairs(call: Call) -> list[tuple[Any, Any]]:
    """The pairs ``OrderedDict([[k, v], ...])`` (or ``dict(...)``) was called with."""
    func, args = call.func, call.args
    if not (isinstance(func, Global) and func.qualname in _MAPPING_TYPES and type(args) is tuple and args):
        return []
    first = args[0]
    if type(first) is dict:
        return list(first.items())
    if type(first) not in (list, tuple):
        return []
    return [tuple(pair) for pair in first if type(pair) in (list, tuple) and len(pair) == 2]


def _tensor_entry(
    path: tuple[str | int, ...], call: Call, storages: dict[str, StorageRef]
) -> TensorEntry | None:
    name = ".".join(str(part) for part in path)
    simple = _simple_tensor(call)
    if simple is not None:  # the common case, without the general walks below
        ref = storages.get(_pid_key(simple.args[0]))
        offset, shape, stride = simple.args[1:4]
        if ref is not None and _ints(shape) and _ints(stride) and type(offset) is int:
            return TensorEntry(name, path, (ref.key,), ref.dtype, shape, stride, offset, ref.location, call.func.name)
    keys = _storage_keys(call)
    base = _find_rebuild_v2(call)
    if base is not None:
        ref = storages.get(_pid_key(base.args[0]))
        if ref is not None:
            offset, shape, stride = base.args[1], base.args[2], base.args[3]
            dtype = _v3_dtype(base) or ref.dtype
            if _ints(shape) and _ints(stride) and isinstance(offset, int):
                return TensorEntry(name, path, keys, dtype, tuple(shape), tuple(stride), offset, ref.location, call.func.name)
    if not keys:
        return None
    ref = storages[keys[0]]
    return TensorEntry(name, path, keys, ref.dtype, (ref.numel,), None, 0, ref.location, call.func.name)


def _simple_tensor(call: Call) -> Call | None:
    """The ``_rebuild_tensor_v2`` call of a plain tensor or Parameter, if that is what ``call`` is."""
    if call.func.name == "_rebuild_parameter" and type(call.args) is tuple and call.args:
        call = call.args[0]
        if type(call) is not Call or type(call.func) is not Global:
            return None
    if call.func.name != "_rebuild_tensor_v2" or type(call.args) is not tuple or len(call.args) < 6:
        return None
    if type(call.args[0]) is not PersistentId or call.items or call.appended or call.built:
        return None
    return call


def _v3_dtype(call: Call) -> torch.dtype | None:
    """``_rebuild_tensor_v3`` (float8, uint16+, ...) names the dtype as a global such as ``torch.float8_e5m2``.

    The name is looked up among torch's dtypes; nothing is imported.
    """
    if call.func.name != "_rebuild_tensor_v3" or len(call.args) < 7:
        return None
    named = call.args[6]
    if isinstance(named, Global) and named.module == "torch":
        found = getattr(torch, named.name, None)
        if isinstance(found, torch.dtype):
            return found
    return None


def _ints(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) for v in value)


def _find_rebuild_v2(call: Call) -> Call | None:
    """The innermost plain ``_rebuild_tensor(_v2)``/``_rebuild_qtensor`` call (shape and stride)."""
    todo: list[Any] = [call]
    seen: set[int] = set()
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Call):
            if (
                isinstance(obj.func, Global)
                and obj.func.name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_tensor", "_rebuild_qtensor")
                and isinstance(obj.args, tuple)
                and len(obj.args) >= 4
                and isinstance(obj.args[0], PersistentId)
            ):
                return obj
            todo.append(obj.args)
        elif isinstance(obj, tuple):
            todo.extend(obj)
    return None


def _pid_key(pid: PersistentId) -> str:
    value = pid.value
    return str(_text(value[2])) if isinstance(value, tuple) and len(value) > 2 else ""


def _storage_keys(obj: Any) -> tuple[str, ...]:
    """Every storage key reachable from ``obj``, in first-seen order."""
    keys: dict[str, None] = {}
    todo: list[Any] = [obj]
    seen: set[int] = set()
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, PersistentId):
            keys.setdefault(_pid_key(item), None)
        elif isinstance(item, Call):
            todo.extend((item.state, item.args, *item.appended, *(v for pair in item.items for v in pair)))
        elif type(item) in (tuple, list):
            todo.extend(reversed(item))
        elif type(item) is dict:
            todo.extend(v for pair in item.items() for v in pair)
    return tuple(keys)
