"""CPU load benchmark: ckptd.load against torch.load and a plain read into shared memory.

Acceptance criterion this script checks, side by side in one run: a cold load (nothing
cached inside ckptd, every call a fresh load) of a >= 1 GB, ~200-tensor bf16 checkpoint
into CPU memory is at least as fast as ``torch.load(map_location='cpu')`` and within
1.25x of a plain read of the same file into shared memory.

Methods, all timed from "path in hand" to "every byte in process memory":

* ``plain read``: memfd_create + ftruncate + mmap(MAP_SHARED) + os.preadv of the whole
  file in 16 MiB chunks, with N threads: the floor for "file bytes into shared memory".
* ``plain sendfile``: the same memfd filled by ``os.sendfile`` (a copy inside the kernel)
  with N threads, then mapped: the other floor. The criterion uses the faster of the two.
* ``torch.load``: ``torch.load(path, map_location='cpu')``.
* ``torch.load mmap``: ``torch.load(path, mmap=True)`` then ``clone()`` of every tensor,
  so the lazy mapping is paid and the result is private memory like torch.load's.
* ``ckptd.load``: ``ckptd.load(path, map_location='cpu')`` at its default reader threads;
  with ``--threads``, also at other thread counts (the only patch: the reader's default).

Every method runs once per round, rounds interleave (order rotated each round) so drift
hits all methods alike. The warm table has the file in the page cache; the cold table
evicts it (``posix_fadvise(DONTNEED)``) before every timed call, after checking that the
eviction really empties the page cache (mincore) and really slows a read.

Run: ``.venv/bin/python bench/cpu_load.py`` (see bench/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime as dt
import gc
import json
import math
import mmap
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import ckptd
from ckptd.gpu import _reader

REPO = Path(__file__).resolve().parent.parent
PLAIN_CHUNK = 16 << 20
ZIP_SLACK = 4 << 20  # torch.save's zip headers and alignment padding for ~200 records stay far below this
GB = 1e9
TORCH_RATIO_MAX = 1.0
PLAIN_RATIO_MAX = 1.25


@dataclass(frozen=True)
class Sample:
    """One timed call: wall seconds and the process's CPU seconds (all threads, user + system)."""

    wall: float
    cpu: float


Timer = Callable[[str], Sample]


class Stopwatch:
    """Wall clock and process CPU time over the same span; CPU time is what contention cannot inflate."""

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = _cpu_seconds()

    def stop(self) -> Sample:
        return Sample(time.perf_counter() - self._wall, _cpu_seconds() - self._cpu)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Method:
    """One timed way of loading the file; ``run`` times one call."""

    name: str
    threads: int | None
    run: Timer
    headline: str = ""  # "plain", "torch", "ckptd": the rows the criterion compares


@dataclass
class Row:
    """Timings of one method in one cache state."""

    name: str
    threads: int | None
    headline: str
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


# ---------------------------------------------------------------------------- checkpoint


def llm_shapes(size_bytes: int, tensors: int) -> dict[str, tuple[int, ...]]:
    """Llama-like names and shapes: 9 tensors per layer plus embed, norm, lm_head; >= size_bytes of bf16.

    Per layer: q/k/v/o (h x h), gate/up (4h x h), down (h x 4h), two norms (h); vocab 16h.
    That is (16 L + 32) h^2 parameters (+ norms); h is the smallest multiple of 32 that fits.
    """
    layers = max(1, round((tensors - 3) / 9))
    h = 32 * math.ceil(math.sqrt(size_bytes / 2 / (16 * layers + 32)) / 32)
    inter, vocab = 4 * h, 16 * h
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{proj}.weight"] = (h, h)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, h)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, h)
        shapes[f"{p}.mlp.down_proj.weight"] = (h, inter)
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab, h)
    return shapes


def tensor_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(2 * math.prod(shape) for shape in shapes.values())


def ensure_checkpoint(directory: Path, size_gb: float, tensors: int) -> tuple[Path, int]:
    """The benchmark checkpoint, generated once with torch.save and reused while its size fits."""
    shapes = llm_shapes(int(size_gb * (1 << 30)), tensors)
    payload = tensor_bytes(shapes)
    path = directory / f"llm-bf16-{size_gb:g}GiB-{len(shapes)}t.pt"
    if path.exists() and payload <= path.stat().st_size <= payload + ZIP_SLACK:
        return path, len(shapes)
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=gen).to(torch.bfloat16) for name, shape in shapes.items()}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path, len(shapes)


