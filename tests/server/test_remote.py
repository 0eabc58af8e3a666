"""Workers that cannot map the daemon's shared memory load over HTTP.

A real daemon listens on a Unix socket and on TCP with a token. Its host arenas are
anonymous memory files (memfd): a client on its Unix socket receives their descriptors,
one on TCP opens them through the daemon's ``/proc/PID/fd`` entries. The headline test
runs a worker as a container would: its own PID namespace and ``/proc`` (``unshare -p``),
its own mount namespace with an empty ``/dev/shm``, the daemon's shared-memory directory
and the checkpoint's directory hidden under empty tmpfs mounts. It loads through
``http://127.0.0.1:port`` with the token, finds it cannot map, streams, and gets
torch.load's result; the same worker without the PID namespace maps (memfd arenas need
no ``/dev/shm``). The other tests force ``transport='http'`` in this process, so the
streaming path is covered wherever namespaces are refused.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

import ckptd
import ckptd._remote as remote
from ckptd._cli import main as cli_main
from ckptd.engine import Placement
from ckptd._remote import CHECKSUM_HEADER, RangeReader, fetch_views
from ckptd_testlib import Daemon, assert_same, cached_entry, save_bytes, start_daemon

TOKEN = "remote-test-token"
TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon on a Unix socket and on TCP (any free port), with a token."""
    base = tmp_path_factory.mktemp("remote")
    (base / "root").mkdir()
    (base / "shm").mkdir()
    token = base / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    yield from start_daemon(base / "root", base / "shm", "--port", "0", "--token-file", str(token))


@pytest.fixture
def http_client(daemon: Daemon) -> Iterator[ckptd.Client]:
    assert daemon.tcp is not None
    with ckptd.Client(daemon.tcp, token=TOKEN, transport="http") as client:
        yield client


def _state() -> dict[str, object]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 48, generator=g)
    emb = torch.randn(40, 16, generator=g)
    return {
        "layers.0.w": base,
        "layers.0.w_view": base[3:9, 5:],  # a view of another entry's storage
        "layers.1.w": torch.randn(33, 7, generator=g).to(torch.bfloat16),
        "i64": torch.arange(1000),
        "bool": torch.tensor([True, False]),
        "empty": torch.empty(0, 3),
        "embed.weight": emb,
        "lm_head.weight": emb,  # tied
        "step": 12,
    }


def _save(root: Path, name: str, obj: object | None = None) -> Path:
    path = root / name
    if not path.exists():
        torch.save(_state() if obj is None else obj, path)
    return path


