"""The daemon's settings: precedence, sizes, the environment, TCP and token rules, socket paths,
and the one schema (flags, variables and the README's table all come from the model)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from ckptd import UsageError
from ckptd._cli import build_parser
from ckptd.server import Settings, flags_of, load_settings, settings_table
from ckptd.server._config import MAX_SOCKET_PATH, flag_of, host_memory, parse_size, unknown_variables, variables


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No CKPTD_* variable from the outside world leaks into a test."""
    for key in list(os.environ):
        if key.upper().startswith("CKPTD_"):
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ck", dir="/tmp"))
    yield path
    path.rmdir()


def _settings(root: Path, **flags: object) -> Settings:
    flags.setdefault("shm_dir", root)
    flags.setdefault("socket", "/tmp/ckcfg/d.sock")
    return load_settings(roots=[root], **flags)


def _token_file(tmp_path: Path, text: str = "s3cret\n", mode: int = 0o600) -> Path:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(mode)
    return path


# --- defaults and precedence ------------------------------------------------------------


def test_defaults(root: Path) -> None:
    s = _settings(root)
    assert s.roots == (root.resolve(),)
    assert (s.host, s.port, s.token_file, s.allow_insecure_tcp) == ("127.0.0.1", None, None, False)
    assert s.host_budget == host_memory() // 2
    assert s.gpu_budget == {}
    assert (s.lease_ttl, s.max_body_bytes, s.log_level) == (30.0, 1024 * 1024, "info")
    assert s.token is None and s.tcp_url is None


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm here")
def test_shm_dir_defaults_to_dev_shm(root: Path) -> None:
    assert load_settings(roots=[root], socket="/tmp/ckcfg/d.sock").shm_dir == Path("/dev/shm").resolve()


def test_default_socket_uses_xdg_runtime_dir(root: Path, clean_env: pytest.MonkeyPatch, sock_dir: Path) -> None:
    clean_env.setenv("XDG_RUNTIME_DIR", str(sock_dir))
    assert load_settings(roots=[root], shm_dir=root).socket == sock_dir / "ckptd.sock"