# ---------------------------------------------------------------------------- page cache


def evict(path: str) -> None:
    """Drop the file's pages from the page cache (they are clean, so DONTNEED frees them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: str) -> float:
    """Fraction of the file's pages in the page cache, by mincore(2) on a mapping that touches nothing."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return 1 - bytes(vec).count(0) / pages  # mincore sets bit 0 of a page's byte when it is resident
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


@dataclass
class ColdCheck:
    """Whether page-cache eviction works here, and the evidence."""

    works: bool
    resident_after_evict: float
    warm_read_s: float
    cold_read_s: float
    reason: str


def check_cold(path: str) -> ColdCheck:
    """Evict, check mincore says the file left the cache, and that a single-thread read slows down."""
    try:
        plain_read(path, 1)
        warm = plain_read(path, 1).wall
        evict(path)
        resident = resident_fraction(path)
        cold = plain_read(path, 1).wall
    except OSError as exc:
        return ColdCheck(False, math.nan, math.nan, math.nan, f"eviction failed: {exc}")
    works = resident < 0.01 and cold > 1.5 * warm
    reason = (
        f"posix_fadvise(DONTNEED) leaves {resident:.1%} of pages resident; "
        f"single-thread read {warm:.3f}s warm vs {cold:.3f}s after eviction"
    )
    return ColdCheck(works, resident, warm, cold, reason)


# ---------------------------------------------------------------------------- methods


def plain_read(path: str, threads: int) -> Sample:
    """memfd + ftruncate + mmap(MAP_SHARED) + preadv of the whole file in 16 MiB chunks."""
    watch = Stopwatch()
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    mem = os.memfd_create("bench-plain", os.MFD_CLOEXEC)
    os.ftruncate(mem, size)
    mapping = mmap.mmap(mem, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    view = memoryview(mapping)
    offsets = range(0, size, PLAIN_CHUNK)

    def read(offset: int) -> None:
        end = min(offset + PLAIN_CHUNK, size)
        while offset < end:
            offset += os.preadv(fd, [view[offset:end]], offset)

    if threads <= 1:
        for offset in offsets:
            read(offset)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(read, offsets))
    elapsed = watch.stop()
    view.release()
    mapping.close()
    os.close(mem)
    os.close(fd)
    return elapsed


def plain_reader(threads: int) -> Timer:
    return lambda path: plain_read(path, threads)


