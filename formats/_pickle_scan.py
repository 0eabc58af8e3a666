"""A pickle scanner that reads structure and runs nothing.

torch checkpoints keep their object graph in a pickle. To plan reads (which storages
exist, their dtypes, sizes and locations, and which named tensor uses which storage)
ckptd interprets the pickle's opcodes symbolically: globals stay names
(:class:`Global`), calls stay records (:class:`Call`), persistent ids stay data. No
module is imported, no global resolved, no function called, so a hostile file can make
the scan fail but never act. The real object is rebuilt later by torch's own unpickler.
"""

from __future__ import annotations

import io
import pickletools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ._errors import CheckpointError, UnsupportedFormatError
from ._layout import TensorEntry

# Per-file opcode budget: generous for any real checkpoint (about 30 per tensor), but
# a bound on the work a crafted pickle can demand of the scanner.
_MAX_OPS = 50_000_000


@dataclass(frozen=True, eq=False)
class Global:
    """A global named in the pickle, never imported."""

    module: str
    name: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False)
class Call:
    """``func(*args)`` as the pickle describes it, with what was applied afterwards."""

    func: Any
    args: Any
    state: Any = None
    items: list[tuple[Any, Any]] = field(default_factory=list)
    appended: list[Any] = field(default_factory=list)


@dataclass(eq=False)
class SymDict:
    """A dict built by the pickle; keys kept as pairs since they may be symbolic."""

    items: list[tuple[Any, Any]] = field(default_factory=list)


@dataclass(eq=False)
class SymList:
    """A list (or set) built by the pickle."""

    items: list[Any] = field(default_factory=list)


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
    """What the scan found: the root object, storages in first-use order, named tensors."""

    root: Any
    storages: dict[str, StorageRef]
    tensors: list[TensorEntry]
    end: int


class _Mark:
    """The MARK sentinel, distinct from anything a pickle can push."""


_MARK = _Mark()


def scan(data: bytes | memoryview, name: str, *, start: int = 0) -> ScanResult:
    """Interpret the pickle at ``data[start:]`` without running it.

    >>> import pickle
    >>> scan(pickle.dumps({"a": 1}), "x").root.items
    [('a', 1)]
    """
    machine = _Machine(name)
    stream = io.BytesIO(data)
    stream.seek(start)
    try:
        end = machine.run(pickletools.genops(stream))
    except CheckpointError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, EOFError, AttributeError) as exc:
        raise CheckpointError(name, f"malformed pickle ({exc})") from exc
    storages = _storage_refs(machine.persistent_ids, name)
    tensors = list(_named_tensors(machine.root, storages))
    return ScanResult(machine.root, storages, tensors, end)


