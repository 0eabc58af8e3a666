"""The client's settings (``ckptd.settings``) and its one boundary for transport errors."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

import ckptd
from ckptd._client import _clients
from ckptd._connection import Connection
from ckptd.engine._settings import ClientSettings, Settings, parse_size
from ckptd._wire import transport_errors


def test_variables_are_read_once_on_first_use() -> None:
    environ = {"CKPTD_URL": "unix:///run/a.sock", "CKPTD_READER_THREADS": "3", "CKPTD_CHUNK_BYTES": "1Mi"}
    settings = Settings(environ)
    environ["CKPTD_READER_THREADS"] = "5"  # before the first use: seen
    assert (settings.url, settings.reader_threads, settings.chunk_bytes) == ("unix:///run/a.sock", 5, 1 << 20)
    environ["CKPTD_READER_THREADS"] = "7"  # after it: not read again
    assert settings.reader_threads == 5


def test_defaults_without_variables() -> None:
    settings = Settings({"XDG_RUNTIME_DIR": "/run/user/7"})
    assert (settings.url, settings.token, settings.reader_threads, settings.chunk_bytes, settings.timeout) == (
        None, None, None, None, 600.0,
    )
    assert settings.current().default_url == "unix:///run/user/7/ckptd.sock"


def test_set_is_process_wide_and_a_block_is_local() -> None:
    settings = Settings({})
    settings.set(timeout=30, chunk_bytes="2MiB")
    seen_in_thread: list[float] = []
    with settings(timeout=5) as inside:
        assert inside.timeout == 5.0 and settings.timeout == 5.0
        assert settings.chunk_bytes == 2 << 20  # what the block does not change stays
        with settings(reader_threads=2):
            assert (settings.timeout, settings.reader_threads) == (5.0, 2)
        assert settings.reader_threads is None
        thread = threading.Thread(target=lambda: seen_in_thread.append(settings.timeout))
        thread.start()
        thread.join()
    assert seen_in_thread == [30.0]  # another thread sees the process's settings, not the block's
    assert settings.timeout == 30.0


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"threads": 2}, "unknown client setting"),
        ({"reader_threads": 0}, "reader_threads"),
        ({"reader_threads": "many"}, "reader_threads"),
        ({"chunk_bytes": "16Q"}, "not a size"),
        ({"chunk_bytes": 0}, "chunk_bytes"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": "soon"}, "timeout"),
    ],
)
def test_bad_settings_are_usage_errors(changes: dict, match: str) -> None:
    settings = Settings({})
    with pytest.raises(ckptd.UsageError, match=match):
        settings.set(**changes)
    with pytest.raises(ckptd.UsageError, match=match), settings(**changes):
        pass


def test_bad_variable_is_a_usage_error_naming_it() -> None:
    with pytest.raises(ckptd.UsageError, match="chunk_bytes"):
        Settings({"CKPTD_CHUNK_BYTES": "lots"}).current()


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match="no setting 'threads'"):
        ckptd.settings.threads  # noqa: B018


def test_token_never_shows_in_repr() -> None:
    assert "s3cret" not in repr(ClientSettings(token="s3cret"))


def test_sizes_read_like_kubernetes() -> None:
    assert parse_size("16G") == 16 * 10**9 and parse_size("16Gi") == parse_size("16GiB") == 16 << 30


# --- the reader's tunables reach the engine ---------------------------------------------


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.pt"
    torch.save({"a": torch.arange(64 * 1024, dtype=torch.float32), "b": torch.ones(32 * 1024)}, path)
    return path


def _read_calls(path: Path) -> tuple[dict, list[tuple[frozenset[str], int]]]:
    """The load, and per chunk read: the reader pool's threads alive then, and its bytes."""
    calls: list[tuple[frozenset[str], int]] = []
    lock = threading.Lock()

    def progress(nbytes: int) -> None:
        readers = frozenset(t.name for t in threading.enumerate() if t.name.startswith("ckptd-read"))
        with lock:
            calls.append((readers, nbytes))

    return ckptd.load(path, progress=progress), calls


def test_chunk_bytes_and_threads_reach_the_reader(big_file: Path) -> None:
    expected = torch.load(big_file)
    state, calls = _read_calls(big_file)
    assert max(n for _, n in calls) > 64 * 1024  # the default chunk (16 MiB) takes a storage whole
    with ckptd.settings(chunk_bytes="16KiB", reader_threads=1):
        state, calls = _read_calls(big_file)
    assert torch.equal(state["a"], expected["a"]) and torch.equal(state["b"], expected["b"])
    assert max(n for _, n in calls) == 16 * 1024 and sum(n for _, n in calls) == 384 * 1024
    assert all(not readers for readers, _ in calls)  # one thread reads: no pool
    with ckptd.settings(chunk_bytes="16KiB", reader_threads=5):
        _, calls = _read_calls(big_file)
    assert 3 <= max(len(readers) for readers, _ in calls) <= 5  # more than the default of 2 cores, at most 5


