"""Remote-worker benchmark: a checkpoint streamed over HTTP from the daemon's resident copy.

Measured side by side, round-robin in one run, on a checkpoint the daemon already holds
(``prefetch``) and whose file is in the page cache:

* ``torch.load``: ``torch.load(path, map_location='cpu')`` of the file itself (what a
  worker with a local copy of the checkpoint pays).
* ``ckptd http, N connections``: ``Client(tcp_url, token=..., transport='http').load(path,
  map_location='cpu')`` over loopback TCP with the token: manifest, N parallel CRC-32-checked
  range requests into this process's own memory, rebuild, lease released. A fresh
  ``Client`` each call. ``N`` sweeps ``--connections``.
* ``ckptd shm``: the same through the Unix socket, mapping the daemon's shared memory
  (the same-host path, for scale).

Every method's first result is checked equal to torch.load's (``torch.equal``, dtype,
shape, key order) before anything is timed. The daemon and this process share the
machine's cores: on a 2-core VM both ends of the stream compete for them.

Run: ``.venv/bin/python bench/remote_load.py`` (see bench/README.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_load import ensure_checkpoint, machine_info  # noqa: E402  (shared with the CPU bench)

import ckptd  # noqa: E402
import ckptd._remote as remote  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
READY = "ckptd: serving on "


def start_daemon(root: Path, work: Path, token_file: Path) -> tuple[subprocess.Popen, str, str]:
    """``ckptd serve`` on a socket in ``work`` and on a free loopback port with a token: (proc, unix URL, TCP URL)."""
    sock = str(work / "d.sock")
    shm = work / "shm"
    shm.mkdir()
    cmd = [sys.executable, "-m", "ckptd", "serve", "--socket", sock, "--root", str(root), "--shm-dir", "/dev/shm",
           "--port", "0", "--token-file", str(token_file), "--host-budget", "4GiB", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(READY):
        proc.kill()
        raise RuntimeError(f"daemon did not start: {line!r}")
    unix, tcp = line.strip().removeprefix(READY).split(" and ")
    return proc, unix, tcp


def check(reference: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> bool:
    return list(reference) == list(state) and all(
        state[k].dtype == reference[k].dtype and state[k].shape == reference[k].shape and torch.equal(state[k], reference[k])
        for k in reference
    )


def methods(path: Path, unix: str, tcp: str, token: str, sweep: list[int]) -> dict[str, Callable[[], Any]]:
    def torch_load() -> Any:
        return torch.load(path, map_location="cpu")

    def streamed(connections: int) -> Callable[[], Any]:
        def load() -> Any:
            remote.DEFAULT_CONNECTIONS = connections
            with ckptd.Client(tcp, token=token, transport="http") as client:
                state = client.load(path, map_location="cpu")
                assert client.transport_used == "http"
                return state

        return load

    def mapped() -> Any:
        with ckptd.Client(unix, token=token, transport="shm") as client:
            return client.load(path, map_location="cpu")

    todo: dict[str, Callable[[], Any]] = {"torch.load": torch_load}
    todo.update({f"ckptd http, {n} connections": streamed(n) for n in sweep})
    todo["ckptd shm (same host)"] = mapped
    return todo


def measure(todo: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Round-robin, the starting method rotated every round; results dropped outside the timed span."""
    times: dict[str, list[float]] = {name: [] for name in todo}
    names = list(todo)
    for round_ in range(repeats):
        order = names[round_ % len(names):] + names[: round_ % len(names)]
        for name in order:
            t0 = time.perf_counter()
            result = todo[name]()
            times[name].append(time.perf_counter() - t0)
            del result
            gc.collect()
    return times


def markdown(report: dict[str, Any]) -> str:
    m, size = report["machine"], report["checkpoint"]["bytes"]
    base = report["results"]["torch.load"]["median"]
    lines = [
        f"# Remote-worker load over loopback HTTP ({report['date']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, {m['ram_gib']} GiB, torch {m['torch']}, "
        f"commit {m['git_commit']}. Daemon and client share the cores (noisy: other processes ran too).  ",
        f"Checkpoint: {report['checkpoint']['tensors']} bf16 tensors, {size / 1e6:.0f} MB file, resident in the daemon; "
        "file in the page cache.",
        "",
        "| method | median s | min s | max s | GB/s (median) | vs torch.load |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in report["results"].items():
        lines.append(
            f"| {name} | {row['median']:.3f} | {row['min']:.3f} | {row['max']:.3f} | {size / row['median'] / 1e9:.2f} "
            f"| {base / row['median']:.2f}x |"
        )
    lines += ["", f"All results equal torch.load's: {report['all_equal']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "ckptd-bench")
    parser.add_argument("--size-gb", type=float, default=0.25)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    path, ntensors = ensure_checkpoint(args.dir, args.size_gb, args.tensors)
    size = path.stat().st_size
    print(f"checkpoint {path} ({size / 1e9:.3f} GB, {ntensors} tensors)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="ckr", dir="/tmp"))
    token = os.urandom(16).hex()
    token_file = work / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    daemon, unix, tcp = start_daemon(args.dir, work, token_file)
    try:
        with ckptd.Client(unix, token=token) as admin:
            admin.prefetch(str(path))
        todo = methods(path, unix, tcp, token, args.connections)
        reference = torch.load(path, map_location="cpu")
        equal = {name: check(reference, load()) for name, load in todo.items()}
        del reference
        gc.collect()
        print(f"equal to torch.load: {equal}", flush=True)
        times = measure(todo, args.repeats)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon_exit = daemon.wait(timeout=60)
        for leftover in (work / "token", work / "d.sock"):
            leftover.unlink(missing_ok=True)
        (work / "shm").rmdir()
        work.rmdir()
    date = dt.date.today().isoformat()
    report = {
        "benchmark": "remote_load",
        "date": date,
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/remote_load.py", *(argv or sys.argv[1:])]),
        "machine": machine_info(),
        "checkpoint": {"path": str(path), "bytes": size, "tensors": ntensors, "dtype": "bfloat16"},
        "results": {
            name: {"runs": runs, "median": statistics.median(runs), "min": min(runs), "max": max(runs)}
            for name, runs in times.items()
        },
        "all_equal": all(equal.values()),
        "daemon_exit": daemon_exit,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"remote-load-{date}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out}.json and {out}.md")
    return 0 if report["all_equal"] and daemon_exit == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