def plain_sendfile(path: str, threads: int) -> Sample:
    """memfd + ftruncate + os.sendfile of the whole file in 16 MiB chunks (a kernel copy), then mmap.

    The other floor for "file bytes into shared memory": the kernel writes the memfd's pages
    itself, without faulting a user mapping page by page. Each thread seeks its own open file
    description of the memfd (sendfile writes at the output's position).
    """
    watch = Stopwatch()
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    mem = os.memfd_create("bench-sendfile", os.MFD_CLOEXEC)
    os.ftruncate(mem, size)
    offsets = list(range(0, size, PLAIN_CHUNK))

    def copy(share: list[int]) -> None:
        out = os.open(f"/proc/self/fd/{mem}", os.O_RDWR)
        for offset in share:
            end = min(offset + PLAIN_CHUNK, size)
            os.lseek(out, offset, os.SEEK_SET)
            while offset < end:
                offset += os.sendfile(out, fd, offset, end - offset)
        os.close(out)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(copy, [offsets[i :: max(1, threads)] for i in range(max(1, threads))]))
    mapping = mmap.mmap(mem, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    elapsed = watch.stop()
    mapping.close()
    os.close(mem)
    os.close(fd)
    return elapsed


def timed(load: Callable[[], Any]) -> Sample:
    """Time ``load()``; its result is dropped and collected outside the timed span."""
    watch = Stopwatch()
    result = load()
    elapsed = watch.stop()
    del result
    gc.collect()
    return elapsed


def torch_load(path: str) -> Sample:
    return timed(lambda: torch.load(path, map_location="cpu"))


def torch_load_mmap(path: str) -> Sample:
    def load() -> dict[str, torch.Tensor]:
        lazy = torch.load(path, mmap=True, map_location="cpu")
        return {name: t.clone() for name, t in lazy.items()}

    return timed(load)


@contextlib.contextmanager
def reader_threads(threads: int | None) -> Iterator[None]:
    """Set ckptd's reader thread count for a sweep; ``None`` leaves the shipped default alone.

    ``fill``'s ``threads=`` default was bound from ``DEFAULT_THREADS`` at import, so the
    constant alone changes nothing: both it and ``fill.__kwdefaults__`` are patched, then restored.
    """
    if threads is None:
        yield
        return
    kwdefaults = _reader.fill.__kwdefaults__
    assert kwdefaults is not None
    saved = (_reader.DEFAULT_THREADS, kwdefaults["threads"])
    _reader.DEFAULT_THREADS = kwdefaults["threads"] = threads
    try:
        yield
    finally:
        _reader.DEFAULT_THREADS, kwdefaults["threads"] = saved


def ckptd_load(threads: int | None) -> Timer:
    def run(path: str) -> Sample:
        with reader_threads(threads):
            return timed(lambda: ckptd.load(path, map_location="cpu"))

    return run


def methods(sweep: list[int]) -> list[Method]:
    """Plain reads at 1, the default and every swept thread count; torch.load twice; ckptd at each."""
    default = _reader.DEFAULT_THREADS
    plain = sorted({1, default, *sweep})
    rows = [Method("plain read (memfd)", n, plain_reader(n), "plain") for n in plain]
    rows += [Method("plain sendfile (memfd)", n, lambda p, n=n: plain_sendfile(p, n), "plain") for n in plain]
    rows.append(Method("torch.load(map_location='cpu')", None, torch_load, "torch"))
    rows.append(Method("torch.load(mmap=True) + clone", None, torch_load_mmap))
    rows.append(Method("ckptd.load(map_location='cpu')", default, ckptd_load(None), "ckptd"))
    rows += [Method("ckptd.load(map_location='cpu')", n, ckptd_load(n)) for n in sorted(set(sweep) - {default})]
    return rows


# ---------------------------------------------------------------------------- measuring


def verify(path: str) -> int:
    """ckptd.load must give torch.load's result, tensor for tensor; returns the tensor count."""
    expected = torch.load(path, map_location="cpu")
    got = ckptd.load(path, map_location="cpu")
    if list(got) != list(expected):
        raise AssertionError("ckptd.load returned different keys (or key order) than torch.load")
    for name, want in expected.items():
        have = got[name]
        same = (have.dtype, have.shape, have.stride(), have.device) == (want.dtype, want.shape, want.stride(), want.device)
        if not same or not torch.equal(have, want):
            raise AssertionError(f"ckptd.load differs from torch.load at {name!r}")
    return len(expected)


def measure(path: str, todo: list[Method], repeats: int, cold: bool, rewarmed: list[float]) -> list[Row]:
    """Round-robin: each round runs every method once, starting one later than the last round.

    Cold: the file is evicted before each call. Warm: the file is made fully resident before
    each call (proactive reclaim can page idle file pages out between calls); the fraction
    that was missing each time is appended to ``rewarmed``.
    """
    rows = [Row(m.name, m.threads, m.headline) for m in todo]
    for rnd in range(repeats):
        for k in [(rnd + j) % len(todo) for j in range(len(todo))]:
            if cold:
                evict(path)
            else:
                rewarmed.append(make_resident(path))
            sample = todo[k].run(path)
            rows[k].times.append(sample.wall)
            rows[k].cpu.append(sample.cpu)
    return rows


def make_resident(path: str) -> float:
    """Read the file until mincore says every page is cached; returns the fraction that was missing."""
    missing = 1 - resident_fraction(path)
    left, tries = missing, 0
    while left > 0 and tries < 3:
        with open(path, "rb", buffering=0) as f:
            while f.read(PLAIN_CHUNK):
                pass
        left, tries = 1 - resident_fraction(path), tries + 1
    return missing


def pick(rows: list[Row], headline: str) -> Row:
    """The criterion's row: the fastest plain read (the strict floor), else the one tagged row."""
    tagged = [r for r in rows if r.headline == headline]
    return min(tagged, key=lambda r: r.median)


def verdict(rows: list[Row]) -> dict[str, Any]:
    ck, tl, pl = pick(rows, "ckptd"), pick(rows, "torch"), pick(rows, "plain")
    vs_torch, vs_plain = ck.median / tl.median, ck.median / pl.median
    return {
        "ckptd_vs_torch_load": vs_torch,
        "ckptd_vs_plain_read": vs_plain,
        "paired_ckptd_vs_torch_load": statistics.median(a / b for a, b in zip(ck.times, tl.times)),
        "paired_ckptd_vs_plain_read": statistics.median(a / b for a, b in zip(ck.times, pl.times)),
        "cpu_ckptd_vs_torch_load": ck.cpu_median / tl.cpu_median,
        "cpu_ckptd_vs_plain_read": ck.cpu_median / pl.cpu_median,
        "plain_read_floor_threads": pl.threads,
        "holds_vs_torch_load": vs_torch <= TORCH_RATIO_MAX,
        "holds_vs_plain_read": vs_plain <= PLAIN_RATIO_MAX,
        "holds": vs_torch <= TORCH_RATIO_MAX and vs_plain <= PLAIN_RATIO_MAX,
    }


# ---------------------------------------------------------------------------- reporting


def machine_info() -> dict[str, Any]:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
        platform.processor(),
    )
    mem_kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem_kb / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ckptd_default_threads": _reader.DEFAULT_THREADS,
        "ckptd_default_chunk_bytes": _reader.DEFAULT_CHUNK_BYTES,
        "git_commit": git_commit(),
    }


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def table(warm: list[Row], cold: list[Row] | None, size: int) -> str:
    """One row per method: warm median, min, GB/s and multiple of the plain-read floor; cold likewise."""
    head = "| method | threads | median s | min s | GB/s | x plain floor | CPU s |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    if cold is not None:
        head += " cold median s | cold min s | cold GB/s | cold x plain floor | cold CPU s |"
        rule += "---:|---:|---:|---:|---:|"
    lines = [head, rule]
    floor, cold_floor = pick(warm, "plain"), pick(cold, "plain") if cold is not None else None
    for k, r in enumerate(warm):
        mark = "**" if r.headline in ("ckptd", "torch") or r is floor else ""
        line = f"| {mark}{r.name}{mark} | {r.threads if r.threads is not None else '-'} | " + cells(r, floor, size)
        if cold is not None and cold_floor is not None:
            line += " " + cells(cold[k], cold_floor, size)
        lines.append(line)
    return "\n".join(lines)


