"""The ``ckptd`` command line, driven through ``main([...])`` on real checkpoints."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import ckptd
from ckptd._cli import format_shape, human_bytes, main, parse_map_location, short_dtype


def _state() -> dict[str, torch.Tensor]:
    return {
        "embed.weight": torch.randn(16, 8, dtype=torch.bfloat16),
        "layer.0.weight": torch.randn(8, 8),
        "layer.0.bias": torch.zeros(8, dtype=torch.float64),
        "layer.1.count": torch.arange(5, dtype=torch.int64),
        "scale": torch.tensor(2.0, dtype=torch.float16),
    }


@pytest.fixture
def zip_ckpt(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "model.pt"
    torch.save(_state(), path)
    return path


@pytest.fixture
def legacy_ckpt(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "legacy.pt"
    torch.save(_state(), path, _use_new_zipfile_serialization=False)
    return path


@pytest.fixture
def safetensors_ckpt(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "model.safetensors"
    save_file(_state(), str(path))
    return path


@pytest.fixture
def sharded_ckpt(tmp_path: pathlib.Path) -> pathlib.Path:
    state = _state()
    names = list(state)
    parts = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for shard, shard_names in parts.items():
        save_file({name: state[name] for name in shard_names}, str(tmp_path / shard))
        weight_map.update({name: shard for name in shard_names})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def _expected(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint really holds, by name, read the plain way."""
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        return {name: _expected(path.parent / shard)[name] for name, shard in weight_map.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


CHECKPOINTS = ["zip_ckpt", "legacy_ckpt", "safetensors_ckpt", "sharded_ckpt"]


# --- inspect ---------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", CHECKPOINTS)
def test_inspect_table_lists_every_tensor(fixture: str, request: pytest.FixtureRequest, capsys) -> None:
    path: pathlib.Path = request.getfixturevalue(fixture)
    code, out, err = _run(capsys, "inspect", str(path))
    assert (code, err) == (0, "")
    expected = _expected(path)
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split() and line.split()[0] in expected}
    assert set(rows) == set(expected)
    for name, tensor in expected.items():
        line = " ".join(rows[name])
        cells = f"{name} {short_dtype(tensor.dtype)} {format_shape(tensor.shape)} {human_bytes(tensor.nbytes)} cpu"
        assert line == cells
    assert f"format:   {ckptd.inspect(path).format.value}" in out
    assert f"tensors:  {len(expected)}" in out


def test_inspect_table_is_aligned(zip_ckpt: pathlib.Path, capsys) -> None:
    _, out, _ = _run(capsys, "inspect", str(zip_ckpt))
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("NAME"))
    table = lines[header : header + 1 + len(_state())]
    dtype_col = lines[header].index("DTYPE")
    assert all(line[dtype_col - 2 : dtype_col] == "  " and line[dtype_col] != " " for line in table)
    bytes_end = lines[header].index("BYTES") + len("BYTES")
    assert all(line[bytes_end - 1] != " " and line[bytes_end] == " " for line in table)


@pytest.mark.parametrize("fixture", CHECKPOINTS)
def test_inspect_json_matches(fixture: str, request: pytest.FixtureRequest, capsys) -> None:
    path: pathlib.Path = request.getfixturevalue(fixture)
    code, out, _ = _run(capsys, "inspect", str(path), "--json")
    assert code == 0
    data = json.loads(out)
    expected = _expected(path)
    layout = ckptd.inspect(path)
    assert [t["name"] for t in data["tensors"]] == list(layout.tensor_map())
    for entry in data["tensors"]:
        tensor = expected[entry["name"]]
        assert entry["dtype"] == short_dtype(tensor.dtype)
        assert entry["shape"] == list(tensor.shape)
        assert entry["nbytes"] == tensor.nbytes
    assert data["format"] == layout.format.value
    assert data["tensor_count"] == len(expected)
    assert data["storage_count"] == len(layout.storages)
    assert data["storage_bytes"] == sum(t.nbytes for t in expected.values())
    assert data["file_size"] == _file_size(path)