class _Machine:
    """The pickle virtual machine with every effect replaced by a record."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.persistent_ids: list[Any] = []
        self.root: Any = None

    def run(self, ops: Iterator[tuple[pickletools.OpcodeInfo, Any, int | None]]) -> int:
        for count, (op, arg, pos) in enumerate(ops):
            if count > _MAX_OPS:
                raise CheckpointError(self.name, "pickle exceeds the opcode budget: hostile input")
            if op.name == "STOP":
                self.root = self.stack.pop()
                return (pos or 0) + 1
            handler = _HANDLERS.get(op.name)
            if handler is not None:
                handler(self, arg)
            elif op.name in _PUSH_ARG:
                self.stack.append(arg)
            elif op.name not in ("PROTO", "FRAME"):
                raise UnsupportedFormatError(self.name, f"pickle opcode {op.name} is not supported")
        raise CheckpointError(self.name, "pickle ends without STOP: truncated")

    def pop_mark(self) -> list[Any]:
        items = self.stack
        self.stack = self.marks.pop()
        return items

    def top(self) -> Any:
        return self.stack[-1]


def _global(m: _Machine, arg: str) -> None:
    module, _, name = arg.partition(" ")
    m.stack.append(Global(module, name))


def _stack_global(m: _Machine, _: Any) -> None:
    name, module = m.stack.pop(), m.stack.pop()
    if not isinstance(name, str) or not isinstance(module, str):
        raise CheckpointError(m.name, "STACK_GLOBAL needs two strings")
    m.stack.append(Global(module, name))


def _mark(m: _Machine, _: Any) -> None:
    m.marks.append(m.stack)
    m.stack = []


def _pop(m: _Machine, _: Any) -> None:
    if m.stack:
        m.stack.pop()
    else:
        m.pop_mark()


def _persid(m: _Machine, arg: Any) -> None:
    pid = PersistentId(arg)
    m.persistent_ids.append(arg)
    m.stack.append(pid)


def _binpersid(m: _Machine, _: Any) -> None:
    _persid(m, m.stack.pop())


def _reduce(m: _Machine, _: Any) -> None:
    args = m.stack.pop()
    m.stack.append(Call(m.stack.pop(), args))


def _newobj(m: _Machine, _: Any) -> None:
    args = m.stack.pop()
    m.stack.append(Call(m.stack.pop(), args))


def _newobj_ex(m: _Machine, _: Any) -> None:
    m.stack.pop()  # kwargs: structure only
    _newobj(m, None)


def _inst(m: _Machine, arg: str) -> None:
    module, _, name = arg.partition(" ")
    args = tuple(m.pop_mark())
    m.stack.append(Call(Global(module, name), args))


def _obj(m: _Machine, _: Any) -> None:
    items = m.pop_mark()
    m.stack.append(Call(items[0], tuple(items[1:])))


def _build(m: _Machine, _: Any) -> None:
    state = m.stack.pop()
    target = m.top()
    if isinstance(target, Call):
        target.state = state


def _setitems_into(m: _Machine, target: Any, pairs: list[tuple[Any, Any]]) -> None:
    if isinstance(target, (SymDict, Call)):
        target.items.extend(pairs)
    else:
        raise CheckpointError(m.name, f"SETITEM(S) on a {type(target).__name__}")


def _setitem(m: _Machine, _: Any) -> None:
    value, key = m.stack.pop(), m.stack.pop()
    _setitems_into(m, m.top(), [(key, value)])


def _setitems(m: _Machine, _: Any) -> None:
    items = m.pop_mark()
    _setitems_into(m, m.top(), list(zip(items[::2], items[1::2])))


def _dict(m: _Machine, _: Any) -> None:
    items = m.pop_mark()
    m.stack.append(SymDict(list(zip(items[::2], items[1::2]))))


def _append_into(m: _Machine, target: Any, values: list[Any]) -> None:
    if isinstance(target, SymList):
        target.items.extend(values)
    elif isinstance(target, Call):
        target.appended.extend(values)
    else:
        raise CheckpointError(m.name, f"APPEND(S) on a {type(target).__name__}")


def _append(m: _Machine, _: Any) -> None:
    value = m.stack.pop()
    _append_into(m, m.top(), [value])


def _appends(m: _Machine, _: Any) -> None:
    values = m.pop_mark()
    _append_into(m, m.top(), values)


def _push_marked(wrap: Any) -> Any:
    """A handler that wraps the items since the last MARK (popped *before* pushing)."""

    def handler(m: _Machine, _: Any) -> None:
        items = m.pop_mark()
        m.stack.append(wrap(items))

    return handler


def _tuple_n(n: int) -> Any:
    def handler(m: _Machine, _: Any) -> None:
        if len(m.stack) < n:
            raise CheckpointError(m.name, f"TUPLE{n} needs {n} items on the stack: malformed pickle")
        items = m.stack[len(m.stack) - n :] if n else []
        del m.stack[len(m.stack) - n :]
        m.stack.append(tuple(items))

    return handler


def _put(m: _Machine, arg: int) -> None:
    m.memo[arg] = m.top()


def _memoize(m: _Machine, _: Any) -> None:
    m.memo[len(m.memo)] = m.top()


def _get(m: _Machine, arg: int) -> None:
    if arg not in m.memo:
        raise CheckpointError(m.name, f"pickle reads memo slot {arg} before writing it")
    m.stack.append(m.memo[arg])


def _ext(m: _Machine, arg: int) -> None:
    m.stack.append(Global("<extension>", str(arg)))


def _out_of_band(m: _Machine, _: Any) -> None:
    raise UnsupportedFormatError(m.name, "out-of-band pickle buffers are not supported")


_PUSH_ARG = frozenset(
    "INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT STRING BINSTRING "
    "SHORT_BINSTRING UNICODE SHORT_BINUNICODE BINUNICODE BINUNICODE8 BINBYTES "
    "SHORT_BINBYTES BINBYTES8 BYTEARRAY8 NONE NEWTRUE NEWFALSE".split()
)

_HANDLERS: dict[str, Any] = {
    "MARK": _mark,
    "POP": _pop,
    "POP_MARK": lambda m, _: m.pop_mark(),
    "DUP": lambda m, _: m.stack.append(m.top()),
    "NONE": lambda m, _: m.stack.append(None),
    "NEWTRUE": lambda m, _: m.stack.append(True),
    "NEWFALSE": lambda m, _: m.stack.append(False),
    "PERSID": _persid,
    "BINPERSID": _binpersid,
    "GLOBAL": _global,
    "STACK_GLOBAL": _stack_global,
    "REDUCE": _reduce,
    "NEWOBJ": _newobj,
    "NEWOBJ_EX": _newobj_ex,
    "INST": _inst,
    "OBJ": _obj,
    "BUILD": _build,
    "EMPTY_DICT": lambda m, _: m.stack.append(SymDict()),
    "DICT": _dict,
    "SETITEM": _setitem,
    "SETITEMS": _setitems,
    "EMPTY_LIST": lambda m, _: m.stack.append(SymList()),
    "LIST": _push_marked(SymList),
    "APPEND": _append,
    "APPENDS": _appends,
    "EMPTY_SET": lambda m, _: m.stack.append(SymList()),
    "ADDITEMS": _appends,
    "FROZENSET": _push_marked(SymList),
    "EMPTY_TUPLE": _tuple_n(0),
    "TUPLE1": _tuple_n(1),
    "TUPLE2": _tuple_n(2),
    "TUPLE3": _tuple_n(3),
    "TUPLE": _push_marked(tuple),
    "PUT": _put,
    "BINPUT": _put,
    "LONG_BINPUT": _put,
    "MEMOIZE": _memoize,
    "GET": _get,
    "BINGET": _get,
    "LONG_BINGET": _get,
    "EXT1": _ext,
    "EXT2": _ext,
    "EXT4": _ext,
    "NEXT_BUFFER": _out_of_band,
    "READONLY_BUFFER": _out_of_band,
}


def _text(value: Any) -> Any:
    # Python 2 era checkpoints (and encoding='bytes') keep internal strings as bytes.
    return value.decode("ascii") if isinstance(value, bytes) else value


def storage_dtype(storage_type: Any, name: str) -> torch.dtype:
    """The dtype a storage class named in the pickle stands for (looked up, not imported)."""
    if not isinstance(storage_type, Global) or not storage_type.name.endswith("Storage"):
        raise CheckpointError(name, f"persistent id names {storage_type!r}, not a storage class")
    if storage_type.name == "UntypedStorage":
        return torch.uint8
    try:
        return torch.serialization.StorageType(storage_type.name).dtype
    except (KeyError, AttributeError) as exc:
        raise CheckpointError(name, f"unknown storage type {storage_type.name!r}") from exc


def _storage_refs(pids: list[Any], name: str) -> dict[str, StorageRef]:
    refs: dict[str, StorageRef] = {}
    for pid in pids:
        ref = _storage_ref(pid, name)
        if ref is None:
            continue
        seen = refs.get(ref.key)
        if seen is not None and (seen.dtype.itemsize * seen.numel) != (ref.dtype.itemsize * ref.numel):
            raise CheckpointError(name, f"storage {ref.key!r} is declared with two different sizes")
        refs.setdefault(ref.key, ref)
    return refs


def _storage_ref(pid: Any, name: str) -> StorageRef | None:
    """Decode ``('storage', type, key, location, numel[, view])``; other ids give ``None``."""
    if not isinstance(pid, tuple) or not pid:
        raise CheckpointError(name, f"persistent id {pid!r} is not a tuple")
    kind = _text(pid[0])
    if kind == "module":
        return None  # legacy whole-module pickles record their source; no storage
    if kind != "storage" or len(pid) not in (5, 6):
        raise CheckpointError(name, f"unknown persistent id {kind!r}")
    storage_type, key, location, numel = pid[1:5]
    key, location = str(_text(key)), _text(location)
    if not isinstance(location, str) or not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise CheckpointError(name, f"storage {key!r} has a malformed table entry")
    view = None
    if len(pid) == 6 and pid[5] is not None:
        view = _view(pid[5], key, name)
    return StorageRef(key, storage_dtype(storage_type, name), numel, location, view)


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


@dataclass(frozen=True)
class _PathNode:
    """A path as a chain of (parent, key): extending it is O(1), however deep the nesting."""

    parent: _PathNode | None
    key: str | int

    def parts(self) -> tuple[str | int, ...]:
        parts: list[str | int] = []
        node: _PathNode | None = self
        while node is not None:
            parts.append(node.key)
            node = node.parent
        return tuple(reversed(parts))


def _named_tensors(root: Any, storages: dict[str, StorageRef]) -> Iterator[TensorEntry]:
    """Walk containers (dicts, lists, object state) from the root; yield each tensor found.

    Iterative and bounded: each container is expanded under at most a few names, so
    cycles, deep nesting and shared sub-trees cost linear work. A tensor reachable under
    two names (a shared submodule) is yielded under both.
    """
    todo: list[tuple[_PathNode | None, Any]] = [(None, root)]
    expanded: dict[int, int] = {}
    on_path: set[int] = set()  # containers being expanded above the current one: a cycle
    while todo:
        node, obj = todo.pop()
        if isinstance(obj, _Leave):
            on_path.discard(obj.ident)
        elif _is_tensor_call(obj):
            entry = _tensor_entry(node.parts() if node else (), obj, storages)
            if entry is not None:
                yield entry
        elif id(obj) not in on_path and expanded.get(id(obj), 0) < _MAX_NAMES_PER_OBJECT:
            expanded[id(obj)] = expanded.get(id(obj), 0) + 1
            on_path.add(id(obj))
            todo.append((None, _Leave(id(obj))))
            for key, child in reversed(list(_children(obj))):
                todo.append((_PathNode(node, key), child))


@dataclass(frozen=True)
class _Leave:
    """Marks, on the walk's stack, the end of a container's expansion."""

    ident: int


def _children(obj: Any) -> Iterator[tuple[str | int, Any]]:
    if isinstance(obj, SymDict):
        pairs: list[tuple[Any, Any]] = obj.items
    elif isinstance(obj, Call):
        state = obj.state
        pairs = list(obj.items)
        if isinstance(state, SymDict):
            pairs += state.items
        elif isinstance(state, tuple) and state and isinstance(state[0], SymDict):
            pairs += state[0].items
    elif isinstance(obj, (SymList, tuple)):
        items = obj.items if isinstance(obj, SymList) else obj
        yield from enumerate(items)
        return
    else:
        return
    for key, value in pairs:
        key = _text(key)
        if isinstance(key, (str, int)) and not isinstance(key, bool):
            yield key, value


def _tensor_entry(
    path: tuple[str | int, ...], call: Call, storages: dict[str, StorageRef]
) -> TensorEntry | None:
    keys = _storage_keys(call)
    base = _find_rebuild_v2(call)
    name = ".".join(str(part) for part in path)
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
        elif isinstance(item, tuple):
            todo.extend(reversed(item))
        elif isinstance(item, SymList):
            todo.extend(reversed(item.items))
        elif isinstance(item, SymDict):
            todo.extend(v for pair in item.items for v in pair)
    return tuple(keys)
