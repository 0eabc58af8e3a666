"""Per-tensor cost: loads of checkpoints with many small tensors, ckptd against torch.load.

Checkpoints shaped like a mixture-of-experts state dict, ``E`` experts x 100 small bf16
tensors (8 x 64, 1 KiB each): 200, 2,000 and 20,000 tensors. Every timed load runs in a
fresh Python process (torch and ckptd imported first, not timed), from "path in hand" to
"the object returned", file in the page cache. Methods:

* ``torch.load``: ``torch.load(path, map_location='cpu')`` (weights_only, torch's default).
* ``ckptd.load``: the embedded engine, ``ckptd.load(path, map_location='cpu')``.
* ``ckptd.load, torch unpickler``: the same with the plain rebuild switched off, so the
  object is rebuilt by torch's unpickler after ckptd's scan (what ckptd did before).
* ``daemon warm attach`` (with ``--daemon``): ``ckptd.load(path, server=...)`` in a fresh
  worker process while a ``ckptd serve`` daemon already holds the checkpoint (one
  priming load first): manifest, mapping of the shared arena, rebuild.

Rounds interleave the methods (order rotated each round); the table gives medians.
Run: ``.venv/bin/python bench/many_tensors.py`` (``--rounds``, ``--sizes``, ``--out``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PER_EXPERT = 100
METHODS = ("torch.load", "ckptd.load", "ckptd.load, torch unpickler")
DAEMON = "daemon warm attach"


def build(path: Path, tensors: int) -> None:
    """A state dict of ``tensors`` small bf16 tensors, ``PER_EXPERT`` per expert."""
    import torch

    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(tensors):
        expert, j = divmod(i, PER_EXPERT)
        state[f"model.layers.{expert // 8}.mlp.experts.{expert}.w{j}"] = torch.randn(8, 64, generator=gen).bfloat16()
    torch.save(state, path)


def child(method: str, path: str) -> None:
    """One timed load in this (fresh) process; prints its seconds as JSON."""
    import functools

    import torch

    import ckptd
    import ckptd.engine._load

    if method == "ckptd.load, torch unpickler":
        ckptd.engine._load.rebuild_plain = lambda *args, **kwargs: None  # type: ignore[assignment]
    load: Any = torch.load if method == "torch.load" else ckptd.load
    if method == DAEMON:
        load = functools.partial(ckptd.load, server=os.environ["CKPTD_BENCH_URL"])
    start = time.perf_counter()
    obj = load(path, map_location="cpu")
    seconds = time.perf_counter() - start
    assert len(obj) > 0
    print(json.dumps({"seconds": seconds}))


def timed(method: str, path: Path) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, str(path)], check=True, capture_output=True, text=True
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["seconds"])


def run(sizes: list[int], rounds: int, folder: Path, methods: tuple[str, ...]) -> dict[int, dict[str, list[float]]]:
    results: dict[int, dict[str, list[float]]] = {}
    for size in sizes:
        path = folder / f"moe-{size}.pt"
        build(path, size)
        path.read_bytes()  # into the page cache
        if DAEMON in methods:
            timed(DAEMON, path)  # the daemon reads it once; every timed attach finds it cached
        times: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(rounds):
            order = methods[r % len(methods):] + methods[: r % len(methods)]
            for method in order:
                times[method].append(timed(method, path))
        results[size] = times
        print(size, {m: round(statistics.median(t), 3) for m, t in times.items()}, flush=True)
    return results


def markdown(results: dict[int, dict[str, list[float]]], rounds: int, note: str) -> str:
    flags = " --daemon" if any(DAEMON in times for times in results.values()) else ""
    lines = [
        f"# Many small tensors: fresh-process loads ({dt.date.today().isoformat()})",
        "",
        f"Command: `.venv/bin/python bench/many_tensors.py --rounds {rounds}{flags}`; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}. Medians of {rounds} rounds, seconds from path to object, "
        "file in the page cache, each load in a fresh process. " + note,
        "",
        "| tensors | torch.load | ckptd.load | speed-up | ckptd.load, torch unpickler | daemon warm attach |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for size, times in results.items():
        med = {m: statistics.median(t) for m, t in times.items()}
        attach = f"{med[DAEMON]:.3f} ({med['torch.load'] / med[DAEMON]:.1f}x)" if DAEMON in med else "-"
        lines.append(
            f"| {size:,} | {med['torch.load']:.3f} | {med['ckptd.load']:.3f} | "
            f"{med['torch.load'] / med['ckptd.load']:.2f}x | {med['ckptd.load, torch unpickler']:.3f} | {attach} |"
        )
    lines += ["", "All rounds (seconds):", "", "```", json.dumps(results, indent=1), "```", ""]
    return "\n".join(lines)


def svg(results: dict[int, dict[str, list[float]]]) -> str:
    """Grouped bars, one group per size, log-free: each group scaled to its torch.load time."""
    colors = {"torch.load": "#888888", "ckptd.load": "#2a7ab0", "ckptd.load, torch unpickler": "#9cc3de", DAEMON: "#e08a2c"}
    methods = [m for m in colors if all(m in times for times in results.values())]
    width, height, left, top, bar = 220 * len(methods) + 20, 300, 60, 40, 40
    group = bar * len(methods) + 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">']
    parts.append(f'<text x="{left}" y="20">Fresh-process load time, relative to torch.load (lower is faster)</text>')
    base = height - 50
    for g, (size, times) in enumerate(results.items()):
        ref = statistics.median(times["torch.load"])
        for i, method in enumerate(methods):
            value = statistics.median(times[method])
            h = (base - top) * min(value / ref, 1.5) / 1.5
            x = left + g * group + i * bar
            parts.append(f'<rect x="{x}" y="{base - h:.1f}" width="{bar - 4}" height="{h:.1f}" fill="{colors[method]}"/>')
            parts.append(f'<text x="{x}" y="{base - h - 4:.1f}" font-size="10">{value:.2f}s</text>')
        parts.append(f'<text x="{left + g * group}" y="{base + 16}">{size:,} tensors</text>')
    for i, method in enumerate(methods):
        x = left + i * 190
        parts.append(f'<rect x="{x}" y="{height - 22}" width="10" height="10" fill="{colors[method]}"/>')
        parts.append(f'<text x="{x + 14}" y="{height - 13}">{method}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000, 20000])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. machine load)")
    parser.add_argument("--daemon", action="store_true", help="also time warm attaches through a ckptd serve daemon")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="ckptd-bench-") as folder:
        if not args.daemon:
            results = run(args.sizes, args.rounds, Path(folder), METHODS)
        else:
            from daemon_load import start_daemon

            sock = str(Path(folder) / "d.sock")
            daemon = start_daemon(Path(folder), sock, "--host-budget", "4GiB")
            os.environ["CKPTD_BENCH_URL"] = f"unix://{sock}"
            try:
                results = run(args.sizes, args.rounds, Path(folder), (*METHODS, DAEMON))
            finally:
                daemon.terminate()
                daemon.wait(30)
    stem = args.out / f"many-tensors-{dt.date.today().isoformat()}"
    stem.with_suffix(".md").write_text(markdown(results, args.rounds, args.note))
    stem.with_suffix(".svg").write_text(svg(results))
    print(f"wrote {stem}.md and {stem}.svg")


if __name__ == "__main__":
    main()