def _file_size(path: pathlib.Path) -> int:
    if not path.name.endswith(".index.json"):
        return path.stat().st_size
    shards = set(json.loads(path.read_text())["weight_map"].values())
    return sum((path.parent / shard).stat().st_size for shard in shards)


def test_inspect_shared_storage_counts_once(tmp_path: pathlib.Path, capsys) -> None:
    base = torch.arange(12, dtype=torch.float32)
    path = tmp_path / "views.pt"
    torch.save({"base": base, "view": base[2:6]}, path)
    data = json.loads(_run(capsys, "inspect", str(path), "--json")[1])
    assert data["storage_count"] == 1 and data["storage_bytes"] == 48
    assert {t["name"]: t["nbytes"] for t in data["tensors"]} == {"base": 48, "view": 16}


def test_inspect_empty_checkpoint(tmp_path: pathlib.Path, capsys) -> None:
    path = tmp_path / "empty.pt"
    torch.save({"epoch": 3}, path)
    code, out, _ = _run(capsys, "inspect", str(path))
    assert code == 0 and "(no tensors)" in out and "tensors:  0" in out


# --- load ------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", CHECKPOINTS)
def test_load_reports_storage_bytes(fixture: str, request: pytest.FixtureRequest, capsys) -> None:
    path: pathlib.Path = request.getfixturevalue(fixture)
    total = sum(t.nbytes for t in _expected(path).values())
    code, out, err = _run(capsys, "load", str(path), "--json")
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert report["bytes"] == total == ckptd.inspect(path).nbytes
    assert report["tensors"] == len(_state())
    assert report["seconds"] >= 0 and report["gb_per_s"] >= 0
    code, out, _ = _run(capsys, "load", str(path), "--map-location", "cpu")
    assert code == 0 and f"{total} bytes" in out and "GB/s" in out and out.startswith("loaded ")


@pytest.mark.parametrize("fixture", ["zip_ckpt", "sharded_ckpt"])
def test_load_select_reads_subset(fixture: str, request: pytest.FixtureRequest, capsys) -> None:
    path: pathlib.Path = request.getfixturevalue(fixture)
    expected = _expected(path)
    code, out, _ = _run(capsys, "load", str(path), "--select", "embed.weight", "layer.0.bias", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["tensors"] == 2
    assert report["bytes"] == expected["embed.weight"].nbytes + expected["layer.0.bias"].nbytes


def test_load_options(zip_ckpt: pathlib.Path, capsys) -> None:
    for extra in (["--map-location", '{"cuda:1": "cuda:0"}'], ["--map-location", "meta"],
                  ["--no-weights-only"], ["--weights-only", "--mmap"], ["--quiet"]):
        code, out, err = _run(capsys, "load", str(zip_ckpt), *extra)
        assert (code, err) == (0, ""), extra
        assert out.startswith("loaded ")


def test_load_to_meta_reports_no_throughput(zip_ckpt: pathlib.Path, capsys) -> None:
    """Nothing is read for meta tensors: no bytes, no GB/s (a figure would be meaningless)."""
    code, out, err = _run(capsys, "load", str(zip_ckpt), "--map-location", "meta")
    assert (code, err) == (0, "")
    assert "GB/s" not in out and "no bytes read" in out
    code, out, _ = _run(capsys, "load", str(zip_ckpt), "--map-location", "meta", "--json")
    report = json.loads(out)
    assert report["bytes"] == 0 and report["gb_per_s"] is None and report["tensors"] == len(_state())


def test_load_forced_progress_bar(zip_ckpt: pathlib.Path, capsys) -> None:
    code, _, err = _run(capsys, "load", str(zip_ckpt), "--progress")
    assert code == 0 and "reading" in err and "100%" in err
    code, _, err = _run(capsys, "load", str(zip_ckpt), "--progress", "--quiet")
    assert code == 0 and err == ""


def test_load_unknown_select_is_error(zip_ckpt: pathlib.Path, capsys) -> None:
    code, out, err = _run(capsys, "load", str(zip_ckpt), "--select", "embed.weigth")
    assert code == 1 and out == ""
    assert err.startswith("ckptd: error: ") and "embed.weight" in err and "Traceback" not in err


def test_load_missing_device_is_error(zip_ckpt: pathlib.Path, capsys) -> None:
    code, _, err = _run(capsys, "load", str(zip_ckpt), "--map-location", "nosuchdevice")
    assert code == 1 and err.startswith("ckptd: error: ")


# --- errors and arguments --------------------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "load"])
def test_missing_file(command: str, tmp_path: pathlib.Path, capsys) -> None:
    path = tmp_path / "absent.pt"
    code, out, err = _run(capsys, command, str(path))
    assert code == 1 and out == ""
    assert err.startswith("ckptd: error: ") and str(path) in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["inspect", "load"])
