"""The symbolic pickle scanner: runs nothing, imports nothing, fails cleanly, decodes torch's pickles."""

from __future__ import annotations

import builtins
import collections
import contextlib
import io
import os
import pickle
import pickletools
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptd.formats import CheckpointError, UnsupportedFormatError
from ckptd.formats._pickle_scan import Call, Global, PersistentId, ScanResult, scan
from ckptd_testlib import tensor_storage_bytes

NAME = "/some/dir/hostile.pt"

# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Fail (TimeoutError) if the block runs longer than ``seconds`` (SIGALRM; main thread)."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _ImportRecorder:
    """A meta-path finder that records every import attempt and lets none through itself."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        self.seen.append(fullname)
        return None


@contextlib.contextmanager
def _no_effects(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Replace the usual hostile targets with recorders; yield the list of calls made."""
    calls: list[str] = []

    def recorder(label: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> int:
            calls.append(label)
            return 0

        return record

    monkeypatch.setattr(os, "system", recorder("os.system"))
    monkeypatch.setattr(builtins, "eval", recorder("eval"))
    monkeypatch.setattr(subprocess, "call", recorder("subprocess.call"))
    monkeypatch.setattr(subprocess, "Popen", recorder("subprocess.Popen"))
    yield calls


def _depth(obj: Any) -> int:
    """How many lists are nested at obj (iteratively; the first item of each)."""
    depth = 0
    while isinstance(obj, list):
        depth += 1
        obj = obj[0] if obj else None
    return depth


def _data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        return archive.read(name)


def _record(path: Path, key: str) -> bytes:
    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(f"/data/{key}")]
        return archive.read(name)


# ---------------------------------------------------------------------------------------
# nothing runs
# ---------------------------------------------------------------------------------------


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> Any:
        return (os.system, (self.command,))


class _Eval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (builtins.eval, (f"__import__('pathlib').Path({str(self.marker)!r}).touch()",))


class _Subprocess:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (subprocess.call, (["touch", str(self.marker)],))


def _hostile(kind: str, marker: Path) -> object:
    return {
        "system": lambda: _System(f"touch {marker}"),
        "eval": lambda: _Eval(marker),
        "subprocess": lambda: _Subprocess(marker),
    }[kind]()


_EXPECTED_FUNC = {
    # protocols 0-2 write Python 2 names (fix_imports): __builtin__.eval, commands.call
    "system": ({"os", "posix", "nt"}, "system"),
    "eval": ({"builtins", "__builtin__"}, "eval"),
    "subprocess": ({"subprocess", "commands"}, "call"),
}


def test_hostile_fixture_is_live(tmp_path: Path) -> None:
    """The payloads really do act when unpickled (so the tests below can fail)."""
    for kind in ("system", "eval", "subprocess"):
        marker = tmp_path / f"live-{kind}"
        pickle.loads(pickle.dumps(_hostile(kind, marker)))
        assert marker.exists(), kind


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("kind", ["system", "eval", "subprocess"])
def test_hostile_pickle_is_scanned_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, protocol: int
) -> None:
    marker = tmp_path / "marker"
    data = pickle.dumps(_hostile(kind, marker), protocol=protocol)
    with _no_effects(monkeypatch) as calls:
        result = scan(data, NAME)
    assert calls == []
    assert not marker.exists()
    root = result.root
    assert isinstance(root, Call)
    assert isinstance(root.func, Global)
    modules, name = _EXPECTED_FUNC[kind]
    assert root.func.module in modules and root.func.name == name
    assert isinstance(root.args, tuple) and len(root.args) == 1
    assert result.storages == {} and result.tensors == []
    assert result.end == len(data)


def _raw_os_system(marker: Path) -> bytes:
    return b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."


def test_raw_global_os_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "marker"
    data = _raw_os_system(marker)
    pickletools.dis(data, out=io.StringIO())  # a well-formed pickle
    with _no_effects(monkeypatch) as calls:
        result = scan(data, NAME)
    assert calls == [] and not marker.exists()
    assert isinstance(result.root, Call)
    assert isinstance(result.root.func, Global)
    assert (result.root.func.module, result.root.func.name) == ("os", "system")
    assert result.root.func.qualname == "os.system"
    assert result.root.args == (f"touch {marker}",)