# --- the daemon client's side -------------------------------------------------------------


def test_connection_takes_url_token_and_timeout_from_settings() -> None:
    with ckptd.settings(url="unix:///run/ckptd-test.sock", token="s3cret", timeout=7):
        with Connection() as daemon:
            assert daemon.url == "unix:///run/ckptd-test.sock"
            assert daemon._http.headers["Authorization"] == "Bearer s3cret"
            assert daemon._http.timeout.read == 7.0
        with Connection("unix:///run/other.sock", token="", timeout=2) as daemon:  # arguments win
            assert daemon.url == "unix:///run/other.sock" and "Authorization" not in daemon._http.headers
            assert daemon._http.timeout.read == 2.0


@pytest.fixture
def silent_socket() -> Iterator[str]:
    """A Unix socket that accepts connections and never answers."""
    folder = tempfile.mkdtemp(prefix="ck", dir="/tmp")
    path = f"{folder}/s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)
        sock.listen(8)
        yield f"unix://{path}"
    shutil.rmtree(folder, ignore_errors=True)


def test_load_goes_to_the_daemon_named_in_settings_and_times_out(silent_socket: str, big_file: Path) -> None:
    """``ckptd.load`` sends the load to ``settings.url``, with ``settings.timeout``; a daemon
    that does not answer in time is a DaemonTimeoutError (also a TimeoutError), not httpx's."""
    try:
        with ckptd.settings(url=silent_socket, timeout=0.2), pytest.raises(ckptd.DaemonTimeoutError) as caught:
            ckptd.load(big_file)
    finally:
        client = _clients.pop(silent_socket, None)
        if client is not None:
            client.close()
    assert isinstance(caught.value, TimeoutError) and isinstance(caught.value.__cause__, httpx.TimeoutException)


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (httpx.ConnectError("refused"), ckptd.DaemonNotRunningError),
        (httpx.ConnectTimeout("slow"), ckptd.DaemonNotRunningError),
        (httpx.RemoteProtocolError("closed"), ckptd.DaemonNotRunningError),
        (FileNotFoundError(2, "No such file"), ckptd.DaemonNotRunningError),
        (httpx.ReadTimeout("slow"), ckptd.DaemonTimeoutError),
        (httpx.PoolTimeout("busy"), ckptd.DaemonTimeoutError),
        (httpx.ReadError("reset"), ckptd.DaemonError),
        (httpx.WriteError("broken"), ckptd.DaemonError),
        (httpx.UnsupportedProtocol("ftp"), ckptd.UsageError),
        (ConnectionResetError(104, "reset"), ckptd.DaemonError),
        (TimeoutError("timed out"), ckptd.DaemonTimeoutError),
    ],
)
def test_every_transport_error_becomes_a_ckptd_error(raised: Exception, expected: type) -> None:
    with pytest.raises(expected) as caught, transport_errors("unix:///run/ckptd.sock"):
        raise raised
    assert caught.value.__cause__ is raised
    assert isinstance(caught.value, ckptd.CkptdError)


def test_ckptd_errors_pass_through_the_boundary() -> None:
    error = ckptd.CheckpointNotFoundError("/m/a.pt", "no such file")  # also a FileNotFoundError
    with pytest.raises(ckptd.CheckpointNotFoundError) as caught, transport_errors("unix:///run/ckptd.sock"):
        raise error
    assert caught.value is error


def test_readme_lists_every_client_setting() -> None:
    """The README's table of client settings names each setting and its variable, and nothing else."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("| setting | variable | default |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1:3] for line in section.strip().splitlines()[1:]]
    assert {name.strip(" `"): var.strip(" `") for name, var in rows} == ClientSettings.variables()


def _open_descriptors() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", ["refused", "missing"])
def test_a_failed_unix_connect_closes_its_socket(kind: str) -> None:
    """httpcore leaves a socket whose connect failed to the garbage collector; ckptd's transport closes it.

    With the collector paused, each failed attempt would keep one descriptor open; the
    collection at the end would warn (an error here) for each.
    """
    import gc

    folder = tempfile.mkdtemp(prefix="ck", dir="/tmp")
    path = f"{folder}/ckptd.sock"
    if kind == "refused":  # a socket file nobody listens on
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
            bound.bind(path)
    gc.collect()
    gc.disable()
    try:
        before = _open_descriptors()
        for _ in range(5):
            with Connection(f"unix://{path}") as daemon, pytest.raises(ckptd.DaemonNotRunningError):
                daemon.health()
        after = _open_descriptors()
    finally:
        gc.enable()
        shutil.rmtree(folder, ignore_errors=True)
    assert after == before
    gc.collect()
