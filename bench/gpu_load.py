"""GPU load benchmark: one LLM-like checkpoint onto ``cuda:0``, every way, side by side.

The GPU-path issue's criteria, measured in one run on one checkpoint (>= 8 GB of bf16,
~300 tensors, in the page cache unless a row says cold):

* the limit: pinned host -> device bandwidth (one 1 GiB pinned buffer, best of 5);
* ``torch.load(map_location='cuda:0')``; ``torch.load(mmap=True)`` then ``.to('cuda:0')``;
  ``safetensors.torch.load_file(device='cuda:0')`` (a safetensors copy of the same tensors);
* ``ckptd.load(map_location='cuda:0')`` embedded, warm and (where the page cache can be
  dropped) cold;
* through a ``ckptd serve --devices cuda`` daemon: a worker process's cold load (the daemon
  reads the file), a second worker attaching warm, 4 workers attached at once (GPU memory
  from the driver before and while attached), a file saved "from cuda:1" (re-tagged: this
  machine may have one GPU) loaded with ``{'cuda:1': 'cuda:0'}``, and re-promotion of the
  first checkpoint from the host tier after that second one pushed it out of the GPU budget.

Criteria (GPU-path issue): cold load >= 0.8x pinned bandwidth, >= 4x torch.load and >= 2x
safetensors; warm attach <= 50 ms; 4 workers ~1x the checkpoint in GPU memory.

``--simulated`` runs the daemon rows on simulated GPUs on a CPU-only machine (small
checkpoint, no CUDA rows): a smoke test of this script, not a measurement.

Run (GPU machine): ``python bench/gpu_load.py``; results land in bench/results/ as
``gpu-load-<date>.{json,md,svg}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_load import ensure_checkpoint, evict, machine_info  # noqa: E402
from daemon_load import start_daemon  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

WORKER = textwrap.dedent(
    """
    import json, sys, time, torch, ckptd
    url, path, map_location, hold = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4] == "hold"
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.init(); torch.zeros(1, device="cuda:0")  # the CUDA context is not the load's cost
    client = ckptd.Client(url)
    t0 = time.perf_counter()
    state = client.load(path, map_location=map_location)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    first = next(iter(state.values()))
    print(json.dumps({"seconds": seconds, "device": str(first.device), "tensors": len(state),
                      "checksum": float(first.float().sum())}), flush=True)
    if hold:
        sys.stdin.readline()
    client.close()
    """
)


# ---------------------------------------------------------------------------------------
# Measurements in this process
# ---------------------------------------------------------------------------------------


def synced(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds for ``fn()`` including every GPU copy it queued."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def drop(result: Any) -> None:
    del result
    gc.collect()
    torch.cuda.empty_cache()


def pinned_bandwidth() -> float:
    """Bytes per second of a pinned host -> cuda:0 copy of 1 GiB (best of 5)."""
    n = 1 << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(n, dtype=torch.uint8, device="cuda:0")
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        device.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    del host, device
    torch.cuda.empty_cache()
    return n / best


def in_process_rows(path: Path, st_path: Path, size: int) -> list[dict[str, Any]]:
    import safetensors.torch

    import ckptd

    rows = []

    def row(name: str, fn: Callable[[], Any], note: str = "") -> None:
        seconds, result = synced(fn)
        rows.append({"method": name, "seconds": seconds, "gb_per_s": size / seconds / 1e9, "note": note})
        print(f"{name}: {seconds:.3f} s", flush=True)
        drop(result)

    row("torch.load(map_location='cuda:0')", lambda: torch.load(path, map_location="cuda:0"))
    row("torch.load(mmap=True) then .to('cuda:0')",
        lambda: {k: v.to("cuda:0") for k, v in torch.load(path, mmap=True, map_location="cpu").items()})
    row("safetensors.torch.load_file(device='cuda:0')", lambda: safetensors.torch.load_file(st_path, device="cuda:0"))
    row("ckptd.load(map_location='cuda:0') embedded", lambda: ckptd.load(path, map_location="cuda:0"))
    evict(str(path))
    row("ckptd.load(map_location='cuda:0') embedded, cold", lambda: ckptd.load(path, map_location="cuda:0"),
        "page cache dropped for this file (posix_fadvise DONTNEED)")
    evict(str(path))
    row("torch.load(map_location='cuda:0'), cold", lambda: torch.load(path, map_location="cuda:0"),
        "page cache dropped for this file (posix_fadvise DONTNEED)")
    return rows


# ---------------------------------------------------------------------------------------
# The daemon and its workers
# ---------------------------------------------------------------------------------------


def worker(script: Path, url: str, path: Path, map_location: Any, *, hold: bool = False,
           env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict[str, Any]]:
    proc = subprocess.Popen(
        [sys.executable, str(script), url, str(path), json.dumps(map_location), "hold" if hold else "go"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"worker exited with {proc.wait()}")
    if not hold:
        proc.communicate("")
    return proc, json.loads(line)


def gpu_used(simulated: bool) -> int:
    """Bytes of cuda:0 in use, from the driver (all processes)."""
    if simulated:
        return sum(p.stat().st_size for p in Path("/dev/shm").glob("ckptd-gpu*"))
    free, total = torch.cuda.mem_get_info(0)
    return total - free


def retagged_copy(path: Path, target: Path) -> Path:
    """The checkpoint as if saved from cuda:1 (a one-GPU machine cannot save one)."""
    if target.exists():
        return target
    state = torch.load(path, map_location="cpu", mmap=True)
    real = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:1"  # type: ignore[assignment]
    try:
        torch.save(state, target)
    finally:
        torch.serialization.location_tag = real  # type: ignore[assignment]
    return target


def daemon_rows(path: Path, size: int, simulated: bool, workdir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import ckptd

    sock = str(workdir / "d.sock")
    script = workdir / "worker.py"
    script.write_text(WORKER)
    devices = ["--devices", "simulated", "--simulated-gpus", "1"] if simulated else ["--devices", "cuda"]
    env = {**os.environ, **({"CKPTD_SIMULATED_GPUS": "1"} if simulated else {})}
    remapped = retagged_copy(path, path.with_name(path.stem + "-cuda1.pt"))
    before = gpu_used(simulated)
    daemon = start_daemon(path.parent, sock, *devices, "--gpu-budget", f"cuda:0={int(size * 1.2)}")
    url = f"unix://{sock}"
    rows: list[dict[str, Any]] = []
    memory: dict[str, Any] = {"before": before}

    def row(name: str, result: dict[str, Any], note: str = "") -> None:
        rows.append({"method": name, "seconds": result["seconds"], "gb_per_s": size / result["seconds"] / 1e9,
                     "note": note or f"tensors on {result['device']}"})
        print(f"{name}: {result['seconds']:.4f} s on {result['device']}", flush=True)

    held: list[subprocess.Popen] = []
    try:
        _, cold = worker(script, url, path, "cuda:0", env=env)
        row("daemon cold: worker 1 Client.load (daemon reads the file)", cold)
        for i in range(4):
            proc, result = worker(script, url, path, "cuda:0", hold=True, env=env)
            held.append(proc)
            row(f"daemon warm attach: worker {i + 2} (fresh process)", result)
        memory["with_4_workers"] = gpu_used(simulated)
        with ckptd.Client(url) as admin:
            memory["daemon_resident"] = admin.stats()["resident_bytes"]
        release(held)
        _, moved = worker(script, url, remapped, {"cuda:1": "cuda:0"}, env=env)
        row("saved on cuda:1, map_location={'cuda:1': 'cuda:0'} (cold; pushes the first out of the GPU budget)", moved)
        _, promoted = worker(script, url, path, "cuda:0", env=env)
        row("re-promotion from the host tier (first checkpoint again)", promoted)
        with ckptd.Client(url) as admin:
            memory["stats"] = admin.stats()
    finally:
        release(held)
        daemon.send_signal(signal.SIGTERM)
        memory["daemon_exit"] = daemon.wait(timeout=120)
    return rows, memory


def release(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.communicate("\n", timeout=120)
    procs.clear()


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# GPU load benchmark ({report['date']})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Device: {report['device']}; {report['machine']['cpu']}, {report['machine']['cores_usable']} cores; "
        f"torch {report['machine']['torch']}, cupy {report['cupy']}, commit {report['machine']['git_commit']}",
        "",
        f"Checkpoint: `{report['checkpoint']['path']}`, {report['checkpoint']['bytes'] / 1e9:.2f} GB, "
        f"{report['checkpoint']['tensors']} bf16 tensors. Pinned host-to-device bandwidth: "
        f"{report['pinned_gb_per_s']:.1f} GB/s" if report["pinned_gb_per_s"] else "Pinned bandwidth: n/a (no CUDA)",
        "",
        "| method | seconds | GB/s | note |",
        "|---|---:|---:|---|",
    ]
    for row in report["rows"]:
        lines.append(f"| {row['method']} | {row['seconds']:.4f} | {row['gb_per_s']:.2f} | {row['note']} |")
    mem = report["gpu_memory"]
    grown = mem.get("with_4_workers", 0) - mem.get("before", 0)
    lines += [
        "",
        f"- GPU memory in use (driver): before {mem.get('before', 0) / 2**30:.2f} GiB, with 4 workers attached "
        f"{mem.get('with_4_workers', 0) / 2**30:.2f} GiB: grew {grown / report['checkpoint']['bytes']:.2f}x the checkpoint "
        "(includes each process's CUDA context)",
        f"- daemon resident bytes: {mem.get('daemon_resident')}",
        f"- verdict: {json.dumps(report['verdict'])}",
        "",
    ]
    return "\n".join(lines)


def svg(rows: list[dict[str, Any]], limit: float | None) -> str:
    """A horizontal bar chart of GB/s per method, the pinned bandwidth drawn as a line."""
    width, bar, left = 900, 22, 430
    top = max([r["gb_per_s"] for r in rows] + [limit or 0]) or 1
    scale = (width - left - 60) / top
    height = 40 + bar * 1.4 * len(rows)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0f}" font-family="sans-serif" font-size="11">']
    for i, r in enumerate(rows):
        y = 20 + i * bar * 1.4
        label = r["method"].replace("&", "&amp;").replace("<", "&lt;")[:70]
        parts.append(f'<text x="{left - 6}" y="{y + bar * 0.7:.0f}" text-anchor="end">{label}</text>')
        parts.append(f'<rect x="{left}" y="{y:.0f}" width="{r["gb_per_s"] * scale:.1f}" height="{bar}" fill="#4a7ab7"/>')
        parts.append(f'<text x="{left + r["gb_per_s"] * scale + 4:.1f}" y="{y + bar * 0.7:.0f}">{r["gb_per_s"]:.1f} GB/s</text>')
    if limit:
        x = left + limit * scale
        parts.append(f'<line x1="{x:.1f}" y1="10" x2="{x:.1f}" y2="{height - 10:.0f}" stroke="#c33" stroke-dasharray="4"/>')
        parts.append(f'<text x="{x + 3:.1f}" y="12" fill="#c33">pinned H2D {limit:.1f} GB/s</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def verdict(rows: list[dict[str, Any]], pinned: float | None, memory: dict[str, Any], size: int) -> dict[str, Any]:
    by = {r["method"]: r for r in rows}
    cold = by.get("ckptd.load(map_location='cuda:0') embedded")
    torch_row = by.get("torch.load(map_location='cuda:0')")
    st_row = by.get("safetensors.torch.load_file(device='cuda:0')")
    warm = [r["seconds"] for r in rows if r["method"].startswith("daemon warm attach")]
    out: dict[str, Any] = {"warm_attach_max_ms": max(warm) * 1000 if warm else None}
    out["warm_attach_pass"] = bool(warm) and max(warm) <= 0.050
    if cold and pinned:
        out["cold_vs_pinned"] = cold["gb_per_s"] * 1e9 / pinned
        out["cold_vs_torch_load"] = torch_row["seconds"] / cold["seconds"] if torch_row else None
        out["cold_vs_safetensors"] = st_row["seconds"] / cold["seconds"] if st_row else None
    if "with_4_workers" in memory:
        out["gpu_memory_growth_x_checkpoint"] = (memory["with_4_workers"] - memory["before"]) / size
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "ckptd-gpu-bench")
    parser.add_argument("--size-gb", type=float, default=8.0)
    parser.add_argument("--tensors", type=int, default=301)
    parser.add_argument("--simulated", action="store_true", help="daemon rows on simulated GPUs (CPU smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.simulated
    if not cuda and not args.simulated:
        parser.error("no CUDA device: run on a GPU machine, or pass --simulated for a smoke test")

    path, ntensors = ensure_checkpoint(args.dir, args.size_gb, args.tensors)
    size = path.stat().st_size
    print(f"checkpoint {path} ({size / 1e9:.2f} GB, {ntensors} tensors)", flush=True)
    rows: list[dict[str, Any]] = []
    pinned = None
    if cuda:
        import safetensors.torch

        st_path = path.with_suffix(".safetensors")
        if not st_path.exists():
            safetensors.torch.save_file(torch.load(path, map_location="cpu", mmap=True), st_path)
        pinned = pinned_bandwidth()
        print(f"pinned H2D: {pinned / 1e9:.1f} GB/s", flush=True)
        rows += in_process_rows(path, st_path, size)
    workdir = Path(tempfile.mkdtemp(prefix="ckg", dir="/tmp"))
    try:
        daemon, memory = daemon_rows(path, size, args.simulated, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows += daemon

    try:
        import cupy

        cupy_version = cupy.__version__
    except ImportError:
        cupy_version = "not installed"
    date = dt.date.today().isoformat()
    report = {
        "benchmark": "gpu_load",
        "date": date,
        "command": " ".join(shlex.quote(a) for a in ["python", "bench/gpu_load.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(0) if cuda else "simulated GPUs (no CUDA): smoke test, not a measurement",
        "driver": _driver() if cuda else None,
        "cupy": cupy_version,
        "machine": machine_info(),
        "checkpoint": {"path": str(path), "bytes": size, "tensors": ntensors, "dtype": "bfloat16"},
        "pinned_gb_per_s": pinned / 1e9 if pinned else None,
        "rows": rows,
        "gpu_memory": memory,
        "verdict": verdict(rows, pinned, memory, size),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (f"gpu-load-{date}" + ("-simulated" if args.simulated else ""))
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    stem.with_suffix(".svg").write_text(svg(rows, pinned / 1e9 if pinned else None))
    print(markdown(report))
    print(f"wrote {stem}.json, .md and .svg")
    return 0


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