def test_raw_os_system_is_live(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    pickle.loads(_raw_os_system(marker))
    assert marker.exists()


@pytest.mark.parametrize(
    "data",
    [
        b"cos\nsystem\n(S'true'\ntR.",  # GLOBAL + TUPLE + REDUCE
        b"(S'true'\nios\nsystem\n.",  # INST
        b"(cos\nsystem\nS'true'\no.",  # OBJ
        b"\x80\x04\x95\x16\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93\x8c\x04true\x85R.",  # STACK_GLOBAL
        b"\x80\x02cos\nsystem\n)\x81.",  # NEWOBJ
        b"\x80\x04cos\nsystem\n)}\x92.",  # NEWOBJ_EX
    ],
    ids=["reduce", "inst", "obj", "stack_global", "newobj", "newobj_ex"],
)
def test_every_call_opcode_is_recorded_not_run(data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    with _no_effects(monkeypatch) as calls:
        result = scan(data, NAME)
    assert calls == []
    assert isinstance(result.root, Call)
    assert isinstance(result.root.func, Global)
    assert (result.root.func.module, result.root.func.name) == ("os", "system")


def test_build_and_setstate_are_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # BUILD on an object whose class defines __setstate__ would call it; here nothing is called
    data = b"\x80\x02cos\nsystem\n)\x81}X\x01\x00\x00\x00aK\x01sb."
    with _no_effects(monkeypatch) as calls:
        result = scan(data, NAME)
    assert calls == []
    assert isinstance(result.root, Call)
    assert result.root.state == {"a": 1}


@pytest.mark.parametrize("module", ["antigravity", "ckptd_never_imported", "ckptd_never.imported.deep", "this"])
def test_no_module_is_imported(module: str) -> None:
    assert module not in sys.modules
    data = f"c{module}\nfly\n)R.".encode()
    scan(b"\x80\x02K\x01.", NAME)  # warm-up: anything the scanner itself imports lazily
    recorder = _ImportRecorder()
    before = set(sys.modules)
    sys.meta_path.insert(0, recorder)
    try:
        result = scan(data, NAME)
    finally:
        sys.meta_path.remove(recorder)
    assert set(sys.modules) == before
    assert recorder.seen == []
    assert module not in sys.modules
    assert isinstance(result.root, Call) and result.root.func.module == module


def test_import_recorder_is_live() -> None:
    recorder = _ImportRecorder()
    sys.meta_path.insert(0, recorder)
    try:
        with pytest.raises(ModuleNotFoundError):
            __import__("ckptd_never_imported")
    finally:
        sys.meta_path.remove(recorder)
    assert recorder.seen == ["ckptd_never_imported"]


def test_persistent_id_is_data(monkeypatch: pytest.MonkeyPatch) -> None:
    # a persistent id that names os.system as its "storage type" is only a name
    data = b"\x80\x02(X\x07\x00\x00\x00storagecos\nsystem\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ."
    with _no_effects(monkeypatch) as calls:
        with pytest.raises(CheckpointError, match="not a storage class") as info:
            scan(data, NAME)
    assert calls == []
    assert info.value.name == NAME


# ---------------------------------------------------------------------------------------
# malformed pickles fail with CheckpointError naming the file
# ---------------------------------------------------------------------------------------


def _truncations() -> list[tuple[str, bytes]]:
    whole = pickle.dumps({"a": [1, 2.5, "x" * 10], "b": (None, True)}, protocol=2)
    return [(f"truncated-{n}", whole[:n]) for n in range(0, len(whole))]


_MALFORMED = [
    ("empty", b""),
    ("only-proto", b"\x80\x02"),
    ("missing-stop", b"\x80\x02K\x01"),
    ("missing-stop-proto0", b"I1\n"),
    ("stop-on-empty-stack", b"."),
    ("get-before-put", b"\x80\x02h\x05."),
    ("long-get-before-put", b"\x80\x02j\x05\x00\x00\x00."),
    ("text-get-before-put", b"g7\n."),
    ("put-on-empty-stack", b"\x80\x02q\x00."),
    ("memoize-on-empty-stack", b"\x80\x04\x94."),
    ("reduce-underflow", b"\x80\x02R."),
    ("reduce-one-item", b"\x80\x02K\x01R."),
    ("append-underflow", b"\x80\x02a."),
    ("append-to-int", b"\x80\x02K\x01K\x02a."),
    ("appends-without-mark", b"\x80\x02]K\x01e."),
    ("setitem-underflow", b"\x80\x02}s."),
    ("setitem-on-list", b"\x80\x02]K\x01K\x02s."),
    ("setitems-without-mark", b"\x80\x02}K\x01K\x02u."),
    ("dict-without-mark", b"\x80\x02K\x01K\x02d."),
    ("tuple-without-mark", b"\x80\x02K\x01t."),
    ("list-without-mark", b"\x80\x02K\x01l."),
    ("pop-mark-without-mark", b"\x80\x021."),
    ("pop-underflow", b"\x80\x020."),
    ("dup-underflow", b"\x80\x022."),
    ("build-underflow", b"\x80\x02b."),
    ("stack-global-underflow", b"\x80\x04\x93."),
    ("stack-global-ints", b"\x80\x04K\x01K\x02\x93."),
    ("binpersid-underflow", b"\x80\x02Q."),
    ("newobj-underflow", b"\x80\x02\x81."),
    ("obj-empty-mark", b"\x80\x02(o."),
    ("bad-opcode", b"\x80\x02\xff."),
    ("bad-int-text", b"Ixyz\n."),
    ("binunicode-too-long", b"\x80\x02X\xff\x00\x00\x00abc."),
    ("binbytes-too-long", b"\x80\x03B\x00\x00\x00\x10abc."),
    ("bad-utf8", b"\x80\x02X\x02\x00\x00\x00\xff\xfe."),
    ("persid-not-tuple", b"\x80\x02K\x05Q."),
    ("persid-unknown-kind", b"\x80\x02X\x03\x00\x00\x00abc\x85Q."),
    ("persid-bad-numel", b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ\xff\xff\xff\xfftQ."),
    ("persid-unknown-storage", b"\x80\x02(X\x07\x00\x00\x00storagectorch\nWeirdStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ."),
    *_truncations(),
]


@pytest.mark.parametrize("data", [d for _, d in _MALFORMED], ids=[n for n, _ in _MALFORMED])
def test_malformed_pickle_is_checkpoint_error(data: bytes) -> None:
    with pytest.raises(CheckpointError) as info:
        scan(data, NAME)
    assert info.value.name == NAME
    assert str(info.value).startswith(f"{NAME}: ")


def test_malformed_pickle_errors_are_not_bare_builtins() -> None:
    # the same inputs, checked for the exception *type* exactly: never IndexError, KeyError...
    for label, data in _MALFORMED:
        try:
            scan(data, NAME)
        except CheckpointError:
            continue
        except Exception as exc:  # pragma: no cover - a failure report
            pytest.fail(f"{label}: {type(exc).__name__}: {exc}")
        pytest.fail(f"{label}: scanned without error")


@pytest.mark.parametrize(
    "data",
    [b"\x80\x02\x85.", b"\x80\x02\x86.", b"\x80\x02K\x01\x86.", b"\x80\x02K\x01K\x02\x87.", b"\x80\x02K\x01(K\x02\x86."],
    ids=["tuple1-empty", "tuple2-empty", "tuple2-one", "tuple3-two", "tuple2-across-mark"],
)
def test_short_tuple_underflow_is_checkpoint_error(data: bytes) -> None:
    with pytest.raises(pickle.UnpicklingError):  # what Python's own unpickler says
        pickle.loads(data)
    with pytest.raises(CheckpointError, match=NAME):
        scan(data, NAME)


@pytest.mark.parametrize("payload", [b"abcdef", bytearray(b"abcdef")], ids=["readonly", "writable"])
def test_out_of_band_buffer_is_rejected(payload: Any) -> None:
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(pickle.PickleBuffer(payload), protocol=5, buffer_callback=buffers.append)
    assert buffers  # really out of band
    assert b"\x97" in data  # NEXT_BUFFER
    with pytest.raises(CheckpointError) as info:
        scan(data, NAME)
    assert isinstance(info.value, UnsupportedFormatError)
    assert info.value.name == NAME


def test_readonly_buffer_opcode_is_rejected() -> None:
    data = b"\x80\x05\x97\x98."  # NEXT_BUFFER READONLY_BUFFER STOP
    with pytest.raises(UnsupportedFormatError, match=NAME):
        scan(data, NAME)


def test_in_band_pickle_buffer_scans() -> None:
    # without a buffer_callback, protocol 5 writes the buffer in band (BYTEARRAY8 / BINBYTES)
    writable = scan(pickle.dumps(pickle.PickleBuffer(bytearray(b"abc")), protocol=5), NAME).root
    assert type(writable) is bytearray and writable == b"abc"
    readonly = scan(pickle.dumps(pickle.PickleBuffer(b"xyz"), protocol=5), NAME).root
    assert type(readonly) is bytes and readonly == b"xyz"


# ---------------------------------------------------------------------------------------
# deep and cyclic structures
# ---------------------------------------------------------------------------------------


def _nested_lists_append(n: int) -> bytes:
    return b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."


def _nested_lists_mark(n: int) -> bytes:
    return b"\x80\x02" + b"(" * n + b"l" * n + b"."


def _nested_tuples(n: int) -> bytes:
    return b"\x80\x02" + b"(" * n + b"t" * n + b"."


def _nested_dicts(n: int) -> bytes:
    return b"\x80\x02" + b"}X\x01\x00\x00\x00k" * n + b"N" + b"s" * n + b"."


@pytest.mark.parametrize("build", [_nested_lists_append, _nested_lists_mark])
def test_deep_nesting_without_recursion_error(build: Any) -> None:
    n = 5_000  # five times the default recursion limit
    result = scan(build(n), NAME)
    assert _depth(result.root) == n


def test_deep_tuples_and_dicts_without_recursion_error() -> None:
    n = 5_000
    tuples = scan(_nested_tuples(n), NAME).root
    depth = 0
    while isinstance(tuples, tuple) and tuples:
        depth, tuples = depth + 1, tuples[0]
    assert depth == n - 1 and tuples == ()
    dicts = scan(_nested_dicts(n), NAME).root
    depth = 0
    while isinstance(dicts, dict):
        depth, dicts = depth + 1, dicts["k"]
    assert depth == n and dicts is None


def test_deep_nesting_with_a_tensor_at_the_bottom(tmp_path: Path) -> None:
    n = 3_000
    path = tmp_path / "t.pt"
    torch.save(torch.arange(3.0), path)
    tensor_pkl = _data_pkl(path)
    assert tensor_pkl.startswith(b"\x80\x02") and tensor_pkl.endswith(b".")
    body = tensor_pkl[2:-1]
    # n empty lists, then the tensor, then n APPENDs: the tensor at depth n
    data = b"\x80\x02" + b"]" * n + body + b"a" * n + b"."
    result = scan(data, NAME)
    (entry,) = result.tensors
    assert entry.path == (0,) * n
    assert entry.name == ".".join(["0"] * n)
    assert entry.shape == (3,)


@contextlib.contextmanager
def _cpu_limit(seconds: float) -> Iterator[None]:
    """Fail if the block uses more than ``seconds`` of this process's CPU time.

    CPU time, not wall time: on a loaded CI machine the wall clock is the scheduler's. A
    wall-clock guard ten times as long still ends a block that never finishes.
    """
    started = time.process_time()
    with _time_limit(10 * seconds + 30):
        yield
    used = time.process_time() - started
    assert used < seconds, f"used {used:.2f} s of CPU (limit {seconds} s)"


def test_very_deep_nesting_is_fast() -> None:
    data = _nested_lists_append(100_000)  # 200 KB of pickle
    with _cpu_limit(8):  # a linear scan takes well under a second of CPU here; a quadratic one, minutes
        result = scan(data, NAME)
    assert _depth(result.root) == 100_000


def _doubling_dag(levels: int) -> bytes:
    # x0 = []; x(i+1) = [x(i), x(i)], every level memoized and fetched twice
    out = b"\x80\x02]q\x00"
    for i in range(levels):
        out += b"(h" + bytes([i]) + b"h" + bytes([i]) + b"lq" + bytes([i + 1])
    return out + b"."


def test_doubling_dag_is_what_it_claims() -> None:
    small = pickle.loads(_doubling_dag(3))
    assert small == [[[[], []], [[], []]], [[[], []], [[], []]]]
    assert small[0] is small[1]


def test_shared_subtrees_do_not_explode() -> None:
    data = _doubling_dag(40)
    assert len(data) < 400
    with _cpu_limit(3):  # a walk that visits each shared list once takes milliseconds; 2**40 visits, forever
        try:
            scan(data, NAME)
        except CheckpointError:
            pass  # refusing it as hostile is fine too


def test_self_referencing_list() -> None:
    data = b"\x80\x02]q\x00h\x00a."  # l = []; l.append(l)
    python = pickle.loads(data)
    assert python[0] is python
    result = scan(data, NAME)
    root = result.root
    assert isinstance(root, list)
    assert root[0] is root
    assert result.tensors == []


def test_self_referencing_dict_and_object() -> None:
    d = {}
    d["self"] = d
    result = scan(pickle.dumps(d, protocol=2), NAME)
    assert isinstance(result.root, dict)
    assert result.root["self"] is result.root
    obj = collections.OrderedDict()
    obj["me"] = obj
    result = scan(pickle.dumps(obj, protocol=2), NAME)
    assert isinstance(result.root, Call)


def test_cycle_around_a_tensor(tmp_path: Path) -> None:
    t = torch.arange(4.0)
    d: dict[str, Any] = {"t": t}
    d["loop"] = [d, t]
    path = tmp_path / "cycle.pt"
    torch.save(d, path)
    result = scan(_data_pkl(path), NAME)
    names = sorted(entry.name for entry in result.tensors)
    assert names == ["loop.1", "t"]
    assert len({entry.storage_keys for entry in result.tensors}) == 1


# ---------------------------------------------------------------------------------------
# torch's pickles decoded
# ---------------------------------------------------------------------------------------


class _Anything:
    """What a stubbed global returns: takes items, appends and state like any object."""

    def __init__(self, qualname: str, args: tuple[Any, ...]) -> None:
        self.qualname = qualname
        self.args = args

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _RecordingUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Python's reference unpickler, with every global a recorder and persistent ids recorded."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.pids: list[tuple[Any, ...]] = []

    def find_class(self, module: str, name: str) -> Any:
        def stub(*args: Any, **kwargs: Any) -> _Anything:
            return _Anything(f"{module}.{name}", args)

        stub.qualname = f"{module}.{name}"  # type: ignore[attr-defined]
        return stub

    def persistent_load(self, pid: Any) -> Any:
        self.pids.append(pid)
        return ("storage", pid[2])


def _sample() -> dict[Any, Any]:
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(5, 4, generator=gen)
    return {
        "a": {"b": [base, {"c": torch.arange(6, dtype=torch.int64)}]},
        3: torch.ones(2, dtype=torch.float16),
        "od": collections.OrderedDict([("x", torch.zeros(3, dtype=torch.int8)), ("y", base[1:3])]),
        "tup": (torch.tensor(True), 7, "s"),
        "bf": torch.randn(3, generator=gen).bfloat16(),
        "f64": torch.randn(2, 2, generator=gen).double().t(),
        "empty": torch.zeros(0, 2),
        "nested_ints": {10: {20: torch.tensor([1, 2], dtype=torch.int32)}},
    }


_EXPECTED_NAMES = {
    "a.b.0": ("a", "b", 0),
    "a.b.1.c": ("a", "b", 1, "c"),
    "3": (3,),
    "od.x": ("od", "x"),
    "od.y": ("od", "y"),
    "tup.0": ("tup", 0),
    "bf": ("bf",),
    "f64": ("f64",),
    "empty": ("empty",),
    "nested_ints.10.20": ("nested_ints", 10, 20),
}


def _loaded_by_path(loaded: Any, path: tuple[Any, ...]) -> torch.Tensor:
    for key in path:
        loaded = loaded[key]
    return loaded


def test_storage_refs_match_torch(tmp_path: Path) -> None:
    path = tmp_path / "sample.pt"
    torch.save(_sample(), path)
    data = _data_pkl(path)
    result = scan(data, str(path))
    assert isinstance(result, ScanResult)
    assert result.end == len(data)

    # persistent ids as Python's own unpickler decodes them
    reference = _RecordingUnpickler(data)
    reference.load()
    pids = {pid[2]: pid for pid in reference.pids}
    assert set(result.storages) == set(pids)
    for key, ref in result.storages.items():
        kind, storage_type, ref_key, location, numel = pids[key]
        assert kind == "storage"
        assert ref.key == ref_key == key
        assert ref.location == location
        assert ref.numel == numel
        assert storage_type.qualname.startswith("torch.") and storage_type.qualname.endswith("Storage")
        assert torch.serialization.StorageType(storage_type.qualname.split(".")[-1]).dtype == ref.dtype

    # and as torch.load yields them
    locations: list[str] = []

    def record(storage: Any, location: str) -> Any:
        locations.append(location)
        return storage

    loaded = torch.load(path, map_location=record, weights_only=True)
    assert sorted(locations) == sorted(ref.location for ref in result.storages.values())
    entries = {entry.name: entry for entry in result.tensors}
    for name, keys in _EXPECTED_NAMES.items():
        tensor = _loaded_by_path(loaded, keys)
        entry = entries[name]
        ref = result.storages[entry.storage_keys[0]]
        assert ref.dtype == tensor.dtype, name
        assert ref.numel * ref.dtype.itemsize == tensor.untyped_storage().nbytes(), name
        assert ref.location == "cpu"
        assert _record(path, ref.key) == tensor_storage_bytes(tensor), name
        assert entry.dtype == tensor.dtype
        assert entry.shape == tuple(tensor.shape)
        assert entry.stride == tuple(tensor.stride())
        assert entry.storage_offset == tensor.storage_offset()


def test_names_for_nested_containers(tmp_path: Path) -> None:
    path = tmp_path / "sample.pt"
    torch.save(_sample(), path)
    result = scan(_data_pkl(path), str(path))
    got = {entry.name: entry.path for entry in result.tensors}
    assert got == _EXPECTED_NAMES
    # int keys stay ints in the path, decimal in the name
    assert all(isinstance(part, int) for part in got["nested_ints.10.20"][1:])


def test_tensor_under_two_names(tmp_path: Path) -> None:
    t = torch.arange(5.0)
    path = tmp_path / "twice.pt"
    torch.save({"x": t, "y": t, "z": [t]}, path)
    result = scan(_data_pkl(path), str(path))
    names = [entry.name for entry in result.tensors]
    assert sorted(names) == ["x", "y", "z.0"]
    assert len(result.storages) == 1
    assert len({entry.storage_keys for entry in result.tensors}) == 1
    assert all(entry.shape == (5,) for entry in result.tensors)


def test_module_state_dict_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        collections.OrderedDict([("enc", torch.nn.Linear(2, 3)), ("norm", torch.nn.BatchNorm1d(3))])
    )
    state = model.state_dict()
    path = tmp_path / "sd.pt"
    torch.save({"state": state, "opt": {"step": 3}}, path)
    result = scan(_data_pkl(path), str(path))
    assert sorted(entry.name for entry in result.tensors) == sorted(f"state.{k}" for k in state)
    loaded = torch.load(path, weights_only=True)["state"]
    for entry in result.tensors:
        tensor = loaded[entry.name.removeprefix("state.")]
        assert entry.shape == tuple(tensor.shape)
        assert entry.dtype == tensor.dtype


def test_parameter_and_requires_grad(tmp_path: Path) -> None:
    p = torch.nn.Parameter(torch.randn(2, 3))
    path = tmp_path / "param.pt"
    torch.save({"p": p, "g": torch.ones(2, requires_grad=True)}, path)
    result = scan(_data_pkl(path), str(path))
    entries = {entry.name: entry for entry in result.tensors}
    assert set(entries) == {"p", "g"}
    assert entries["p"].shape == (2, 3)
    assert entries["p"].stride == (3, 1)


def test_scan_from_offset() -> None:
    first = pickle.dumps([1, 2], protocol=2)
    second = pickle.dumps({"k": "v"}, protocol=2)
    data = first + second
    one = scan(data, NAME)
    assert one.root == [1, 2]
    assert one.end == len(first)
    two = scan(data, NAME, start=one.end)
    assert two.root == {"k": "v"}
    assert two.end == len(data)


def test_plain_values_decode() -> None:
    data = pickle.dumps([1, -2, 2**80, 1.5, "s", b"b", None, True, False, (1, 2)], protocol=3)
    assert scan(data, NAME).root == [1, -2, 2**80, 1.5, "s", b"b", None, True, False, (1, 2)]
    data0 = pickle.dumps([1, -2, 2**80, 1.5, "s", None, True, (1, 2)], protocol=0)
    assert scan(data0, NAME).root == [1, -2, 2**80, 1.5, "s", None, True, (1, 2)]


def test_persistent_id_recorded_as_data() -> None:
    class P(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            return ("module", "x", "source") if obj == "marker" else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(["marker"])
    result = scan(buf.getvalue(), NAME)
    # a legacy whole-module id names a class: it stands as an inert stub, storages untouched
    assert isinstance(result.root[0], Global) and result.root[0].qualname == "<module>.x"
    assert result.persistent_ids == [("module", "x", "source")]
    assert result.storages == {}


# ---------------------------------------------------------------------------------------
# the stubs themselves cannot be turned into something that acts
# ---------------------------------------------------------------------------------------


def test_stub_cannot_be_rewired(monkeypatch: pytest.MonkeyPatch) -> None:
    # BUILD with slot state on the os.system stub would setattr(stub, "__call__", eval)
    data = b"\x80\x02cos\nsystem\nN}X\x08\x00\x00\x00__call__cbuiltins\neval\ns\x86b."
    pickletools.dis(data, out=io.StringIO())  # a well-formed pickle
    with _no_effects(monkeypatch) as calls:
        with pytest.raises(CheckpointError, match="immutable"):
            scan(data, NAME)
    assert calls == []


def test_calls_on_calls_are_records(monkeypatch: pytest.MonkeyPatch) -> None:
    # os.system()("true"), then BUILD and SETITEM on the result: records, nothing called
    data = b"\x80\x02cos\nsystem\n)R(X\x04\x00\x00\x00truetR}b."
    with _no_effects(monkeypatch) as calls:
        result = scan(data, NAME)
    assert calls == []
    root = result.root
    assert isinstance(root, Call) and isinstance(root.func, Call) and root.args == ("true",)
    assert root.func.func.qualname == "os.system"
    assert result.calls == 2 and root.built and root.state == {}


def test_stubs_are_per_scan_and_immutable() -> None:
    one = scan(b"\x80\x02cos\nsystem\n.", NAME).root
    two = scan(b"\x80\x02cos\nsystem\n.", NAME).root
    assert isinstance(one, Global) and one is not two
    with pytest.raises(TypeError):
        one.name = "other"  # type: ignore[misc]
    assert one("x").args == ("x",) and one("x").func is one


def test_too_many_globals_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ckptd.formats._pickle_scan._MAX_GLOBALS", 10)
    data = b"\x80\x02(" + b"".join(f"cm{i}\nf\n".encode() for i in range(11)) + b"l."
    with pytest.raises(CheckpointError, match="too many globals"):
        scan(data, NAME)
