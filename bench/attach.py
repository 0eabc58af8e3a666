"""Warm attach and per-tensor cost: ckptd against torch.load, embedded and through the daemon.

One run, side by side, every timed load in a fresh Python process (torch and ckptd
imported first, not timed; file in the page cache), from "path in hand" to "the object
returned". Checkpoints:

* ``moe-200``, ``moe-2000``, ``moe-20000``: MoE-shaped state dicts of small bf16 tensors
  (``model.layers.{l}.mlp.experts.{e}.w{j}``, 8 x 64, 100 per expert);
* ``llm-1GiB``: a Llama-shaped 1 GiB bf16 state dict (24 layers, 219 tensors, the
  checkpoint of ``bench/cpu_load.py``'s shape);
* ``llama-3.2-1b-quarter``: Llama-3.2-1B's real key names and layout (16 layers, GQA with
  32 query and 8 key/value heads, tied input and output embeddings, vocabulary 128,256)
  at a quarter of its width (hidden 512, MLP 2,048), 146 tensors, ~0.25 GB.

Methods (each a fresh process per timed load):

* ``torch.load``: ``torch.load(path, map_location='cpu')`` (weights_only, torch's default);
* ``ckptd.load``: the embedded engine, ``ckptd.load(path, map_location='cpu')`` (cold:
  nothing cached inside ckptd);
* ``daemon cold``: ``Client.load`` when the daemon does not hold the checkpoint (evicted
  before each call): the daemon reads the file, the worker maps it;
* ``daemon warm attach``: the worker's first ``Client.load`` of a checkpoint the daemon
  holds, with the worker's ``ckptd.Client`` made first (process set-up: the HTTP modules
  imported, once per process, not per load);
* ``daemon warm, first call``: the same attach through ``ckptd.load(path, server=url)``
  as a worker's very first call: the timed span includes importing the daemon client's
  modules and making the process's client;
* ``plain read`` (the 1 GiB checkpoint only): memfd + ``os.preadv`` of the whole file with
  2 threads into fresh shared memory, the machine's floor for a cold CPU load.

Before anything is timed, every checkpoint loaded through the daemon is checked equal to
torch.load's (values, dtypes, shapes, strides, ties). Rounds interleave the methods; the
tables give medians. Run: ``.venv/bin/python bench/attach.py`` (about 4 minutes on a quiet
2-core machine); ``--rounds``, ``--cases``, ``--out``, ``--dir``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
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
TORCH, EMBEDDED, COLD, WARM, FIRST, PLAIN = (
    "torch.load", "ckptd.load", "daemon cold", "daemon warm attach", "daemon warm, first call", "plain read",
)
METHODS = (TORCH, EMBEDDED, COLD, WARM, FIRST)
CASES = ("moe-200", "moe-2000", "moe-20000", "llm-1GiB", "llama-3.2-1b-quarter")
PER_EXPERT = 100


# ------------------------------------------------------------------------ checkpoints


def moe_state(tensors: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(tensors):
        expert, j = divmod(i, PER_EXPERT)
        state[f"model.layers.{expert // 8}.mlp.experts.{expert}.w{j}"] = torch.randn(8, 64, generator=gen).bfloat16()
    return state


def llm_state(size_bytes: int, layers: int) -> dict[str, Any]:
    """bench/cpu_load.py's Llama-like shapes: 9 tensors per layer plus embed, norm, lm_head."""
    import torch

    h = 32 * math.ceil(math.sqrt(size_bytes / 2 / (16 * layers + 32)) / 32)
    gen = torch.Generator().manual_seed(0)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (16 * h, h)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{proj}.weight"] = (h, h)
        shapes[f"{p}.mlp.gate_proj.weight"] = (4 * h, h)
        shapes[f"{p}.mlp.up_proj.weight"] = (4 * h, h)
        shapes[f"{p}.mlp.down_proj.weight"] = (h, 4 * h)
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (16 * h, h)
    return {name: torch.randn(shape, generator=gen).bfloat16() for name, shape in shapes.items()}


