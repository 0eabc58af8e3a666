"""Daemon load benchmark: N client processes attaching to one shared copy of a checkpoint.

Acceptance criterion this script checks, side by side in one run: with a ``ckptd serve``
daemon holding a >= 1 GB, ~200-tensor bf16 checkpoint, a fresh client process's
``Client.load`` (a *warm attach*: manifest + copy-on-write mapping of the shared arena)
is at least 20x faster than ``torch.load(map_location='cpu')`` of the same file, and
four client processes together add about one copy of the checkpoint to shared memory
(``Shmem`` in /proc/meminfo), not four.

Measured:

* ``torch.load``: ``torch.load(path, map_location='cpu')`` in this process, median of 3
  (file in the page cache).
* ``daemon cold``: client process 1's ``Client.load``; the daemon reads the file into a
  new arena in ``/dev/shm`` (the file is in the page cache, the daemon's cache is empty).
* ``daemon warm attach``: client processes 2..4, each a fresh process; only the
  ``Client.load`` call is timed inside the process and reported back as JSON on stdout.
* ``daemon re-read after evict``: once the clients are gone, the checkpoint is evicted
  and prefetched again: the daemon's read path without the cost of the machine backing
  fresh memory, which the first cold load also pays (large on a VM).

Every client checks its result: process 1 compares every tensor with ``torch.load``'s
(torch.equal, dtype, shape, key order), processes 2..4 compare float64 sums of a few
tensors with the reference's. Clients hold their results until all have loaded, so the
Shmem reading sees four live attachments.

Run: ``.venv/bin/python bench/daemon_load.py`` (see bench/README.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_load import ensure_checkpoint, machine_info  # noqa: E402  (shared with the CPU bench)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
READY = "ckptd: serving on "
MIN_RATIO = 20.0

CLIENT = textwrap.dedent(
    """
    import json, sys, time
    import torch, ckptd
    url, path, mode, sums = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    client = ckptd.Client(url)
    t0 = time.perf_counter()
    state = client.load(path, map_location="cpu")
    load_s = time.perf_counter() - t0
    ok = all(float(state[k].double().sum()) == v for k, v in sums.items())
    checked = len(sums)
    if mode == "full":
        ref = torch.load(path, map_location="cpu")
        ok = ok and list(ref) == list(state) and all(
            state[k].dtype == ref[k].dtype and state[k].shape == ref[k].shape and torch.equal(state[k], ref[k]) for k in ref)
        checked = len(ref)
        del ref
    print(json.dumps({"load_s": load_s, "ok": ok, "checked": checked, "tensors": len(state)}), flush=True)
    sys.stdin.readline()  # keep the mapping (and lease) until every client has loaded
    client.close()
    """
)


def shmem_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no Shmem in /proc/meminfo")


def torch_load_times(path: Path, repeats: int) -> tuple[list[float], dict[str, float]]:
    times, sums = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = torch.load(path, map_location="cpu")
        times.append(time.perf_counter() - t0)
        keys = list(state)
        picks = [keys[0], keys[len(keys) // 3], keys[len(keys) // 2], keys[-1]]
        sums = {k: float(state[k].double().sum()) for k in picks}
        del state
        gc.collect()
    return times, sums


def start_daemon(root: Path, sock: str, *flags: str) -> subprocess.Popen:
    """``ckptd serve`` on ``sock`` with arenas in /dev/shm (and ``flags``), once it listens."""
    cmd = [sys.executable, "-m", "ckptd", "serve", "--socket", sock, "--root", str(root), "--shm-dir", "/dev/shm", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(READY):
        proc.kill()
        raise RuntimeError(f"daemon did not start: {line!r}")
    return proc


def run_client(script: Path, url: str, path: Path, mode: str, sums: dict[str, float]) -> tuple[subprocess.Popen, dict[str, Any]]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(script), url, str(path), mode, json.dumps(sums)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"client exited with {proc.wait()}")
    result = json.loads(line)
    result["process_s"] = time.perf_counter() - t0  # spawn + imports + load + checks
    return proc, result


def release_clients(clients: list[subprocess.Popen]) -> None:
    """Let every client process drop its result, close its client and exit."""
    for proc in clients:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.write("\n")
            proc.stdin.close()
        proc.wait(timeout=60)


def markdown(report: dict[str, Any]) -> str:
    m, r = report["machine"], report["results"]
    rows = [
        ("torch.load(map_location='cpu'), median of 3", r["torch_load_s"]["median"], ""),
        ("daemon cold: client 1 `Client.load` (daemon reads file)", r["clients"][0]["load_s"], "full check vs torch.load"),
    ]
    for i, c in enumerate(r["clients"][1:], start=2):
        rows.append((f"daemon warm attach: client {i} `Client.load` (fresh process)", c["load_s"], "sums of 4 tensors"))
    rows.append(("daemon re-read after evict (`Client.prefetch`, memory already backed)", r["reread_s"], ""))
    lines = [
        f"# Daemon load benchmark ({report['date']})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores_usable']} usable cores, {m['ram_gib']} GiB RAM, kernel {m['kernel']}, "
        f"Python {m['python']}, torch {m['torch']}, commit {m['git_commit']}",
        "",
        f"Checkpoint: `{report['checkpoint']['path']}`, {report['checkpoint']['bytes'] / 1e9:.3f} GB, "
        f"{report['checkpoint']['tensors']} bf16 tensors (in the page cache). Daemon: shm-dir /dev/shm, host budget 4GiB.",
        "",
        "| method | seconds | GB/s | check |",
        "|---|---:|---:|---|",
    ]
    size = report["checkpoint"]["bytes"]
    for name, secs, check in rows:
        lines.append(f"| {name} | {secs:.4f} | {size / secs / 1e9:.2f} | {check} |")
    v = report["verdict"]
    walls = ", ".join(f"{c['process_s']:.2f}" for c in r["clients"])
    lines += [
        "",
        f"- torch.load runs: {', '.join(f'{t:.3f}' for t in r['torch_load_s']['runs'])} s",
        f"- warm attach median {r['warm_attach_s']['median'] * 1000:.1f} ms (min {r['warm_attach_s']['min'] * 1000:.1f}, "
        f"max {r['warm_attach_s']['max'] * 1000:.1f})",
        f"- client process wall (spawn + import + load + check): {walls} s",
        f"- ratio torch.load / warm attach (median): **{v['ratio_median']:.1f}x**; vs slowest attach: {v['ratio_worst']:.1f}x "
        f"(criterion: each >= {MIN_RATIO:g}x: {'PASS' if v['ratio_pass'] else 'FAIL'})",
        f"- ratio torch.load / daemon cold: {v['ratio_cold']:.2f}x",
        f"- Shmem before {r['shmem']['before'] / 2**30:.3f} GiB, with 4 clients attached {r['shmem']['attached'] / 2**30:.3f} GiB: "
        f"grew {r['shmem']['growth'] / 2**30:.3f} GiB = {v['shmem_copies']:.2f} copies of the checkpoint "
        f"({'PASS' if v['shmem_pass'] else 'FAIL'}: about one copy, not 4); after daemon exit {r['shmem']['after_exit'] / 2**30:.3f} GiB",
        f"- every client's result matched torch.load's: {'yes' if v['all_ok'] else 'NO'}; daemon exit code on SIGTERM: {r['daemon_exit']}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "ckptd-bench")
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--tensors", type=int, default=201)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args(argv)

    path, ntensors = ensure_checkpoint(args.dir, args.size_gb, args.tensors)
    size = path.stat().st_size
    print(f"checkpoint {path} ({size / 1e9:.3f} GB, {ntensors} tensors)", flush=True)

    torch_times, sums = torch_load_times(path, 3)
    print(f"torch.load: {[round(t, 3) for t in torch_times]}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="ckb", dir="/tmp"))
    sock = str(work / "d.sock")
    script = work / "client.py"
    script.write_text(CLIENT)
    shm_before = shmem_bytes()
    daemon = start_daemon(args.dir, sock, "--host-budget", "4GiB")
    url = f"unix://{sock}"
    clients: list[subprocess.Popen] = []
    results: list[dict[str, Any]] = []
    try:
        for i in range(args.clients):
            proc, result = run_client(script, url, path, "full" if i == 0 else "quick", sums)
            clients.append(proc)
            results.append(result)
            print(f"client {i + 1}: {result}", flush=True)
        shm_attached = shmem_bytes()
        import ckptd

        with ckptd.Client(url) as admin:
            entries = admin.checkpoints()
            stats = admin.stats()
        release_clients(clients)
        # The first read of a fresh daemon also pays for the machine backing new memory
        # (slow on a VM); reading again after an eviction shows the read path alone.
        with ckptd.Client(url) as admin:
            admin.evict(str(path))
            t0 = time.perf_counter()
            admin.prefetch(str(path))
            reread_s = time.perf_counter() - t0
        print(f"daemon re-read after evict: {reread_s:.3f} s", flush=True)
    finally:
        release_clients(clients)
        daemon.send_signal(signal.SIGTERM)
        daemon_exit = daemon.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    shm_after = shmem_bytes()

    warm = [r["load_s"] for r in results[1:]]
    torch_median = statistics.median(torch_times)
    growth = shm_attached - shm_before
    verdict = {
        "ratio_median": torch_median / statistics.median(warm),
        "ratio_worst": torch_median / max(warm),
        "ratio_cold": torch_median / results[0]["load_s"],
        "shmem_copies": growth / size,
        "all_ok": all(r["ok"] for r in results),
    }
    verdict["ratio_pass"] = verdict["ratio_worst"] >= MIN_RATIO  # each warm attach, not just the median
    verdict["shmem_pass"] = 0.9 <= verdict["shmem_copies"] <= 1.5
    date = dt.date.today().isoformat()
    report = {
        "benchmark": "daemon_load",
        "date": date,
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/daemon_load.py", *(argv or sys.argv[1:])]),
        "machine": machine_info(),
        "checkpoint": {"path": str(path), "bytes": size, "tensors": ntensors, "dtype": "bfloat16"},
        "results": {
            "torch_load_s": {"runs": torch_times, "median": torch_median},
            "clients": results,
            "warm_attach_s": {"runs": warm, "median": statistics.median(warm), "min": min(warm), "max": max(warm)},
            "shmem": {"before": shm_before, "attached": shm_attached, "growth": growth, "after_exit": shm_after},
            "daemon_checkpoints": entries,
            "daemon_stats": stats,
            "daemon_exit": daemon_exit,
            "reread_s": reread_s,
        },
        "verdict": verdict,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"daemon-load-{date}"
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out}.json and {out}.md")
    return 0 if verdict["ratio_pass"] and verdict["shmem_pass"] and verdict["all_ok"] and daemon_exit == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