def test_default_socket_without_xdg_runtime_dir(root: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.delenv("XDG_RUNTIME_DIR", raising=False)
    assert load_settings(roots=[root], shm_dir=root).socket == Path(f"/tmp/ckptd-{os.getuid()}/ckptd.sock")


def test_env_overrides_defaults(root: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CKPTD_LEASE_TTL", "5")
    clean_env.setenv("CKPTD_HOST", "0.0.0.0")
    s = _settings(root)
    assert (s.lease_ttl, s.host) == (5.0, "0.0.0.0")


def test_flags_override_env(root: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CKPTD_LEASE_TTL", "5")
    clean_env.setenv("CKPTD_HOST_BUDGET", "1GiB")
    s = _settings(root, lease_ttl=7, host_budget="2GiB")
    assert (s.lease_ttl, s.host_budget) == (7.0, 2 << 30)


def test_flag_given_as_none_leaves_env_in_charge(root: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CKPTD_LEASE_TTL", "5")
    assert _settings(root, lease_ttl=None).lease_ttl == 5.0


def test_roots_from_env_are_colon_separated(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    clean_env.setenv("CKPTD_ROOTS", f"{a}:{b}")
    assert load_settings(shm_dir=tmp_path, socket="/tmp/ckcfg/d.sock").roots == (a.resolve(), b.resolve())


def test_roots_are_resolved_and_deduplicated(root: Path) -> None:
    link = root.parent / "link"
    link.symlink_to(root)
    assert load_settings(roots=[root, link], shm_dir=root, socket="/tmp/ckcfg/d.sock").roots == (root.resolve(),)


def test_settings_are_frozen(root: Path) -> None:
    s = _settings(root)
    with pytest.raises(ValidationError):
        s.lease_ttl = 1.0  # type: ignore[misc]


# --- validation -------------------------------------------------------------------------


def test_roots_are_required(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="roots"):
        load_settings(shm_dir=tmp_path, socket="/tmp/ckcfg/d.sock")


def test_roots_cannot_be_empty(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="at least one root"):
        load_settings(roots=[], shm_dir=tmp_path, socket="/tmp/ckcfg/d.sock")


def test_root_must_exist_and_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such directory"):
        load_settings(roots=[tmp_path / "missing"], shm_dir=tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="no such directory"):
        load_settings(roots=[tmp_path / "file"], shm_dir=tmp_path)


def test_shm_dir_must_exist(root: Path) -> None:
    with pytest.raises(UsageError, match="shm_dir"):
        _settings(root, shm_dir=root / "missing")


@pytest.mark.parametrize(
    ("flag", "value", "match"),
    [
        ("lease_ttl", 0, "lease_ttl"),
        ("lease_ttl", -1.5, "lease_ttl"),
        ("max_body_bytes", 0, "max_body_bytes"),
        ("port", 70000, "port"),
        ("log_level", "loud", "log level"),
        ("host_budget", "12QB", "not a size"),
    ],
)
def test_bad_values_are_usage_errors(root: Path, flag: str, value: object, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        _settings(root, **{flag: value})


def test_log_level_is_normalised(root: Path) -> None:
    assert _settings(root, log_level="DEBUG").log_level == "debug"


def test_unknown_flag_is_rejected(root: Path) -> None:
    with pytest.raises(UsageError, match="bogus: not a setting"):
        _settings(root, bogus=1)


# --- sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("123", 123),
        (456, 456),
        ("16GiB", 16 << 30),
        ("16G", 16 * 10**9),  # pydantic ByteSize and Kubernetes: G is decimal
        ("16Gi", 16 << 30),  # Kubernetes' binary suffix
        ("48Gi", 48 << 30),
        ("16gib", 16 << 30),
        ("500MB", 500_000_000),
        ("500 MiB", 500 << 20),
        ("1.5KiB", 1536),
        ("2kb", 2000),
        ("1TiB", 1 << 40),
        ("7B", 7),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12QB", "-5", "1.2.3G", "lots", "16Gx", "1e3"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_size_percent() -> None:
    assert parse_size("75%", total=1000) == 750
    assert parse_size("100%", total=1000) == 1000
    for bad in ("0%", "150%", "x%"):
        with pytest.raises(ValueError):
            parse_size(bad, total=1000)
    with pytest.raises(ValueError, match="percentage is not accepted"):
        parse_size("50%")


def test_host_budget_percent_of_ram(root: Path) -> None:
    assert _settings(root, host_budget="50%").host_budget == host_memory() // 2
    assert _settings(root, host_budget="25%").host_budget == host_memory() // 4


def test_gpu_budget_from_env_pairs_and_json(root: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CKPTD_GPU_BUDGET", "cuda:0=40GiB, cuda:1=1000")
    assert _settings(root).gpu_budget == {"cuda:0": 40 << 30, "cuda:1": 1000}
    clean_env.setenv("CKPTD_GPU_BUDGET", '{"cuda:0": "2GiB"}')
    assert _settings(root).gpu_budget == {"cuda:0": 2 << 30}


def test_gpu_budget_flag_and_errors(root: Path) -> None:
    assert _settings(root, gpu_budget={"cuda:0": "1GiB"}).gpu_budget == {"cuda:0": 1 << 30}
    with pytest.raises(UsageError, match="percentage"):
        _settings(root, gpu_budget={"cuda:0": "50%"})
    with pytest.raises(UsageError, match="DEVICE=SIZE"):
        _settings(root, gpu_budget="cuda:0")


# --- the environment --------------------------------------------------------------------


def test_unknown_ckptd_variable_is_rejected_by_name(root: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CKPTD_ROOT", str(root))  # misspelt CKPTD_ROOTS
    clean_env.setenv("CKPTD_LEASETTL", "3")
    with pytest.raises(UsageError, match="CKPTD_LEASETTL, CKPTD_ROOT") as info:
        _settings(root)
    assert "CKPTD_ROOTS" in str(info.value)  # the message lists the real names


def test_client_variables_are_not_settings_but_allowed(root: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CKPTD_URL", "unix:///tmp/x.sock")
    clean_env.setenv("CKPTD_TOKEN", "abc")
    assert _settings(root).token is None


# What the kubelet sets in every pod of the namespace for a Service named ckptd with a
# port named http (Docker-links style), unless the pod has enableServiceLinks: false.
SERVICE_LINKS = {
    "CKPTD_SERVICE_HOST": "10.96.12.7",
    "CKPTD_SERVICE_PORT": "8750",
    "CKPTD_SERVICE_PORT_HTTP": "8750",
    "CKPTD_PORT": "tcp://10.96.12.7:8750",
    "CKPTD_PORT_8750_TCP": "tcp://10.96.12.7:8750",
    "CKPTD_PORT_8750_TCP_PROTO": "tcp",
    "CKPTD_PORT_8750_TCP_PORT": "8750",
    "CKPTD_PORT_8750_TCP_ADDR": "10.96.12.7",
}


def test_kubernetes_service_links_are_ignored(root: Path, clean_env: pytest.MonkeyPatch) -> None:
    for key, value in SERVICE_LINKS.items():
        clean_env.setenv(key, value)
    s = _settings(root)
    assert s.port is None and s.tcp_url is None  # not TCP on the Service's port
    assert _settings(root, port=8750, allow_insecure_tcp=True).port == 8750  # a flag still decides
    clean_env.setenv("CKPTD_PORT", "9000")
    assert _settings(root, allow_insecure_tcp=True).port == 9000  # a real CKPTD_PORT is still a setting
    clean_env.setenv("CKPTD_SERVICE_HOSTS", "x")  # near misses are still refused
    with pytest.raises(UsageError, match="CKPTD_SERVICE_HOSTS"):
        _settings(root)


def test_unknown_variables_ignores_other_prefixes() -> None:
    env = {"CKPTD_PORT": "1", "ckptd_bogus": "1", "XCKPTD_FOO": "1", "HOME": "/root"}
    assert unknown_variables(env) == ["ckptd_bogus"]


# --- TCP and the token ------------------------------------------------------------------


def test_tcp_without_token_is_refused(root: Path) -> None:
    with pytest.raises(UsageError, match="without a token is refused"):
        _settings(root, port=8750)


def test_tcp_without_token_when_allowed(root: Path) -> None:
    s = _settings(root, port=8750, allow_insecure_tcp=True)
    assert s.tcp_url == "http://127.0.0.1:8750"


def test_tcp_with_token(root: Path, tmp_path: Path) -> None:
    s = _settings(root, port=8750, token_file=_token_file(tmp_path))
    assert s.token == "s3cret"


def test_tcp_url_brackets_ipv6(root: Path) -> None:
    assert _settings(root, host="::1", port=1, allow_insecure_tcp=True).tcp_url == "http://[::1]:1"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_token_file_must_be_owner_only(root: Path, tmp_path: Path, mode: int) -> None:
    s = _settings(root, token_file=_token_file(tmp_path, mode=mode))
    with pytest.raises(UsageError, match="owner only"):
        s.token


def test_token_is_read_once(root: Path, tmp_path: Path) -> None:
    path = _token_file(tmp_path, mode=0o400)
    s = _settings(root, token_file=path)
    assert s.token == "s3cret"
    path.chmod(0o600)
    path.write_text("changed")
    assert s.token == "s3cret"


def test_empty_or_missing_token_file(root: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="empty"):
        _settings(root, token_file=_token_file(tmp_path, text=" \n")).token
    with pytest.raises(UsageError, match="cannot read"):
        _settings(root, token_file=tmp_path / "missing").token


# --- the socket path --------------------------------------------------------------------


def test_socket_path_length(root: Path) -> None:
    longest = "/tmp/" + "s" * (MAX_SOCKET_PATH - len("/tmp/"))
    assert len(longest) == 107
    assert str(_settings(root, socket=longest).socket) == longest
    with pytest.raises(UsageError, match="under 108 bytes"):
        _settings(root, socket=longest + "s")


def test_socket_length_counts_bytes(root: Path) -> None:
    name = "/tmp/" + "é" * 52  # 5 + 104 bytes, 57 characters
    with pytest.raises(UsageError, match="under 108 bytes"):
        _settings(root, socket=name)


def test_relative_socket_is_made_absolute(root: Path, clean_env: pytest.MonkeyPatch, sock_dir: Path) -> None:
    clean_env.chdir(sock_dir)
    assert _settings(root, socket="d.sock").socket == sock_dir / "d.sock"


def test_default_socket_is_checked_too(root: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("XDG_RUNTIME_DIR", "/tmp/" + "x" * 110)
    with pytest.raises(UsageError, match="under 108 bytes"):
        load_settings(roots=[root], shm_dir=root)


# --- GPUs -------------------------------------------------------------------------------


def test_gpu_settings_from_env_and_flags(root: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CKPTD_DEVICES", "simulated")
    clean_env.setenv("CKPTD_SIMULATED_GPUS", "2")
    clean_env.setenv("CKPTD_GPU_BUDGET", "cuda:1=1GiB")
    settings = _settings(root, gpu_sharing="vmm", host_tier_budget="2GiB")
    assert (settings.devices, settings.simulated_gpus, settings.gpu_sharing) == ("simulated", 2, "vmm")
    assert settings.gpu_budget == {"cuda:1": 1 << 30} and settings.host_tier_budget == 2 << 30
    assert _settings(root).devices == "simulated" and _settings(root, devices="none").devices == "none"


def test_simulated_devices_need_a_count(root: Path) -> None:
    with pytest.raises(UsageError, match="simulated_gpus > 0"):
        _settings(root, devices="simulated")
    with pytest.raises(UsageError, match="gpu_sharing"):
        _settings(root, gpu_sharing="nvlink")


def test_gpu_tier_from_settings(root: Path) -> None:
    from ckptd.server._server import device_tier

    assert device_tier(_settings(root, devices="none")) is None
    tier = device_tier(_settings(root, devices="simulated", simulated_gpus=2, gpu_budget="cuda:1=1GiB"))
    assert tier is not None
    uuids = [d.uuid for d in tier.devices.visible()]
    # the default leaves room for the CUDA contexts of the daemon and its workers: 4 GiB of a 16 GiB GPU
    assert tier.budgets[uuids[1]] == 1 << 30 and tier.budgets[uuids[0]] == (16 - 4) * (1 << 30)
    with pytest.raises(UsageError, match=r"gpu_budget names \['cuda:5'\]"):
        device_tier(_settings(root, devices="simulated", simulated_gpus=2, gpu_budget="cuda:5=1GiB"))


# --- one schema: flags, variables, the README's table -----------------------------------


def _serve_help() -> str:
    proc = subprocess.run([sys.executable, "-m", "ckptd", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_serve_help_lists_every_setting_with_its_variable() -> None:
    text = " ".join(_serve_help().split())  # argparse wraps lines
    for name in Settings.model_fields:
        assert flag_of(name) in text, name
        assert f"$CKPTD_{name.upper()}" in text, name


def test_every_setting_has_a_flag_that_sets_it(root: Path, tmp_path: Path) -> None:
    """Each flag reaches its field: ``ckptd serve``'s parser, fed one flag per setting, builds
    the settings it names (max_body_bytes included)."""
    token = _token_file(tmp_path)
    argv = [
        "serve", "--socket", "/tmp/ckcfg/f.sock", "--root", str(root), "--host", "::1", "--port", "0",
        "--token-file", str(token), "--allow-insecure-tcp", "--public-metrics", "--host-budget", "2Gi",
        "--devices", "simulated", "--simulated-gpus", "2", "--gds", "--gpu-sharing", "vmm",
        "--gpu-budget", "cuda:0=1G", "--host-tier-budget", "3GiB", "--shm-dir", str(root), "--lease-ttl", "4",
        "--max-body-bytes", "2MiB", "--request-timeout", "3", "--keep-alive-timeout", "2",
        "--max-tcp-connections", "9", "--log-level", "debug", "--log-format", "json",
    ]  # fmt: skip
    flags = flags_of(build_parser().parse_args(argv))
    assert set(flags) == set(Settings.model_fields)
    assert all(value is not None for value in flags.values()), flags  # every setting has its flag
    s = load_settings(**flags)
    assert (s.socket, s.roots, s.host, s.port, s.token_file) == (Path("/tmp/ckcfg/f.sock"), (root.resolve(),), "::1", 0, token)
    assert (s.allow_insecure_tcp, s.public_metrics, s.gds) == (True, True, True)
    assert (s.host_budget, s.host_tier_budget, s.gpu_budget) == (2 << 30, 3 << 30, {"cuda:0": 10**9})
    assert (s.devices, s.simulated_gpus, s.gpu_sharing, s.shm_dir) == ("simulated", 2, "vmm", root.resolve())
    assert (s.lease_ttl, s.max_body_bytes, s.log_level, s.log_format) == (4.0, 2 << 20, "debug", "json")
    assert (s.request_timeout, s.keep_alive_timeout, s.max_tcp_connections) == (3.0, 2.0, 9)


def test_every_setting_has_its_variable(root: Path, clean_env: pytest.MonkeyPatch) -> None:
    assert set(variables()) == set(Settings.model_fields)
    clean_env.setenv("CKPTD_MAX_BODY_BYTES", "64KiB")
    clean_env.setenv("CKPTD_HOST_TIER_BUDGET", "1G")
    s = _settings(root)
    assert (s.max_body_bytes, s.host_tier_budget) == (64 << 10, 10**9)
    assert unknown_variables({v: "1" for v in variables().values()}) == []


def test_readme_settings_table_is_the_models() -> None:
    """The README's table is :func:`settings_table`'s output, between its markers."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start, end = "<!-- settings-table: generated from ckptd.server.Settings -->", "<!-- /settings-table -->"
    assert start in readme and end in readme
    table = readme.split(start, 1)[1].split(end, 1)[0].strip().splitlines()
    assert table == settings_table()
    assert len(table) == 2 + len(Settings.model_fields)


def test_client_variables_are_left_to_the_client(root: Path, clean_env: pytest.MonkeyPatch) -> None:
    """The client's settings (ckptd.settings) are not the daemon's, and not refused by it."""
    for variable in ("CKPTD_URL", "CKPTD_TOKEN", "CKPTD_READER_THREADS", "CKPTD_CHUNK_BYTES", "CKPTD_TIMEOUT"):
        clean_env.setenv(variable, "1")
    assert _settings(root).token is None
    assert not set(variables().values()) & {"CKPTD_URL", "CKPTD_TOKEN", "CKPTD_TIMEOUT"}


@pytest.mark.parametrize(
    "text", ["0", "7", "7B", "1.5KiB", "1.5kib", "2kb", "2k", "16G", "16GB", "16g", "16GiB", "16Gi", "48Gi", "500 MiB",
             "1TiB", "1Ti", "3T", "2PiB", "1EiB", "0.5Mi"],
)  # fmt: skip
def test_client_and_daemon_read_sizes_alike(text: str) -> None:
    """The client's size parser (no pydantic) agrees with the daemon's (pydantic's ByteSize)."""
    from ckptd.engine import parse_size as client_parse_size

    assert client_parse_size(text) == parse_size(text)


@pytest.mark.parametrize("text", ["", "GiB", "12QB", "-5", "1.2.3G", "lots", "16Gx", "1e3"])
def test_client_and_daemon_refuse_the_same_sizes(text: str) -> None:
    from ckptd.engine import parse_size as client_parse_size

    with pytest.raises(ValueError):
        client_parse_size(text)
    with pytest.raises(ValueError):
        parse_size(text)



def test_log_format(root: Path, clean_env: pytest.MonkeyPatch) -> None:
    assert _settings(root).log_format == "text"
    clean_env.setenv("CKPTD_LOG_FORMAT", "json")
    assert _settings(root).log_format == "json"
    with pytest.raises(UsageError, match="log_format"):
        _settings(root, log_format="xml")
