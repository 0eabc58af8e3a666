"""The placement plan: where each storage of a load goes, decided once, in this one module.

For every storage a load needs, :func:`plan_storages` decides its :class:`Target` (as
torch.load's ``map_location`` would: host memory, a device of this process, a GPU by
UUID in the daemon's GPU tier, ``meta`` or a callable's result) and, for those whose
bytes are read, the arena they are read into and their offset in it. The embedded reader
(:func:`ckptd.engine.read_storages`) allocates and fills the plan's arenas, the daemon's
cache records the plan's offsets in its manifests, and its GPU tier lays its arenas out
with :func:`lay_out`. Changing how a storage is placed is a change here.

torch.load's rules, per storage saved at ``location``: ``None`` keeps ``location``; a
string or :class:`torch.device` replaces every tag; a dict remaps the tags it lists; a
callable gets the storage, read on the CPU, with its tag, and its result (or, for
``None``, the default placement) is the storage. ``meta`` targets read nothing; empty
storages are read nowhere (torch gives them no data). Big-endian files are read and
swapped on the host, then copied to their device.

>>> import io, torch
>>> from ckptd.formats import open_source, read_layout
>>> buf = io.BytesIO(); torch.save({"a": torch.zeros(3), "b": torch.ones(2)}, buf)
>>> layout = read_layout(open_source(buf.getvalue()))
>>> plan = plan_storages(layout, layout.storages, "cpu")
>>> [(s.key, s.target.kind.value, s.arena, s.offset, s.nbytes) for s in plan.storages.values()]
[('0', 'host', 0, 0, 12), ('1', 'host', 0, 128, 8)]
>>> plan_storages(layout, layout.storages, "meta").arenas
()
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import torch

from ckptd.formats import Layout, StorageRecord
from ckptd.gpu import Copy, missing_cuda_device, pack

from ._exceptions import DeviceError, UsageError
from ._placement import MapLocation, device_for_tag, target_tag

_CPU = torch.device("cpu")


class Kind(enum.Enum):
    """What a storage's target is."""

    HOST = "host"  # host memory: a CPU arena
    DEVICE = "device"  # another device of this process (cuda:N, mps, ...), read straight there
    GPU = "gpu"  # a GPU by UUID, in the daemon's GPU tier
    META = "meta"  # no bytes: torch reads nothing for meta
    CALLABLE = "callable"  # read on the host; the callable's result is the storage


@dataclass(frozen=True)
class Target:
    """Where ``map_location`` sends storages saved at one location tag.

    ``tag`` is the tag ``map_location`` gives (``None``: a callable decides), ``device``
    the device the storage ends on (``None`` for a callable), ``gpu`` the GPU's UUID for
    the daemon's GPU tier.
    """

    kind: Kind
    tag: str | None
    device: torch.device | None
    gpu: str | None = None

    def read_on(self, swap: bool) -> torch.device | None:
        """The device the bytes are read to (``None``: not read here: meta, or the GPU tier's).

        >>> Target(Kind.CALLABLE, None, None).read_on(False)
        device(type='cpu')
        """
        if self.kind in (Kind.META, Kind.GPU):
            return None
        if self.device is None or swap:  # a callable gets a CPU storage; swapped bytes are swapped on the host
            return _CPU
        return self.device


@dataclass(frozen=True)
class StoragePlan:
    """One storage's place: its target, and, if its bytes are read, the arena (an index
    into :attr:`Plan.arenas`) and its offset there."""

    key: str
    location: str
    target: Target
    arena: int | None
    offset: int
    nbytes: int
    dtype: torch.dtype


@dataclass(frozen=True)
class ArenaPlan:
    """One arena to allocate on ``device`` (``nbytes`` long) and the file ranges to copy
    into it; ``useful`` of the copied bytes are storages' (a merged read spans the gaps)."""

    device: torch.device
    nbytes: int
    copies: tuple[Copy, ...]
    useful: int


@dataclass(frozen=True)
class Plan:
    """Every storage of a load (:class:`StoragePlan` by key) and the arenas they are read into."""

    storages: Mapping[str, StoragePlan]
    arenas: tuple[ArenaPlan, ...]

    def in_arena(self, index: int) -> list[StoragePlan]:
        """The storages read into arena ``index``."""
        return [s for s in self.storages.values() if s.arena == index]


def target_for(map_location: MapLocation, location: str, gpus: Mapping[str, str] | None = None) -> Target:
    """Where ``map_location`` sends a storage saved at ``location``, with torch's errors for
    devices that do not exist. With ``gpus`` (a client's ``cuda:N`` → UUID table: the
    daemon's plan) a CUDA target is that GPU, by UUID, and every other target host memory,
    where the daemon holds the storage for its client to place.

    >>> target_for({"cuda:1": "cpu"}, "cuda:1"), target_for("meta", "cpu").kind
    (Target(kind=<Kind.HOST: 'host'>, tag='cpu', device=device(type='cpu'), gpu=None), <Kind.META: 'meta'>)
    >>> target_for("cuda:1", "cpu", {"cuda:0": "GPU-a", "cuda:1": "GPU-b"}).gpu
    'GPU-b'
    """
    tag = target_tag(map_location, location)
    if tag is None:
        return Target(Kind.CALLABLE, None, None)
    if gpus is not None:  # the daemon's plan: CUDA targets on its GPUs; it holds the rest in host memory
        if tag == "cuda" or tag.startswith("cuda:"):
            return Target(Kind.GPU, tag, None, gpu_uuid(tag, gpus))
        return Target(Kind.HOST, tag, _CPU)  # the client places them (and raises torch's errors)
    device = device_for_tag(tag)
    kind = {"cpu": Kind.HOST, "meta": Kind.META}.get(device.type, Kind.DEVICE)
    return Target(kind, tag, device)