def llama_32_1b_quarter() -> dict[str, Any]:
    """Llama-3.2-1B's state dict (transformers' key names) at a quarter of its width."""
    import torch

    hidden, inter, layers, heads, kv_heads, vocab = 2048 // 4, 8192 // 4, 16, 32, 8, 128256
    head_dim = hidden // heads
    gen = torch.Generator().manual_seed(0)

    def w(*shape: int) -> Any:
        return (torch.randn(shape, generator=gen) * 0.02).bfloat16()

    state: dict[str, Any] = {"model.embed_tokens.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        state[f"{p}.self_attn.q_proj.weight"] = w(heads * head_dim, hidden)
        state[f"{p}.self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden)
        state[f"{p}.self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden)
        state[f"{p}.self_attn.o_proj.weight"] = w(hidden, heads * head_dim)
        state[f"{p}.mlp.gate_proj.weight"] = w(inter, hidden)
        state[f"{p}.mlp.up_proj.weight"] = w(inter, hidden)
        state[f"{p}.mlp.down_proj.weight"] = w(hidden, inter)
        state[f"{p}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        state[f"{p}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    state["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tie_word_embeddings: one tensor, two names
    return state


def build(case: str, folder: Path) -> Path:
    """The case's checkpoint under ``folder`` (made once, reused while it exists)."""
    import torch

    path = folder / f"{case}.pt"
    if path.exists():
        return path
    if case.startswith("moe-"):
        state = moe_state(int(case.split("-")[1]))
    elif case == "llm-1GiB":
        state = llm_state(1 << 30, 24)
    elif case == "llama-3.2-1b-quarter":
        state = llama_32_1b_quarter()
    else:
        raise SystemExit(f"unknown case {case!r}; known: {', '.join(CASES)}")
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------- a timed load


def child(method: str, path: str, url: str) -> None:
    """One timed load in this (fresh) process; prints its seconds as JSON."""
    import torch

    import ckptd

    if method == PLAIN:
        from cpu_load import plain_read  # the CPU bench's floor: the file read into fresh shared memory

        print(json.dumps({"seconds": plain_read(path, 2).wall}))
        return
    # Process set-up, not timed: what a worker imports and makes once (torch.load has all
    # of torch imported). The first call through ckptd.load(server=) is timed with its own.
    client = ckptd.Client(url) if method in (COLD, WARM) else None
    if method == EMBEDDED:
        import ckptd.engine._load  # noqa: F401  (the engine's modules; ckptd imports them on first use)

        assert callable(ckptd.load)
    start = time.perf_counter()
    if method == TORCH:
        obj = torch.load(path, map_location="cpu")
    elif method == EMBEDDED:
        obj = ckptd.load(path, map_location="cpu")
    elif method == FIRST:
        obj = ckptd.load(path, map_location="cpu", server=url)
    else:
        assert client is not None
        obj = client.load(path, map_location="cpu")
    seconds = time.perf_counter() - start
    assert len(obj) > 0
    print(json.dumps({"seconds": seconds, "tensors": len(obj)}))


def timed(method: str, path: Path, url: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, str(path), url], check=True, capture_output=True, text=True
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["seconds"])


# ------------------------------------------------------------------------ the run


def verify(path: Path, url: str) -> int:
    """The daemon's result equals torch.load's (values, dtypes, shapes, strides, ties)."""
    import torch

    import ckptd

    expected = torch.load(path, map_location="cpu")
    with ckptd.Client(url) as client:
        actual = client.load(path, map_location="cpu")
    assert list(actual) == list(expected), path
    seen: dict[int, str] = {}
    for name, tensor in expected.items():
        got = actual[name]
        assert (got.dtype, got.shape, got.stride()) == (tensor.dtype, tensor.shape, tensor.stride()), name
        assert torch.equal(got, tensor), name
        first = seen.setdefault(id(tensor), name)
        assert actual[first] is got, f"{name}: tied to {first} in torch.load's result, not in ckptd's"
    return len(expected)


def evict(url: str, path: Path) -> None:
    """Drop the checkpoint from the daemon (the last worker's session may still be closing)."""
    import ckptd

    with ckptd.Client(url) as client:
        for _ in range(200):
            try:
                client.evict(str(path))
                return
            except ckptd.CheckpointBusyError:
                time.sleep(0.05)
            except ckptd.CheckpointNotFoundError:
                return
    raise RuntimeError(f"{path} stayed leased in the daemon")


def run_case(case: str, path: Path, url: str, rounds: int) -> dict[str, list[float]]:
    methods = (*METHODS, PLAIN) if case == "llm-1GiB" else METHODS
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(rounds):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for method in order:
            if method == COLD:
                evict(url, path)  # held again once the cold load is done: the warm methods find it
            times[method].append(timed(method, path, url))
    return times


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "PATH", "URL"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints are made (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    sys.path.insert(0, str(REPO / "bench"))
    from daemon_load import start_daemon

    started = time.monotonic()
    report: dict[str, Any] = {"machine": machine(), "load_average_before": load_average(), "cases": {}}
    with tempfile.TemporaryDirectory(prefix="ckptd-attach-") as tmp:
        folder = args.dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        sock = str(Path(tmp) / "d.sock")
        daemon = start_daemon(folder, sock, "--host-budget", "4GiB")
        url = f"unix://{sock}"
        try:
            for case in args.cases:
                path = build(case, folder)
                path.read_bytes()  # into the page cache
                tensors = verify(path, url)  # also makes the daemon hold it
                times = run_case(case, path, url, args.rounds)
                report["cases"][case] = {"tensors": tensors, "bytes": path.stat().st_size, "times": times}
                print(case, {m: round(statistics.median(t), 4) for m, t in times.items()}, flush=True)
                evict(url, path)  # the next case's memory is its own
        finally:
            daemon.terminate()
            daemon.wait(30)
    report["load_average_after"] = load_average()
    report["seconds"] = round(time.monotonic() - started, 1)
    report["command"] = " ".join([".venv/bin/python bench/attach.py", *sys.argv[1:]])
    stem = args.out / f"attach-{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(markdown(report))
    stem.with_suffix(".svg").write_text(svg(report))
    print(f"wrote {stem}.md, .svg and .json in {report['seconds']} s")


def machine() -> dict[str, Any]:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "commit": _commit()}


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------ reports


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Warm attach and per-tensor cost ({dt.date.today().isoformat()})",
        "",
        f"Command: `{report['command']}` (commit {m['commit']}); {m['cpu']}, {m['cpus']} CPUs, "
        f"Python {m['python']}, torch {m['torch']}; load average {report['load_average_before']} before, "
        f"{report['load_average_after']} after; {report['seconds']} s in all. Medians over the rounds, each load in a "
        "fresh process, file in the page cache. Speed-ups are torch.load's median over the method's.",
        "",
        "| checkpoint | tensors | GB | torch.load | ckptd.load | daemon cold | daemon warm attach | warm, first call |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, data in report["cases"].items():
        med = {k: statistics.median(v) for k, v in data["times"].items()}
        ref = med[TORCH]
        cells = [f"{_ms(med[k])} ({ref / med[k]:.1f}x)" for k in (EMBEDDED, COLD, WARM, FIRST)]
        lines.append(f"| {case} | {data['tensors']:,} | {data['bytes'] / 1e9:.2f} | {_ms(ref)} | " + " | ".join(cells) + " |")
    lines += ["", *criteria(report), "", "All rounds (seconds):", "", "```",
              json.dumps({c: d["times"] for c, d in report["cases"].items()}, indent=1), "```", ""]
    return "\n".join(lines)


def criteria(report: dict[str, Any]) -> list[str]:
    """Issue 14's bars, judged on this run's medians."""
    out = ["Issue 14's bars, this run:", ""]
    cases = report["cases"]
    if "llm-1GiB" in cases:
        med = {k: statistics.median(v) for k, v in cases["llm-1GiB"]["times"].items()}
        warm, ref = med[WARM], med[TORCH]
        out.append(f"- 1 GiB warm attach: median {_ms(warm)} (bar <= 10 ms), {ref / warm:.0f}x torch.load (bar >= 50x): "
                   f"{'met' if warm <= 0.010 and ref / warm >= 50 else 'NOT met'}.")
        out.append(f"- 1 GiB cold CPU load: ckptd.load {_ms(med[EMBEDDED])} = {ref / med[EMBEDDED]:.2f}x torch.load (bar "
                   f">= 1.4x: {'met' if ref / med[EMBEDDED] >= 1.4 else 'NOT met'}); {med[EMBEDDED] / med[PLAIN]:.2f}x "
                   f"the plain read of the file into fresh shared memory with 2 threads ({_ms(med[PLAIN])}, meant as "
                   "the machine's floor; a ratio below 1 means that read was the slower one in this run).")
    if "moe-20000" in cases:
        med = {k: statistics.median(v) for k, v in cases["moe-20000"]["times"].items()}
        out.append(f"- 20,000 tensors, warm attach: median {_ms(med[WARM])} (bar <= 150 ms): "
                   f"{'met' if med[WARM] <= 0.150 else 'NOT met'}; embedded cold load {med[TORCH] / med[EMBEDDED]:.2f}x "
                   f"torch.load (bar >= 1.5x: {'met' if med[TORCH] / med[EMBEDDED] >= 1.5 else 'NOT met'}).")
    return out


def svg(report: dict[str, Any]) -> str:
    """Grouped bars per checkpoint, time on a log scale (1 ms to 100 s)."""
    colors = {TORCH: "#888888", EMBEDDED: "#2a7ab0", COLD: "#9cc3de", WARM: "#e08a2c", FIRST: "#f2c18d"}
    cases = report["cases"]
    bar, gap, left, top, base = 22, 40, 70, 40, 330
    group = bar * len(colors) + gap
    width, height = left + group * len(cases) + 20, base + 80
    lo, hi = -3.0, 2.0  # log10 seconds

    def y(seconds: float) -> float:
        return base - (base - top) * (min(max(math.log10(seconds), lo), hi) - lo) / (hi - lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<text x="{left}" y="18" font-size="13">Fresh-process load time per checkpoint (log scale, lower is faster)</text>']
    for exp in range(int(lo), int(hi) + 1):
        yy = y(10.0**exp)
        label = f"{10.0**exp * 1e3:g} ms" if exp < 0 else f"{10.0**exp:g} s"
        parts.append(f'<line x1="{left - 5}" y1="{yy:.1f}" x2="{width - 10}" y2="{yy:.1f}" stroke="#dddddd"/>')
        parts.append(f'<text x="4" y="{yy + 4:.1f}">{label}</text>')
    for g, (case, data) in enumerate(cases.items()):
        for i, method in enumerate(colors):
            value = statistics.median(data["times"][method])
            x = left + g * group + i * bar
            parts.append(f'<rect x="{x}" y="{y(value):.1f}" width="{bar - 3}" height="{base - y(value):.1f}" '
                         f'fill="{colors[method]}"><title>{method}: {_ms(value)}</title></rect>')
        parts.append(f'<text x="{left + g * group}" y="{base + 15}">{case}</text>')
        parts.append(f'<text x="{left + g * group}" y="{base + 28}" fill="#555555">{data["tensors"]:,} tensors</text>')
    for i, method in enumerate(colors):
        x = left + i * 175
        parts.append(f'<rect x="{x}" y="{height - 24}" width="10" height="10" fill="{colors[method]}"/>')
        parts.append(f'<text x="{x + 14}" y="{height - 15}">{method}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
