"""The compact table: a plain checkpoint's object, described once by the daemon, rebuilt by
a client without unpickling the checkpoint.

The daemon's scan already knows every tensor's storage, offset, dtype, shape, stride and
whether it is a Parameter. For a checkpoint the plain rebuild (:mod:`ckptd.engine._rebuild`)
proves plain, :func:`describe_table` turns the scan's record into a :class:`TableSpec`: the
storages in the order torch's ``persistent_load`` meets them, and the object's containers
pickled with one persistent id per tensor (a row of numbers). The daemon does this once
per checkpoint, not per load. :func:`rebuild_from_table` then builds torch.load's object
from it: the containers come out of Python's C unpickler, which may make nothing but
``collections.OrderedDict`` (``find_class`` refuses every other global), and each tensor
is made by the same calls ``torch._utils._rebuild_tensor_v2`` makes. Identity follows the
checkpoint's pickle: a tensor reached twice is one object (the pickle memo), tensors on one
storage share one storage object (torch's storage cache by key, empty storages never
cached), Parameters and ``requires_grad`` are kept, and so is an OrderedDict's ``_metadata``.

Anything the plain rebuild would refuse gets no table: the client then loads as before
(torch's unpickler or the plain rebuild on the checkpoint's own pickle).
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import _weights_only_unpickler

from ckptd.formats import Call, Format, Global, Layout, PersistentId, no_gc, scan, storage_dtype

from ._placement import MapLocation, restore
from ._plan import Kind, target_for
from ._rebuild import _TENSOR_V2, _Builder, _ints, _modes_active, _NotPlain, plain_opcodes, storage_pid

# Table format version: a client refuses a table it cannot read (it then asks without one).
VERSION = 1
_META = torch.device("meta")
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class TableSpec:
    """A plain checkpoint described for a table: ``storages`` holds, per storage reference
    of the pickle (in order), its key, bytes and saved location; ``obj`` is the pickled object with tensor rows as
    persistent ids: ``(reference, dtype name, offset, size, stride, requires_grad, parameter)``
    where ``parameter`` is ``None`` for a tensor and the Parameter's ``requires_grad`` for one."""

    storages: tuple[tuple[str, int, str], ...]
    obj: bytes


class _Ref:
    """A tensor in the described object: pickled as its row (a persistent id)."""

    __slots__ = ("row",)

    def __init__(self, row: tuple[Any, ...]) -> None:
        self.row = row


class _RowPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:  # noqa: D102 - pickle's hook
        return obj.row if type(obj) is _Ref else None


class _Describer(_Builder):
    """The plain rebuild's walk, making rows instead of tensors (nothing is read or allocated).

    What the table cannot say is refused: a backward-hooks dict or a Parameter's inner
    tensor that the pickle also reaches another way (torch.load would share the object).
    """

    def __init__(self, layout: Layout) -> None:
        super().__init__(storages=None, dry=True)  # type: ignore[arg-type]  # never asked for a storage
        self.layout = layout
        self.references: list[tuple[str, int, str]] = []
        self.private: set[int] = set()  # ids of objects only their tensor may reach

    def build(self, obj: Any, depth: int) -> Any:
        if id(obj) in self.private:
            raise _NotPlain
        return super().build(obj, depth)

    def _hooks(self, hooks: Any) -> OrderedDict[Any, Any]:
        if id(hooks) in self.memo:
            raise _NotPlain  # shared between tensors: each client tensor gets its own
        built = super()._hooks(hooks)
        self.private.add(id(hooks))
        return built

    def _tensor(self, call: Any) -> Any:
        args = call.args
        if type(args) is not tuple or len(args) not in (6, 7) or (len(args) == 7 and args[6]):
            raise _NotPlain
        pid, offset, size, stride, requires_grad, hooks = args[:6]
        if type(pid) is not PersistentId or type(offset) is not int or not _ints(size) or not _ints(stride):
            raise _NotPlain
        if type(requires_grad) is not bool:
            raise _NotPlain
        reference, dtype = self._reference(pid)
        self._hooks(hooks)
        return _Ref((reference, str(dtype).removeprefix("torch."), offset, size, stride, requires_grad, None))

    def _parameter(self, call: Any, depth: int) -> Any:
        args = call.args
        if type(args) is not tuple or len(args) != 3 or type(args[1]) is not bool:
            raise _NotPlain
        data, requires_grad, hooks = args
        if type(data) is not Call or type(data.func) is not Global:
            raise _NotPlain
        if (data.func.module, data.func.name) != _TENSOR_V2 or id(data) in self.memo:
            raise _NotPlain  # the inner tensor reached before: torch.load shares it with the Parameter
        inner = self.build(data, depth + 1)
        self.private.add(id(data))
        self._hooks(hooks)
        *row, _ = inner.row
        return _Ref((*row, requires_grad))

    def _reference(self, pid: PersistentId) -> tuple[int, torch.dtype]:
        """One storage reference (torch's persistent_load call): its index and the tensor dtype."""
        found = self.memo.get(id(pid))
        if found is not None:
            return found  # type: ignore[no-any-return]
        self.pids += 1
        storage_type, key, location = storage_pid(pid)
        record = self.layout.storages.get(key)
        if record is None:
            raise _NotPlain
        found = (len(self.references), storage_dtype(storage_type, ""))
        self.references.append((key, record.nbytes, location))
        self.memo[id(pid)] = found
        return found