def gpu_uuid(tag: str, gpus: Mapping[str, str]) -> str:
    """The UUID of the GPU ``tag`` (``cuda:N``) names in a client's table, with torch's error
    when the client has no such GPU. A bare ``cuda`` names the *client thread's* current
    device, which only the client knows: it sends ``cuda:N`` (guessing 0 here would put
    the storages on the wrong GPU).

    >>> gpu_uuid("cuda:0", {"cuda:0": "GPU-a"})
    'GPU-a'
    """
    if tag == "cuda":
        raise UsageError(
            "map_location 'cuda' names the client's current device; the client resolves it to 'cuda:N' "
            "before asking the daemon (ckptd.Client does)"
        )
    try:
        index = int(tag.split(":", 1)[1])
    except ValueError as exc:
        raise DeviceError(f"Invalid device string: '{tag}'") from exc
    if index < 0:
        raise DeviceError(f"Device index must not be negative: '{tag}'")
    uuid = gpus.get(f"cuda:{index}")
    if uuid is None:
        raise missing_cuda_device(index, len(gpus))
    return uuid


def plan_storages(
    layout: Layout, keys: Collection[str], map_location: MapLocation, gpus: Mapping[str, str] | None = None
) -> Plan:
    """The plan of a load of ``keys``: each storage's target, and one arena per device
    its bytes are read to, storages at aligned offsets.

    Storages that lie close together in the file are laid out as the file has them and
    read as one span (the few bytes between them come along): a checkpoint of 20,000
    small tensors costs a few large reads, not 20,000 small ones.
    """
    swap = layout.byteorder != sys.byteorder
    records = [layout.storages[key] for key in keys]
    targets: dict[str, Target] = {}
    groups: dict[torch.device, list[StorageRecord]] = {}
    for record in records:
        target = targets.get(record.location)
        if target is None:
            target = targets[record.location] = target_for(map_location, record.location, gpus)
        device = target.read_on(swap)
        if record.nbytes and device is not None:  # torch gives empty storages no data pointer
            groups.setdefault(device, []).append(record)
    places: dict[str, tuple[int, int]] = {}
    arenas: list[ArenaPlan] = []
    for index, (device, group) in enumerate(groups.items()):
        offsets, nbytes, copies, useful = lay_out(group, merge=True)
        places.update((key, (index, offset)) for key, offset in offsets.items())
        arenas.append(ArenaPlan(device, nbytes, tuple(copies), useful))
    storages = {
        r.key: StoragePlan(r.key, r.location, targets[r.location], *places.get(r.key, (None, 0)), r.nbytes, r.dtype)
        for r in records
    }
    return Plan(storages, tuple(arenas))


def lay_out(records: Iterable[StorageRecord], *, merge: bool) -> tuple[dict[str, int], int, list[Copy], int]:
    """Offsets of ``records`` in one arena, its size, the copies from the file that fill it,
    and how many storage bytes those copies carry.

    ``merge``: small storages close together in the file share one read (sorted by file
    offset); without it, each storage is read alone, laid out in the order given (the
    daemon's GPU tier, which fills storage by storage from wherever they are resident).

    >>> from ckptd.formats import StorageRecord
    >>> records = [StorageRecord(k, torch.uint8, n, "cpu", o, n) for k, o, n in (("b", 128, 8), ("a", 0, 8))]
    >>> lay_out(records, merge=True)[:2], lay_out(records, merge=False)[:2]
    (({'a': 0, 'b': 128}, 136), ({'b': 0, 'a': 64}, 72))
    """
    runs = _runs(list(records)) if merge else [_Run([r], r.offset, r.nbytes, r.compressed_size is None) for r in records]
    starts, span = pack(run.nbytes for run in runs)
    offsets: dict[str, int] = {}
    copies: list[Copy] = []
    useful = 0
    for run, start in zip(runs, starts):
        for record in run.records:
            offsets[record.key] = start + record.offset - run.start
        if run.copied:  # deflated storages are inflated into their place, not copied
            copies.append(Copy(run.start, start, run.nbytes))
            useful += sum(record.nbytes for record in run.records)
    return offsets, span, copies, useful


# Small storages at most this many bytes apart in the file are read as one span: zip local
# headers (and torch's 64-byte alignment padding) between two storages are a few hundred
# bytes. Storages of _MERGE_BELOW bytes or more are read on their own, as the file has them:
# for those a read's overhead is already small beside its bytes.
_MERGE_GAP = 512
_MERGE_BELOW = 64 << 10
_ALIGNED = 64


@dataclass
class _Run:
    """Storages read with one copy: the file's bytes from ``start``, ``nbytes`` long."""

    records: list[StorageRecord]
    start: int
    nbytes: int
    copied: bool

    def takes(self, record: StorageRecord) -> bool:
        """Whether ``record`` joins this run (aligned as in the file, close enough, read plainly)."""
        gap = record.offset - (self.start + self.nbytes)
        aligned = self.start % _ALIGNED == 0 and record.offset % _ALIGNED == 0  # the arena keeps each storage aligned
        small = record.nbytes < _MERGE_BELOW and self.records[-1].nbytes < _MERGE_BELOW
        return self.copied and record.compressed_size is None and aligned and small and 0 <= gap <= _MERGE_GAP


def _runs(records: list[StorageRecord]) -> list[_Run]:
    runs: list[_Run] = []
    for record in sorted(records, key=lambda r: r.offset):
        if runs and runs[-1].takes(record):
            run = runs[-1]
            run.records.append(record)
            run.nbytes = record.offset + record.nbytes - run.start
        else:
            runs.append(_Run([record], record.offset, record.nbytes, record.compressed_size is None))
    return runs