def cells(r: Row, floor: Row, size: int) -> str:
    return f"{r.median:.3f} | {r.best:.3f} | {size / GB / r.median:.2f} | {r.median / floor.median:.2f} | {r.cpu_median:.2f} |"


def verdict_lines(v: dict[str, Any]) -> list[str]:
    return [
        (
            f"- ckptd.load / torch.load (median): **{v['ckptd_vs_torch_load']:.2f}x** "
            f"(needs <= {TORCH_RATIO_MAX:g}): {'PASS' if v['holds_vs_torch_load'] else 'FAIL'}; "
            f"median of per-round ratios {v['paired_ckptd_vs_torch_load']:.2f}x, CPU time {v['cpu_ckptd_vs_torch_load']:.2f}x"
        ),
        (
            f"- ckptd.load / plain read, {v['plain_read_floor_threads']} thread(s) (median): "
            f"**{v['ckptd_vs_plain_read']:.2f}x** (needs <= {PLAIN_RATIO_MAX:g}): {'PASS' if v['holds_vs_plain_read'] else 'FAIL'}; "
            f"median of per-round ratios {v['paired_ckptd_vs_plain_read']:.2f}x, CPU time {v['cpu_ckptd_vs_plain_read']:.2f}x"
        ),
    ]


def markdown(report: dict[str, Any], warm: list[Row], cold: list[Row] | None, check: ColdCheck) -> str:
    m, c = report["machine"], report["checkpoint"]
    size = c["file_bytes"]
    out = [
        f"# CPU load benchmark, {report['date']}",
        "",
        (
            f"Checkpoint: {c['tensors']} bf16 tensors, {size / GB:.3f} GB ({size / (1 << 30):.3f} GiB), torch.save zip. "
            f"Repeats: {report['repeats']} warm, {report['cold_repeats']} cold, interleaved round-robin. "
            "ckptd.load's result was checked equal to torch.load's (torch.equal per tensor) before timing. "
            "GB/s = file bytes / median seconds (1 GB = 1e9 bytes). Plain floor = the fastest plain-read row."
        ),
        "",
        (
            f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['ram_gib']} GiB RAM, "
            f"Linux {m['kernel']}, Python {m['python']}, torch {m['torch']}, ckptd @ {m['git_commit']} "
            f"(default reader threads {m['ckptd_default_threads']}, chunk {m['ckptd_default_chunk_bytes'] >> 20} MiB)."
        ),
        "",
        f"Command: `{report['command']}`",
        "",
        (
            f"1-minute load average {report['loadavg_1min']['before']:.2f} before, {report['loadavg_1min']['after']:.2f} after "
            f"({m['cores']} cores): above ~1, other processes shared the CPUs and wall times carry their noise; "
            "CPU s (this process, user + system, all threads) does not. "
            f"Warm calls that found pages evicted and re-read them first: {report['warm_rewarm']['calls_with_pages_missing']}"
            f"/{report['warm_rewarm']['calls']} (most missing {report['warm_rewarm']['max_missing_fraction']:.1%})."
        ),
        "",
        table(warm, cold, size),
        "",
        "Criterion (page cache warm; every ckptd.load a fresh load, nothing cached inside ckptd):",
        *verdict_lines(verdict(warm)),
        "",
    ]
    if cold is not None:
        out += [
            "Page cache cold (file evicted with posix_fadvise(DONTNEED) before every call), for information:",
            *verdict_lines(verdict(cold)),
            "",
        ]
    else:
        out += [f"Page-cache-cold columns not measured here: {check.reason}.", ""]
    out += [f"Cold-cache check: {check.reason}.", "", f"**Criterion: {'HOLDS' if report['criterion_holds'] else 'DOES NOT HOLD'}**", ""]
    return "\n".join(out)