def describe_table(layout: Layout) -> TableSpec | None:
    """The table of a plain torch.save checkpoint, or ``None`` where it has none.

    >>> import io, torch
    >>> from ckptd.formats import open_source, read_layout
    >>> buf = io.BytesIO(); torch.save({"w": torch.ones(2), "b": torch.zeros(1)}, buf)
    >>> describe_table(read_layout(open_source(buf.getvalue()))).storages
    (('0', 8, 'cpu'), ('1', 4, 'cpu'))
    """
    if layout.format is not Format.TORCH_ZIP or layout.pickle is None or not plain_opcodes(layout.pickle):
        return None
    scanned = layout.scanned if layout.scanned is not None else scan(layout.pickle, layout.name, names=False)
    if not scanned.utf8:
        return None
    describer = _Describer(layout)
    with no_gc():
        try:
            obj = describer.build_root(scanned)
        except _NotPlain:
            return None
    out = io.BytesIO()
    _RowPickler(out, protocol=4).dump(obj)
    return TableSpec(tuple(describer.references), out.getvalue())


def table_applies(pickle_module: Any, load_args: Mapping[str, Any], map_location: MapLocation) -> bool:
    """Whether a load with these options may be rebuilt from a table: where the plain
    rebuild would apply (torch's pickle modules, default arguments, no torch modes), and
    ``map_location`` is not a callable (torch calls it once per storage, in pickle order).

    >>> import pickle
    >>> table_applies(pickle, {"encoding": "utf-8"}, "cpu"), table_applies(pickle, {"encoding": "latin1"}, "cpu")
    (True, False)
    """
    return (
        pickle_module in (pickle, _weights_only_unpickler)
        and load_args == {"encoding": "utf-8"}
        and not callable(map_location)
        and not _modes_active()
    )


def encode_table(spec: TableSpec, where: Mapping[str, tuple[str, int]]) -> bytes:
    """The table a client gets: each storage reference with its place (``where[key]`` is
    ``(arena id, offset)``; a key absent was not made resident: empty, or sent to meta).

    >>> import pickle
    >>> spec = TableSpec((("0", 8, "cpu"),), pickle.dumps({}))
    >>> version, refs, obj = pickle.loads(encode_table(spec, {"0": ("a1", 64)}))
    >>> version, refs
    (1, [('0', 8, 'cpu', 'a1', 64)])
    """
    refs = [(key, nbytes, location, *where.get(key, (None, 0))) for key, nbytes, location in spec.storages]
    return pickle.dumps((VERSION, refs, spec.obj), protocol=4)


def table_bytes(table: bytes, map_location: MapLocation) -> int:
    """The bytes of the distinct storages a table's load returns (``meta`` targets have
    none): what a daemon load reports to ``progress``, as many as an embedded load reports
    reading.

    >>> spec = TableSpec((("0", 8, "cpu"), ("0", 8, "cpu"), ("1", 4, "cpu")), pickle.dumps({}))
    >>> table = encode_table(spec, {"0": ("a1", 64), "1": ("a1", 128)})
    >>> table_bytes(table, None), table_bytes(table, "meta")
    (12, 0)
    """
    _, refs, _ = _DataOnly(io.BytesIO(table)).load()
    returned: dict[str, bool] = {}  # per saved location: whether its target holds bytes
    sizes = {}
    for key, nbytes, location, arena, _ in refs:
        holds = returned.get(location)
        if holds is None:
            holds = returned[location] = target_for(map_location, location).kind is not Kind.META
        if holds and arena is not None:
            sizes[key] = nbytes
    return sum(sizes.values())


class _DataOnly(pickle.Unpickler):
    """The table's own unpickler: no global at all, or ``collections.OrderedDict`` for the object."""

    allowed: frozenset[tuple[str, str]] = frozenset()

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - pickle's hook
        if (module, name) in self.allowed:
            return OrderedDict
        raise pickle.UnpicklingError(f"a ckptd table names {module}.{name}; it may name collections.OrderedDict only")


class _ObjectUnpickler(_DataOnly):
    allowed = frozenset({("collections", "OrderedDict")})


