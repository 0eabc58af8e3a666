"""Faults, with a real daemon and real client processes: SIGKILLed clients and daemons,
files changed under loads. After each, no memory is left behind and no data is wrong.

Memory is measured where it lives. The daemon's host arenas are anonymous memory files
(``memfd``), alive while any process holds a descriptor or a mapping of one; every arena
a daemon made is noted by name while it runs, and at the end no process on the machine
may hold any of them (nor may a shared-memory directory hold a file). ``Shmem`` of
``/proc/meminfo`` is logged beside it: it is machine-wide, so other processes move it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptd
import ckptd._client as ckptd_client
from ckptd_testlib import READY_PREFIX, Daemon, arenas_of, cached_entry, start_daemon, wait_for

logger = logging.getLogger(__name__)

MB = 1 << 20
_MEMFD = re.compile(r"/memfd:(ckptd-[0-9a-f]{24}) \(deleted\)")

# A client process driven over stdin/stdout, one JSON line each way: it loads, holds what
# it loaded, and re-checks held tensors against what they were when loaded.
WORKER = textwrap.dedent(
    """
    import gc, hashlib, json, os, sys
    import torch, ckptd

    def digests(state):
        return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for k, v in state.items()}

    client = ckptd.Client(sys.argv[1])
    held = {}
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "load":
                print(json.dumps({"loading": cmd["path"]}), flush=True)
                state = client.load(cmd["path"])
                held[cmd["path"]] = (state, digests(state))
                reply = {"ok": True, "digests": held[cmd["path"]][1]}
            elif cmd["op"] == "check":  # every held tensor still has the bytes it was loaded with
                reply = {"ok": all(digests(state) == sums for state, sums in held.values()), "held": len(held)}
            elif cmd["op"] == "drop":
                held.clear()
                gc.collect()
                reply = {"ok": True}
            else:
                break
        except ckptd.CkptdError as exc:
            reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        print(json.dumps(reply), flush=True)
    client.close()
    """
)


class Worker:
    """A client process (see :data:`WORKER`); :func:`workers` starts them."""

    def __init__(self, script: Path, url: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(script), url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ready(self) -> Worker:
        assert "ready" in self._read()
        return self

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"worker exited ({self.proc.poll()})"
        return json.loads(line)

    def send(self, op: str, **args: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        if op == "load":
            assert "loading" in self._read()

    def ask(self, op: str, **args: Any) -> dict[str, Any]:
        self.send(op, **args)
        return self._read()

    def answer(self) -> dict[str, Any]:
        return self._read()

    def exit(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def workers(script: Path, url: str, n: int, started: list[Worker]) -> list[Worker]:
    """``n`` client processes, started side by side (each imports torch), once all are ready;
    each is also added to ``started`` (to kill at the end whatever happens)."""
    new = [Worker(script, url) for _ in range(n)]
    started += new
    return [worker.ready() for worker in new]


def digests(state: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for k, v in state.items()}


def version(root: Path, name: str, mb: int, seed: int) -> tuple[dict[str, str], bytes]:
    """Another version of checkpoint ``name`` (same size as any other of the same ``mb``): digests, bytes."""
    (root / f"v{seed}").mkdir(exist_ok=True)
    sums = save(root / f"v{seed}" / name, mb, seed)
    return sums, (root / f"v{seed}" / name).read_bytes()


def save(path: Path, mb: int, seed: int) -> dict[str, str]:
    """A checkpoint of ``mb`` MiB at ``path`` (written beside it, then renamed in); its digests."""
    g = torch.Generator().manual_seed(seed)
    state = {f"layer{i}": torch.randn(MB // 4, generator=g) for i in range(mb)}
    scratch = path.parent / ".scratch" / path.name  # torch.save names the archive after the file
    scratch.parent.mkdir(exist_ok=True)
    torch.save(state, scratch)
    os.replace(scratch, path)
    return digests(state)


# --- measuring memory ---------------------------------------------------------------------


class Arenas:
    """Every arena the daemons of a test made, noted by name while they run."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.shmem_before = shmem()

    def note(self, pid: int) -> None:
        for arena in arenas_of(pid):
            self.seen.setdefault(arena.name, arena.stat().st_size)

    def alive(self) -> dict[str, int]:
        """Those still alive anywhere on this machine: held by any process's descriptor or mapping."""
        holders = live_memfds()
        return {name: size for name, size in self.seen.items() if name in holders}

    def assert_all_freed(self, checkpoint_bytes: int, *shm_dirs: Path) -> None:
        alive = self.alive()
        after = shmem()
        delta = after - self.shmem_before
        logger.info("arenas made %d (%d bytes); still alive %d; Shmem %d -> %d bytes, %+d (%.2f of one checkpoint; "
                    "machine-wide)", len(self.seen), sum(self.seen.values()), len(alive), self.shmem_before, after, delta,
                    delta / checkpoint_bytes)
        assert self.seen, "the test saw no arena: it measured nothing"
        assert alive == {}, f"arenas outlived the daemon and every client: {alive}"
        for directory in shm_dirs:
            assert not [p for p in directory.iterdir() if p.is_file()], f"files left in {directory}"