def test_garbage_file(command: str, tmp_path: pathlib.Path, capsys) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint at all" * 10)
    code, out, err = _run(capsys, command, str(path))
    assert code == 1 and out == ""
    assert err.startswith("ckptd: error: ") and str(path) in err and len(err.splitlines()) == 1


def test_directory_is_error(tmp_path: pathlib.Path, capsys) -> None:
    code, _, err = _run(capsys, "inspect", str(tmp_path))
    assert code == 1 and err.startswith("ckptd: error: ") and str(tmp_path) in err


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["inspect"], ["load", "x.pt", "--map-location", "{oops"], ["load", "x.pt", "--select"]],
)
def test_bad_arguments_exit_2(argv: list[str], capsys) -> None:
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "usage: ckptd" in err


def test_version_and_help(capsys) -> None:
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.strip() == f"ckptd {ckptd.__version__}"
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "inspect" in out and "load" in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [("cpu", "cpu"), ("cuda:0", "cuda:0"), ("meta", "meta"), ('{"cuda:1": "cuda:0"}', {"cuda:1": "cuda:0"})],
)
def test_parse_map_location(text: str, expected: Any) -> None:
    assert parse_map_location(text) == expected


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536 * 1024, 5 * 1024**4)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 MiB", "5.0 TiB",
    ]


def test_python_dash_m(zip_ckpt: pathlib.Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ckptd", "inspect", str(zip_ckpt)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "embed.weight" in result.stdout and "bfloat16" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "ckptd", "inspect", str(zip_ckpt) + ".missing"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and result.stderr.startswith("ckptd: error: ") and "Traceback" not in result.stderr


def test_serve_without_the_server_extra_says_what_to_install(tmp_path: pathlib.Path) -> None:
    """No raw ModuleNotFoundError traceback: one line naming the extra."""
    code = (
        "import sys; sys.modules['fastapi'] = None\n"  # as if the [server] extra were not installed
        "from ckptd._cli import main\n"
        f"sys.exit(main(['serve', '--root', {str(tmp_path)!r}, '--socket', '/tmp/ckcli-none/d.sock']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == (
        "ckptd: error: `ckptd serve` needs the daemon's dependencies, and fastapi is not installed: "
        "pip install 'ckptd[server]'"
    )


def test_serve_without_a_root_says_how_to_give_one(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    for key in [k for k in os.environ if k.startswith("CKPTD_")]:
        monkeypatch.delenv(key)
    code, out, err = _run(capsys, "serve", "--socket", "/tmp/ckcli-none/d.sock")
    assert code == 1 and out == ""
    assert err.strip() == "ckptd: error: invalid settings: roots: required (--root DIR, or CKPTD_ROOTS=dir1:dir2)"


# httpcore leaks the socket of a refused Unix connection (see tests/server/test_daemon.py).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_health_wait_gives_up_after_its_time(capsys) -> None:
    import time

    started = time.monotonic()
    code, out, err = _run(capsys, "health", "--wait", "0.5", "--url", "unix:///tmp/ckcli-none/d.sock")
    assert code == 1 and out == "" and "no ckptd daemon answers" in err
    assert time.monotonic() - started >= 0.5  # it kept asking, then gave the daemon's error