def _sharded(root: Path) -> Path:
    """A Hugging Face ``*.bin.index.json`` over two torch.save shards."""
    index = root / "sharded" / "pytorch_model.bin.index.json"
    if index.exists():
        return index
    index.parent.mkdir()
    g = torch.Generator().manual_seed(4)
    shards = {
        "pytorch_model-00001-of-00002.bin": {"a.weight": torch.randn(30, 20, generator=g), "a.bias": torch.randn(20, generator=g)},
        "pytorch_model-00002-of-00002.bin": {"b.weight": torch.randn(20, 10, generator=g).half()},
    }
    weight_map = {}
    for shard, tensors in shards.items():
        torch.save(tensors, index.parent / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def _merged(index: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads(index.read_text())["weight_map"]
    merged: dict[str, torch.Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):
        merged.update(torch.load(index.parent / shard))
    return {name: merged[name] for name in weight_map}


# ------------------------------------------------------------------ a worker in its own namespaces


def _namespace_prefix(pid: bool) -> list[str] | None:
    """``unshare`` that gives a private mount namespace where tmpfs can be mounted and, with
    ``pid``, a PID namespace with its own ``/proc`` (None: refused here)."""
    if shutil.which("unshare") is None:
        return None
    prefix = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-m", "-r"]
    if pid:
        prefix += ["-p", "-f", "--mount-proc"]
    probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs ckptd-probe /dev/shm"], capture_output=True)
    return prefix if probe.returncode == 0 else None


_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, ckptd
    from ckptd._client import shared_client
    from ckptd_testlib import assert_same

    checkpoint, index, expected, expected_index, daemon_shm, out = sys.argv[1:]
    report = {
        "sees_checkpoint": os.path.exists(checkpoint) or os.path.exists(index),
        "dev_shm": os.listdir("/dev/shm"),
        "daemon_shm": os.listdir(daemon_shm),
    }
    # CKPTD_URL=http://127.0.0.1:port and CKPTD_TOKEN, as a deployment sets them; no transport given
    state = ckptd.load(checkpoint)
    report["transport"] = shared_client(os.environ["CKPTD_URL"]).transport_used
    assert_same(torch.load(expected), state)
    picked = ckptd.load(checkpoint, select=["layers.1.w", "embed.weight"], map_location="cpu")
    full = torch.load(expected)
    assert_same({"layers.1.w": full["layers.1.w"], "embed.weight": full["embed.weight"]}, picked)
    assert_same(torch.load(expected_index), ckptd.load(index))
    report["ok"] = True
    with open(out, "w") as f:
        json.dump(report, f)
    """
)


def _run_hidden_worker(daemon: Daemon, work: Path, prefix: list[str]) -> dict[str, object]:
    """The worker, in the namespaces ``prefix`` makes, with /dev/shm, the daemon's
    shared-memory directory and the checkpoints' directory hidden: its report."""
    checkpoint, index = _save(daemon.root, "ns.pt"), _sharded(daemon.root)
    work.mkdir()
    shutil.copy(checkpoint, work / "expected.pt")  # the worker compares with torch.load of its own copy
    torch.save(_merged(index), work / "expected_index.pt")
    (work / "worker.py").write_text(_WORKER)
    hide = (
        'mount -t tmpfs ckptd-test /dev/shm && mount -t tmpfs ckptd-test "$1" && mount -t tmpfs ckptd-test "$2" '
        '&& shift 2 && exec "$@"'
    )
    assert daemon.tcp is not None
    env = {**os.environ, "CKPTD_URL": daemon.tcp, "CKPTD_TOKEN": TOKEN, "PYTHONPATH": str(TESTS)}
    env.pop("CKPTD_TRANSPORT", None)
    out = work / "report.json"
    args = [str(checkpoint), str(index), str(work / "expected.pt"), str(work / "expected_index.pt"), str(daemon.shm), str(out)]
    run = subprocess.run(
        [*prefix, "sh", "-c", hide, "sh", str(daemon.root), str(daemon.shm), sys.executable, str(work / "worker.py"), *args],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


def test_worker_without_the_daemons_memory_or_files_loads_over_http(daemon: Daemon, tmp_path: Path) -> None:
    """Another container (PID namespace, own /proc): the daemon's descriptors are out of
    reach, so the arenas cannot be mapped and the worker streams."""
    prefix = _namespace_prefix(pid=True)
    if prefix is None:
        pytest.skip("no private PID and mount namespace here (unshare refused): the forced-HTTP tests cover streaming")
    assert daemon.tcp is not None and daemon.tcp.startswith("http://127.0.0.1:")
    report = _run_hidden_worker(daemon, tmp_path / "worker", prefix)
    assert report == {"sees_checkpoint": False, "dev_shm": [], "daemon_shm": [], "transport": "http", "ok": True}
    assert daemon.proc.poll() is None
    with ckptd.Client(daemon.url, token=TOKEN) as client:
        assert cached_entry(client, daemon.root / "ns.pt")["leases"] == 0  # streamed loads hold no lease afterwards


def test_worker_without_dev_shm_but_in_the_daemons_pid_namespace_maps(daemon: Daemon, tmp_path: Path) -> None:
    """Host arenas need no shared-memory directory: a worker that sees the daemon's /proc
    (same PID namespace, same user) maps them through it even with /dev/shm hidden."""
    prefix = _namespace_prefix(pid=False)
    if prefix is None:
        pytest.skip("no private mount namespace here (unshare -m / -m -r refused)")
    report = _run_hidden_worker(daemon, tmp_path / "worker", prefix)
    assert report == {"sees_checkpoint": False, "dev_shm": [], "daemon_shm": [], "transport": "shm", "ok": True}


# ------------------------------------------------------------------ forced HTTP in this process


@pytest.mark.parametrize(
    "map_location",
    [None, "cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, loc: storage, "meta"],
    ids=["none", "cpu", "device", "dict", "callable", "meta"],
)
def test_streamed_load_is_torch_load(http_client: ckptd.Client, daemon: Daemon, map_location: object) -> None:
    path = _save(daemon.root, "forced.pt")
    loaded = http_client.load(path, map_location=map_location)
    assert http_client.transport_used == "http"
    expected = torch.load(path, map_location=map_location)
    if map_location == "meta":  # no bytes to compare: the same tensors, on meta
        assert {k: (v.shape, v.dtype, v.device) for k, v in loaded.items() if isinstance(v, torch.Tensor)} == {
            k: (v.shape, v.dtype, v.device) for k, v in expected.items() if isinstance(v, torch.Tensor)
        }
    else:
        assert_same(expected, loaded)
    fetched = http_client.last_fetch
    assert fetched is not None and fetched.retries == 0
    layout = ckptd.inspect(path)
    assert fetched.nbytes == (0 if map_location == "meta" else sum(r.nbytes for r in layout.storages.values()))  # meta targets fetch nothing, as torch reads nothing
    assert cached_entry(http_client, path)["leases"] == 0


def test_streamed_selection(http_client: ckptd.Client, daemon: Daemon) -> None:
    path = _save(daemon.root, "select.pt")
    full = torch.load(path)
    one = http_client.load(path, tensor_name="1.w", prefix="layers")
    assert_same(full["layers.1.w"], one)
    assert http_client.last_fetch is not None and http_client.last_fetch.nbytes == full["layers.1.w"].untyped_storage().nbytes()
    picked = http_client.load(path, select="layers.0.")
    assert_same({"layers.0.w": full["layers.0.w"], "layers.0.w_view": full["layers.0.w_view"]}, picked)


def test_streamed_sharded_checkpoint(http_client: ckptd.Client, daemon: Daemon) -> None:
    index = _sharded(daemon.root)
    assert_same(_merged(index), http_client.load(index))
    assert_same({"b.weight": _merged(index)["b.weight"]}, http_client.load(index, select=["b.weight"]))
    assert http_client.loads_by_transport["http"] >= 3 and http_client.loads_by_transport["shm"] == 0


def test_streamed_big_endian_file(http_client: ckptd.Client, daemon: Daemon) -> None:
    path = daemon.root / "big_endian.pt"
    path.write_bytes(save_bytes(_state(), "zip_big"))
    assert_same(torch.load(path), http_client.load(path))


def test_streamed_in_ranges_on_several_connections(http_client: ckptd.Client, daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ckptd._remote.DEFAULT_RANGE_BYTES", 4096)  # a 12 KiB storage becomes 3 ranges
    path = _save(daemon.root, "ranges.pt", {"w": torch.arange(3 * 1024, dtype=torch.float32), "v": torch.ones(5)})

    seen: list[int] = []
    real = remote.fetch_range

    def counting(reader: RangeReader, lease: str, r: remote.Range, out: memoryview) -> int:
        seen.append(r.nbytes)
        return real(reader, lease, r, out)

    monkeypatch.setattr(remote, "fetch_range", counting)
    assert_same(torch.load(path), http_client.load(path))
    assert sorted(seen) == [20, 4096, 4096, 4096]


def test_jit_load_over_http(http_client: ckptd.Client, daemon: Daemon) -> None:
    path = daemon.root / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), path)
    module = http_client.jit_load(path)
    assert http_client.transport_used == "http"
    expected = torch.jit.load(path)
    assert torch.equal(module.weight, expected.weight) and torch.equal(module.bias, expected.bias)


# ------------------------------------------------------------------ choosing the path


def test_mapping_is_the_default_where_it_works(daemon: Daemon) -> None:
    path = _save(daemon.root, "mapped.pt")
    assert daemon.tcp is not None
    with ckptd.Client(daemon.tcp, token=TOKEN) as client:  # TCP, but this host: map
        assert_same(torch.load(path), client.load(path))
        assert client.transport_used == "shm" and client.last_fetch is None


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a socket path must fit in 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="ckr", dir="/tmp")
    yield Path(directory)
    shutil.rmtree(directory, ignore_errors=True)


def _not_allowed(path: str, name: str) -> int:
    raise PermissionError(13, "Permission denied", path)  # what a worker of another user sees in the daemon's /proc


def test_auto_switches_to_http_when_mapping_fails(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = _save(daemon.root, "fallback.pt")
    monkeypatch.setattr("ckptd._client.open_proc_arena", _not_allowed)
    assert daemon.tcp is not None
    with caplog.at_level(logging.INFO, logger="ckptd"), ckptd.Client(daemon.tcp, token=TOKEN) as client:
        assert_same(torch.load(path), client.load(path))
        assert client.transport_used == "http"
        assert_same(torch.load(path), client.load(path))  # decided once: the next load streams at once
        assert dict(client.loads_by_transport) == {"http": 2}
        assert cached_entry(client, path)["leases"] == 0  # the failed attempt's lease was released too
    assert any("stream over HTTP from now on" in r.getMessage() for r in caplog.records)
    assert any("streamed over HTTP" in r.getMessage() for r in caplog.records)


def test_forced_shm_that_cannot_map_says_so(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(daemon.root, "forced_shm.pt")
    monkeypatch.setattr("ckptd._client.open_proc_arena", _not_allowed)
    assert daemon.tcp is not None
    with ckptd.Client(daemon.tcp, token=TOKEN, transport="shm") as client:
        with pytest.raises(ckptd.DaemonError, match="transport='http'"):
            client.load(path)
        assert cached_entry(client, path)["leases"] == 0


def test_transport_from_the_settings(daemon: Daemon) -> None:
    path = _save(daemon.root, "env.pt")
    with ckptd.settings(transport="http"), ckptd.Client(daemon.url, token=TOKEN) as client:
        client.load(path)
        assert client.transport_used == "http"
    with pytest.raises(ckptd.UsageError, match="auto, shm, http"), ckptd.settings(transport="carrier-pigeon"):
        pass
    with pytest.raises(ckptd.UsageError, match="auto, shm, http"):
        ckptd.Client(daemon.url, transport="carrier-pigeon")


def test_cli_load_says_how_it_loaded(daemon: Daemon, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = _save(daemon.root, "cli.pt")
    token = tmp_path / "token"
    token.write_text(TOKEN)
    assert daemon.tcp is not None
    assert cli_main(["load", str(path), "--url", daemon.tcp, "--token-file", str(token), "--transport", "http"]) == 0
    line = capsys.readouterr().out
    assert "streamed from the daemon over HTTP" in line and f"{_storage_total(path)} bytes" in line
    assert cli_main(["load", str(path), "--url", daemon.url, "--token-file", str(token), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["transport"] == "shm" and report["tensors"] == 8


def _storage_total(path: Path) -> int:
    return sum(r.nbytes for r in ckptd.inspect(path).storages.values())


# ------------------------------------------------------------------ the route


def _arena_url(client: httpx.Client, path: Path) -> tuple[str, dict]:
    manifest = client.post("/v1/load", json={"path": str(path)}).json()
    arena = manifest["arenas"][0]
    return f"/v1/leases/{manifest['lease']}/arenas/{arena['id']}", manifest


@pytest.fixture
def raw(daemon: Daemon) -> Iterator[httpx.Client]:
    assert daemon.tcp is not None
    with httpx.Client(base_url=daemon.tcp, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


def test_route_serves_ranges_with_their_checksum(raw: httpx.Client, daemon: Daemon) -> None:
    path = _save(daemon.root, "route.pt")
    url, manifest = _arena_url(raw, path)
    size = manifest["arenas"][0]["nbytes"]
    placement = next(p for p in manifest["placements"] if p["nbytes"] > 1000)
    first, last = placement["offset"], placement["offset"] + 999
    part = raw.get(url, headers={"Range": f"bytes={first}-{last}"})
    assert part.status_code == 206 and len(part.content) == 1000
    assert part.headers["Content-Range"] == f"bytes {first}-{last}/{size}"
    assert int(part.headers[CHECKSUM_HEADER], 16) == zlib.crc32(part.content)
    whole = raw.get(url)
    assert whole.status_code == 200 and len(whole.content) == size
    assert whole.content[first : last + 1] == part.content
    assert raw.get(url, headers={"Range": "bytes=-10"}).content == whole.content[-10:]
    refused = raw.get(url, headers={"Range": f"bytes={size}-"})
    assert refused.status_code == 416 and refused.headers["Content-Range"] == f"bytes */{size}"
    assert refused.json()["error"]["type"] == "UsageError"
    assert raw.get(url, headers={"Range": "bytes=0-1,4-5"}).status_code == 416
    raw.delete(f"/v1/leases/{manifest['lease']}")


def test_route_needs_a_live_lease_and_the_token(raw: httpx.Client, daemon: Daemon) -> None:
    path = _save(daemon.root, "route_lease.pt")
    url, manifest = _arena_url(raw, path)
    assert daemon.tcp is not None
    assert httpx.get(daemon.tcp + url).status_code == 401
    other = raw.get(f"/v1/leases/{manifest['lease']}/arenas/ckptd-not-an-arena")
    assert other.status_code == 404 and other.json()["error"]["type"] == "CheckpointNotFoundError"
    raw.delete(f"/v1/leases/{manifest['lease']}")
    gone = raw.get(url, headers={"Range": "bytes=0-9"})
    assert gone.status_code == 410 and gone.json()["error"]["type"] == "LeaseLostError"


# ------------------------------------------------------------------ checksums, against a fake daemon


@contextlib.contextmanager
def _serving(data: bytes, corrupt: int) -> Iterator[tuple[RangeReader, list[str]]]:
    """A fake daemon serving ``data`` by range: the first ``corrupt`` answers have one byte flipped."""
    calls: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the daemon

        def do_GET(self) -> None:
            first, last = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
            body = bytearray(data[first : last + 1])
            crc = zlib.crc32(body)
            calls.append(self.headers["Range"])
            if len(calls) <= corrupt:
                body[0] ^= 0xFF
            self.send_response(206)
            self.send_header(CHECKSUM_HEADER, f"{crc:08x}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    reader = RangeReader(f"http://127.0.0.1:{server.server_address[1]}", {}, timeout=10)
    try:
        yield reader, calls
    finally:
        reader.close()
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_corrupted_range_is_fetched_again() -> None:
    data = bytes(range(256)) * 40
    with _serving(data, corrupt=1) as (reader, calls):
        views, stats = fetch_views(reader, "lease", [Placement("0", "a", 0, len(data))], connections=1)
    assert bytes(views["0"].tolist()) == data
    assert stats.retries == 1 and len(calls) == 2


def test_a_range_that_stays_corrupted_is_refused() -> None:
    with _serving(b"x" * 100, corrupt=99) as (reader, calls), pytest.raises(ckptd.DaemonError, match="checksum mismatch"):
        fetch_views(reader, "lease", [Placement("0", "a", 0, 100)])
    assert len(calls) == 3


def test_ranges_arrive_in_place_on_several_connections() -> None:
    data = bytes(range(251)) * 1000  # 251 000 bytes: 4 storages in 16 KiB ranges
    placements = [Placement(str(i), "a", i * 62_750, 62_750) for i in range(4)]
    with _serving(data, corrupt=0) as (reader, calls):
        views, stats = fetch_views(reader, "lease", placements, connections=4, range_bytes=16 << 10)
    assert b"".join(bytes(views[str(i)].tolist()) for i in range(4)) == data
    assert stats.ranges == len(calls) == 4 * 4 and stats.nbytes == len(data) and stats.retries == 0


def test_index_route_reads_inside_the_roots_only(raw: httpx.Client, daemon: Daemon, tmp_path: Path) -> None:
    index = _sharded(daemon.root)
    body = raw.post("/v1/index", json={"path": str(index)}).json()
    assert body["weight_map"] == json.loads(index.read_text())["weight_map"]
    outside = tmp_path / "elsewhere.index.json"
    outside.write_text(index.read_text())
    refused = raw.post("/v1/index", json={"path": str(outside)})
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "PathNotAllowedError"
    assert raw.post("/v1/index", json={"path": str(_save(daemon.root, "not_index.pt"))}).status_code == 422


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks torch's error where there is no CUDA device")
def test_streamed_gpu_target_without_gpus_is_torchs_error(http_client: ckptd.Client, daemon: Daemon) -> None:
    path = _save(daemon.root, "to_gpu.pt")
    with pytest.raises(RuntimeError) as expected:
        torch.load(path, map_location="cuda:0")
    with pytest.raises(ckptd.DeviceError) as got:
        http_client.load(path, map_location="cuda:0")
    assert isinstance(got.value, RuntimeError) and str(got.value) == str(expected.value)
    assert cached_entry(http_client, path)["leases"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_gpu_target(http_client: ckptd.Client, daemon: Daemon) -> None:
    path = _save(daemon.root, "to_gpu_real.pt")
    assert_same(torch.load(path, map_location="cuda:0"), http_client.load(path, map_location="cuda:0"))
    assert http_client.transport_used == "http"


def test_a_worker_given_only_the_socket_file_streams(daemon: Daemon, short_dir: Path) -> None:
    """A container that mounts the daemon's socket file alone (not its directory) has no
    descriptor socket beside it: host arenas cannot reach it, so ``auto`` streams over that
    socket; ``shm`` says what to do."""
    path = _save(daemon.root, "socket_only.pt")
    alone = short_dir / "d.sock"
    os.link(daemon.sock, alone)  # the same socket under another name, with no .fd beside it
    with ckptd.Client(f"unix://{alone}") as client:
        assert_same(torch.load(path), client.load(path))
        assert client.transport_used == "http" and client.loads_by_transport == {"http": 1}
        assert cached_entry(client, path)["leases"] == 0
    with ckptd.Client(f"unix://{alone}", transport="shm") as client:
        with pytest.raises(ckptd.DaemonError, match="transport='http'"):
            client.load(path)
    with ckptd.Client(daemon.url) as client:  # beside it, the same daemon maps
        assert_same(torch.load(path), client.load(path))
        assert client.transport_used == "shm"