def live_memfds() -> set[str]:
    """Names of ckptd memory files any process holds (a descriptor or a mapping)."""
    names: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                found = _MEMFD.fullmatch(_readlink(f"/proc/{pid}/fd/{fd}"))
                if found:
                    names.add(found[1])
            with open(f"/proc/{pid}/maps") as maps:
                names.update(found[1] for found in map(_MEMFD.search, maps) if found)
        except OSError:  # the process ended meanwhile
            continue
    return names


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def shmem() -> int:
    """Shared memory in use on this machine (``Shmem`` of /proc/meminfo), in bytes."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Shmem line in /proc/meminfo")


# --- daemons ------------------------------------------------------------------------------


def serve(sock: str, root: Path, shm: Path, *extra: str) -> subprocess.Popen:
    """``ckptd serve`` on ``sock`` (a stale socket file there is replaced), once it listens."""
    cmd = [sys.executable, "-m", "ckptd", "serve", "--socket", sock, "--root", str(root), "--shm-dir", str(shm), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(READY_PREFIX), f"daemon did not start: {line!r} (exit {proc.poll()})"
    return proc


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, and the time to exit logged (test_daemon.py bounds it)."""
    if proc.poll() is None:
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        logger.info("SIGTERM to exit: %.2f s", time.monotonic() - started)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture(autouse=True)
def timed(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each scenario's wall time, logged (figures for the record; the machine's load varies)."""
    started = time.monotonic()
    yield
    logger.info("%s took %.1f s (load average %.2f)", request.node.name, time.monotonic() - started, os.getloadavg()[0])


def being_loaded(client: ckptd.Client, path: Path) -> bool:
    """Whether the daemon has an entry for ``path`` (a first load has begun)."""
    return any(os.path.realpath(c["path"]) == os.path.realpath(path) for c in client.checkpoints())


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """Checkpoint root, shared-memory dir, the worker script."""
    (tmp_path / "root").mkdir()
    (tmp_path / "shm").mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    yield tmp_path / "root", tmp_path / "shm", script


@pytest.fixture
def short_socket() -> Iterator[str]:
    sockdir = tempfile.mkdtemp(prefix="ckf", dir="/tmp")
    yield os.path.join(sockdir, "d.sock")
    shutil.rmtree(sockdir, ignore_errors=True)


# --- SIGKILLed clients --------------------------------------------------------------------


def test_clients_killed_mid_load_and_while_holding_leave_nothing(dirs: tuple[Path, Path, Path], short_socket: str) -> None:
    root, shm, script = dirs
    held_sums = save(root / "held.pt", 16, seed=1)
    save(root / "big.pt", 64, seed=2)
    arenas = Arenas()
    daemon = serve(short_socket, root, shm, "--lease-ttl", "2")
    started: list[Worker] = []
    try:
        with ckptd.Client(f"unix://{short_socket}") as admin:
            holder, loader = workers(script, f"unix://{short_socket}", 2, started)
            assert holder.ask("load", path=str(root / "held.pt"))["digests"] == held_sums
            loader.send("load", path=str(root / "big.pt"))
            wait_for(lambda: being_loaded(admin, root / "big.pt"), "the loader's first load to begin")
            loader.kill()  # mid-load
            arenas.note(daemon.pid)
            holder.kill()  # while holding
            wait_for(lambda: admin.stats()["leases"] == 0, "the killed clients' leases to go", timeout=20)
            for path in ("held.pt", "big.pt"):
                wait_for(lambda p=path: _evicted(admin, root / p), f"{path} evicted", timeout=20)
            assert admin.stats()["resident_bytes"]["cpu"] == 0
            assert arenas_of(daemon.pid) == []
    finally:
        for worker in started:
            worker.kill()
        stop(daemon)
    arenas.assert_all_freed(64 * MB, shm)


def _evicted(client: ckptd.Client, path: Path) -> bool:
    """Evict ``path`` (True once it is gone; False while a load or lease holds it)."""
    try:
        client.evict(str(path))
    except ckptd.CheckpointBusyError:
        return False
    except ckptd.CheckpointNotFoundError:
        pass  # never cached (a load killed before it began), or gone already
    return True


# --- a SIGKILLed daemon ---------------------------------------------------------------------


def test_daemon_killed_mid_load_and_while_clients_hold_then_restarted(dirs: tuple[Path, Path, Path], short_socket: str) -> None:
    """The held tensors stay valid through the kill and the restart; once the clients exit
    too, every arena of the dead daemon is gone: the kernel freed it with its last user."""
    root, shm, script = dirs
    url = f"unix://{short_socket}"
    held_sums = save(root / "held.pt", 32, seed=3)
    big_sums = save(root / "big.pt", 64, seed=4)
    arenas = Arenas()
    first = serve(short_socket, root, shm)
    started: list[Worker] = []
    try:
        holder, loader = workers(script, url, 2, started)
        assert holder.ask("load", path=str(root / "held.pt"))["digests"] == held_sums
        with ckptd.Client(url) as admin:
            loader.send("load", path=str(root / "big.pt"))
            wait_for(lambda: being_loaded(admin, root / "big.pt"), "the loader's first load to begin")
            arenas.note(first.pid)
            first.kill()  # SIGKILL, mid-load (most often: a load of 64 MiB from the page cache is quick)
            first.wait()
        loaded = loader.answer()  # an answer, not a hang: a clear error, or the load done before the kill
        logger.info("the load the daemon was killed under: %s", "finished first" if loaded["ok"] else loaded["error"])
        assert loaded["ok"] is False or loaded["digests"] == big_sums
        for worker in (holder, loader):
            assert worker.ask("check")["ok"] is True
        alive = arenas.alive()
        assert len(alive) == 1 + loaded["ok"], alive  # only what clients map outlived the daemon

        second = serve(short_socket, root, shm)  # the same socket: the dead daemon's file is replaced
        try:
            assert holder.ask("check") == {"ok": True, "held": 1}
            with ckptd.Client(url) as fresh:  # a client of the new daemon, beside those of the dead one
                assert digests(fresh.load(root / "held.pt")) == held_sums
                arenas.note(second.pid)
            for worker in (holder, loader):
                assert worker.ask("check")["ok"] is True
                worker.exit()
        finally:
            stop(second)
    finally:
        for worker in started:
            worker.kill()
        if first.poll() is None:
            first.kill()
        first.wait()
        if first.stdout is not None:
            first.stdout.close()
    wait_for(lambda: not arenas.alive(), "the kernel to free the arenas of exited processes")
    arenas.assert_all_freed(32 * MB, shm)


# --- files changed under loads ----------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("faults")
    (base / "root").mkdir()
    (base / "shm").mkdir()
    yield from start_daemon(base / "root", base / "shm", "--lease-ttl", "5")


@pytest.fixture
def client(daemon: Daemon) -> Iterator[ckptd.Client]:
    with ckptd.Client(daemon.url) as c:
        yield c


def _actual_bytes(daemon: Daemon) -> int:
    return sum(arena.stat().st_size for arena in daemon.arenas())


def _assert_nothing_resident(client: ckptd.Client, daemon: Daemon) -> None:
    """The daemon holds no arena, and says so."""
    stated, actual = client.stats()["resident_bytes"]["cpu"], _actual_bytes(daemon)
    logger.info("after: the daemon holds %d bytes of arenas (its stats: %d)", actual, stated)
    assert stated == actual == 0


def test_evict_during_a_first_load_is_refused_and_nothing_leaks(daemon: Daemon, client: ckptd.Client, tmp_path: Path) -> None:
    path = daemon.root / "evicted.pt"
    sums = save(path, 64, seed=5)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    loader = Worker(script, daemon.url).ready()
    try:
        loader.send("load", path=str(path))
        wait_for(lambda: being_loaded(client, path), "the first load to begin")
        with pytest.raises(ckptd.CheckpointBusyError):  # loading, or leased once loaded
            client.evict(str(path))
        assert loader.answer()["digests"] == sums
        logger.info("during: the daemon holds %d bytes of arenas", _actual_bytes(daemon))
        assert client.stats()["resident_bytes"]["cpu"] == _actual_bytes(daemon) >= 64 * MB
        loader.exit()
    finally:
        loader.kill()
    wait_for(lambda: _evicted(client, path), "the checkpoint evicted once its client is gone")
    _assert_nothing_resident(client, daemon)


def test_replacing_a_file_during_its_first_load_leaks_nothing(daemon: Daemon, client: ckptd.Client, tmp_path: Path) -> None:
    path = daemon.root / "replaced.pt"
    old = save(path, 64, seed=6)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    loader = Worker(script, daemon.url).ready()
    try:
        loader.send("load", path=str(path))
        wait_for(lambda: being_loaded(client, path), "the first load to begin")
        new = save(path, 64, seed=7)
        assert digests(client.load(path)) == new  # the result is dropped at once: its lease goes
        got = loader.answer()["digests"]
        assert got in (old, new)  # the file as it was when the load began, or as it is now: never a mix
        logger.info("the load the file was replaced under returned the %s file", "new" if got == new else "old")
        logger.info("during: the daemon holds %d bytes of arenas", _actual_bytes(daemon))
        assert client.stats()["resident_bytes"]["cpu"] == _actual_bytes(daemon)
        loader.exit()
    finally:
        loader.kill()
    gc.collect()
    wait_for(lambda: client.stats()["leases"] == 0, "every lease released")
    for entry in client.checkpoints():
        client.evict(entry["id"])
    _assert_nothing_resident(client, daemon)


def test_a_file_rewritten_in_place_with_its_mtime_restored_is_not_served_stale(daemon: Daemon, client: ckptd.Client) -> None:
    path = daemon.root / "rewritten.pt"
    save(path, 2, seed=8)
    before = os.stat(path)
    client.load(path)
    new, data = version(daemon.root, "rewritten.pt", 2, seed=9)
    assert len(data) == before.st_size
    with open(path, "r+b") as f:  # same inode, same size ...
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # ... and the mtime put back
    assert (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert digests(client.load(path)) == new
    assert cached_entry(client, path)["misses"] == 1


def test_a_file_overwritten_during_reads_is_never_returned_torn(daemon: Daemon, client: ckptd.Client) -> None:
    """A writer rewrites the file in place, over and over, alternating two versions (one
    ``write()`` each, the mtime put back after it); every load returns one version whole,
    or fails clearly. (A writer that stops between two writes of one version leaves a
    half-written file that no reader can tell from a finished one: torch.load would read
    it as it is too. The test of a write stopped *inside* a write is in test_cache.py.)"""
    path = daemon.root / "torn.pt"
    (sums_a, a), (sums_b, b) = version(daemon.root, "torn.pt", 16, 10), version(daemon.root, "torn.pt", 16, 11)
    versions, contents = [sums_a, sums_b], [a, b]
    path.write_bytes(a)
    stop_writing = threading.Event()
    writes = [0]

    def writer() -> None:
        mtime = os.stat(path).st_mtime_ns
        fd = os.open(path, os.O_WRONLY)
        try:
            while not stop_writing.is_set():
                data = contents[writes[0] % 2]
                assert os.pwrite(fd, data, 0) == len(data)
                os.utime(path, ns=(mtime, mtime))
                writes[0] += 1
                stop_writing.wait(0.05)  # a pause between versions, so some loads can succeed
        finally:
            os.close(fd)

    thread = threading.Thread(target=writer)
    thread.start()
    outcomes = {"whole": 0, "refused": 0}
    try:
        for _ in range(12):
            try:
                got = digests(client.load(path))
            except ckptd.CheckpointError as exc:
                assert "changed on disk" in str(exc), exc  # not a parse error of a torn structure
                outcomes["refused"] += 1
                continue
            assert got in versions, "a load returned a mix of two versions"
            outcomes["whole"] += 1
    finally:
        stop_writing.set()
        thread.join()
    logger.info("overwritten during reads: %s, %d rewrites", outcomes, writes[0])
    final = versions[(writes[0] - 1) % 2]  # the writer stops between versions
    assert digests(client.load(path)) == final  # not a torn copy cached along the way


def test_a_client_whose_daemon_dies_under_its_load_maps_again_after_the_restart(
    dirs: tuple[Path, Path, Path], short_socket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon is SIGKILLed after sending the manifest, before the arena's descriptor:
    the load fails with DaemonNotRunningError, and that is no sign the client cannot map
    (it must not go on streaming over HTTP, a copy per process, once the daemon is back)."""
    root, shm, _ = dirs
    sums = save(root / "m.pt", 2, seed=12)
    url = f"unix://{short_socket}"
    first = serve(short_socket, root, shm)
    real = ckptd_client.receive_fd

    def dying(*args: Any) -> int:
        first.kill()  # SIGKILL, between the manifest and the descriptor
        first.wait()
        return real(*args)

    try:
        with ckptd.Client(url) as client:
            monkeypatch.setattr(ckptd_client, "receive_fd", dying)
            with pytest.raises(ckptd.DaemonNotRunningError):
                client.load(root / "m.pt")
            monkeypatch.undo()
            second = serve(short_socket, root, shm)
            try:
                assert digests(client.load(root / "m.pt")) == sums
                assert client.transport_used == "shm" and client.loads_by_transport == {"shm": 1}
            finally:
                stop(second)
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
        if first.stdout is not None:
            first.stdout.close()