def row_json(rows: list[Row], size: int) -> list[dict[str, Any]]:
    return [{**asdict(r), "median_s": r.median, "min_s": r.best, "gb_per_s": size / GB / r.median} for r in rows]


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()) / "ckptd-bench", help="where the checkpoint is generated and reused"
    )
    p.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size in GiB of tensor data (at least)")
    p.add_argument("--tensors", type=int, default=200, help="about how many tensors (9 per layer + 3)")
    p.add_argument("--repeats", type=int, default=5, help="rounds with the page cache warm")
    p.add_argument("--cold-repeats", type=int, default=3, help="rounds with the file evicted before every call (0: skip)")
    p.add_argument("--threads", type=int, nargs="*", default=[1, 2, 4], help="reader thread counts to sweep (ckptd and plain read)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="where the .json and .md go")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if REPO in args.dir.resolve().parents or args.dir.resolve() == REPO:
        raise SystemExit(f"--dir {args.dir} is inside the repository; pick a scratch directory")
    print(f"checkpoint: generating or reusing under {args.dir} ...", flush=True)
    path, _ = ensure_checkpoint(args.dir, args.size_gb, args.tensors)
    spath, size = str(path), path.stat().st_size
    count = verify(spath)
    print(f"checkpoint: {path} ({size / GB:.3f} GB, {count} tensors); ckptd.load == torch.load verified", flush=True)
    todo = methods(args.threads)
    load_before, rewarmed = os.getloadavg(), list[float]()
    measure(spath, todo, 1, cold=False, rewarmed=[])  # untimed warm-up: imports, allocator, page cache
    warm = measure(spath, todo, args.repeats, cold=False, rewarmed=rewarmed)
    check = check_cold(spath) if args.cold_repeats > 0 else ColdCheck(False, math.nan, math.nan, math.nan, "skipped (--cold-repeats 0)")
    cold = measure(spath, todo, args.cold_repeats, cold=True, rewarmed=[]) if check.works else None
    holds = bool(verdict(warm)["holds"])
    report = {
        "date": dt.date.today().isoformat(),
        "command": shlex.join(sys.orig_argv),
        "cwd": os.getcwd(),
        "machine": machine_info(),
        "checkpoint": {"path": spath, "file_bytes": size, "tensors": count, "dtype": "bfloat16"},
        "repeats": args.repeats,
        "cold_repeats": args.cold_repeats if cold is not None else 0,
        "warm": {"rows": row_json(warm, size), "verdict": verdict(warm)},
        "cold": {"rows": row_json(cold, size), "verdict": verdict(cold)} if cold is not None else None,
        "cold_check": asdict(check),
        "loadavg_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "warm_rewarm": {
            "calls_with_pages_missing": sum(m > 0 for m in rewarmed),
            "calls": len(rewarmed),
            "max_missing_fraction": max(rewarmed, default=0.0),
        },
        "criterion_holds": holds,
    }
    text = markdown(report, warm, cold, check)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"cpu-load-{report['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(f"wrote {stem}.json and {stem}.md")
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