def rebuild_from_table(
    table: bytes,
    arenas: Mapping[str, torch.UntypedStorage],
    placed: frozenset[str],
    map_location: MapLocation,
) -> Any:
    """torch.load's object for a plain checkpoint, from its table and the mapped arenas.

    ``arenas`` are the mapped arenas by id, ``placed`` the ids of arenas already on their
    device (the daemon's GPU arenas); ``map_location`` (not a callable) is applied as torch's ``restore_location``.

    >>> import io, pickle, torch
    >>> from ckptd.formats import open_source, read_layout
    >>> buf = io.BytesIO(); torch.save({"w": torch.arange(3.0)}, buf)
    >>> layout = read_layout(open_source(buf.getvalue()))
    >>> arena = torch.arange(3.0).untyped_storage()  # the daemon's arena, mapped
    >>> table = encode_table(describe_table(layout), {"0": ("a", 0)})
    >>> rebuild_from_table(table, {"a": arena}, frozenset(), "cpu")
    {'w': tensor([0., 1., 2.])}
    """
    with no_gc():  # tens of thousands of rows and tensors: a collection walking a worker's heap per few hundred
        version, refs, obj = _DataOnly(io.BytesIO(table)).load()
        if version != VERSION:
            raise ValueError(f"table version {version}, this client reads version {VERSION}")
        storages = _Storages(refs, arenas, placed, map_location).resolve()
        unpickler = _ObjectUnpickler(io.BytesIO(obj))
        unpickler.persistent_load = _tensor_maker(storages)  # type: ignore[method-assign]
        return unpickler.load()


class _Storages:
    """The storage object of each reference, as torch's ``persistent_load`` returns it."""

    def __init__(
        self, refs: list[tuple[str, int, str, str | None, int]],
        arenas: Mapping[str, torch.UntypedStorage], placed: frozenset[str], map_location: MapLocation,
    ) -> None:
        self.refs, self.arenas, self.placed = refs, arenas, placed
        self.map_location = map_location
        self.targets: dict[str, tuple[str, torch.device]] = {}

    def resolve(self) -> list[torch.UntypedStorage]:
        cache: dict[str, torch.UntypedStorage] = {}  # torch's loaded_storages: by key, non-empty only
        arenas, placed = self.arenas, self.placed
        as_is: dict[str, bool] = {}  # saved location -> its storages stay in host memory
        out = []
        append = out.append
        for key, nbytes, location, arena, offset in self.refs:  # tens of thousands: kept lean
            storage = cache.get(key)
            if storage is None:
                if arena is not None and arena in placed:  # already on its GPU: no target worked out
                    storage = arenas[arena][offset : offset + nbytes]
                else:
                    host = as_is.get(location)
                    if host is None:
                        host = as_is[location] = self._target(location)[1] == _CPU
                    if arena is not None and host:  # a host arena's view is final
                        storage = arenas[arena][offset : offset + nbytes]
                    else:
                        storage = self._storage(nbytes, location, arena, offset)
                if nbytes or storage.data_ptr() != 0:  # (a view of nbytes > 0 has an address)
                    cache[key] = storage
            append(storage)
        return out

    def _storage(self, nbytes: int, location: str, arena: str | None, offset: int) -> torch.UntypedStorage:
        if arena is None:  # nothing resident: an empty storage, or one map_location sends to meta
            view = torch.UntypedStorage(nbytes, device=_META if nbytes else _CPU)
        else:
            view = self.arenas[arena][offset : offset + nbytes]
            if arena in self.placed:
                return view
        tag, device = self._target(location)
        return view if view.device == device else restore(view, tag)

    def _target(self, location: str) -> tuple[str, torch.device]:
        found = self.targets.get(location)
        if found is None:
            target = target_for(self.map_location, location)  # the placement plan's rules
            if target.tag is None or target.device is None:
                raise ValueError("a callable map_location is applied by the client's own rebuild, not from a table")
            found = self.targets[location] = (target.tag, target.device)
        return found


def _tensor_maker(storages: list[torch.UntypedStorage]) -> Callable[[tuple[Any, ...]], torch.Tensor]:
    """persistent_load for the table's object: a row in, a tensor (or Parameter) out, made
    as ``torch._utils._rebuild_tensor_v2`` (and ``_rebuild_parameter``) make it."""
    empties: dict[tuple[str, torch.device], torch.Tensor] = {}
    rebuild_parameter = torch._utils._rebuild_parameter
    # A tensor reached twice is one row object (the pickler memoizes the row tuple it wrote
    # as a persistent id; the unpickler's memo keeps it alive): one tensor object.
    made: dict[int, torch.Tensor] = {}

    def tensor(row: tuple[Any, ...]) -> torch.Tensor:  # once per tensor: kept in one lean function
        out = made.get(id(row))
        if out is not None:
            return out
        reference, dtype_name, offset, size, stride, requires_grad, parameter = row
        storage = storages[reference]
        device = storage.device
        empty = empties.get((dtype_name, device))
        if empty is None:
            empty = empties[dtype_name, device] = torch.empty((0,), dtype=_dtype(dtype_name), device=device)
        # Tensor.new(): what torch.empty((0,), dtype, device) makes, at half its cost
        out = empty.new().set_(storage, offset, size, stride)
        if requires_grad:
            out.requires_grad = True
        out._backward_hooks = OrderedDict()
        if parameter is not None:
            out = rebuild_parameter(out, parameter, OrderedDict())
        made[id(row)] = out
        return out

    return tensor


def _dtype(name: str) -> torch.dtype:
    found = getattr(torch, name, None)
    if not isinstance(found, torch.dtype):
        raise ValueError(f"a ckptd table names dtype {name!r}, which this torch lacks")
    return found
