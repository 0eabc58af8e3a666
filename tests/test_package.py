"""The package as a whole: its public surface, its docstring examples, its layering, its import graph."""

from __future__ import annotations

import ast
import doctest
import importlib
import pickle
import pkgutil
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import ckptd
import ckptd.formats
import ckptd.gpu
import ckptd.engine
import ckptd.server

ROOT = Path(__file__).resolve().parents[1]
# folder -> import package (pyproject.toml's package-dir)
PACKAGES = {
    "client": "ckptd", "client/engine": "ckptd.engine", "formats": "ckptd.formats", "gpu": "ckptd.gpu",
    "server": "ckptd.server",
}  # fmt: skip


def _modules_of(package: ModuleType) -> set[str]:
    return {package.__name__} | {m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")}


MODULES = sorted(
    set().union(*(_modules_of(p) for p in (ckptd, ckptd.engine, ckptd.formats, ckptd.gpu, ckptd.server)))
    - {"ckptd.__main__"}
)


def test_public_api_is_exactly_all() -> None:
    public = {
        name for name in dir(ckptd) if not name.startswith("_") and not isinstance(getattr(ckptd, name), ModuleType)
    }
    assert public - {"annotations"} == set(ckptd.__all__) - {"__version__"}
    for name in ckptd.__all__:
        assert getattr(ckptd, name) is not None


@pytest.mark.parametrize("package", [ckptd.engine, ckptd.formats, ckptd.gpu, ckptd.server])
def test_every_public_name_of_a_package_is_documented(package: ModuleType) -> None:
    """What a package exports is in its ``__all__``, each name there resolves, and its docstring names it."""
    for name in package.__all__:
        assert getattr(package, name) is not None, name
        assert name in (package.__doc__ or ""), f"{package.__name__}.{name} is undocumented"


def test_every_error_derives_from_the_root() -> None:
    errors = [getattr(ckptd, n) for n in ckptd.__all__ if n.endswith("Error")]
    assert all(issubclass(e, ckptd.CkptdError) for e in errors)


@pytest.mark.parametrize("name", [n for n in ckptd.__all__ if n.endswith("Error")])
def test_errors_show_as_ckptd_and_take_one_message(name: str) -> None:
    """``ckptd.X`` in tracebacks wherever X is defined; ``X(message)`` builds every one (the wire
    relies on it), and it pickles by that name."""
    cls = getattr(ckptd, name)
    assert cls.__module__ == "ckptd"
    exc = cls("the message")
    assert str(exc) == "the message"
    assert type(pickle.loads(pickle.dumps(exc))) is cls


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_every_package_has_docstring_examples() -> None:
    """The doctest walk reaches every package (formats/ and gpu/ used to be skipped)."""
    for package in PACKAGES.values():
        assert any(m == package or m.startswith(package + ".") for m in MODULES), package
    for package in (ckptd.engine, ckptd.formats, ckptd.gpu, ckptd.server):
        assert doctest.DocTestFinder().find(package), package.__name__


def test_import_touches_no_device_and_no_http() -> None:
    """Importing ckptd initialises no CUDA context and pulls in neither the daemon's web stack nor cupy."""
    code = (
        "import sys, torch, ckptd, ckptd.formats, ckptd.gpu\n"
        "assert not torch.cuda.is_initialized()\n"
        "bad = [m for m in ('fastapi', 'uvicorn', 'starlette', 'cupy', 'ckptd.server._app') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_ckptd_needs_no_torch() -> None:
    """``import ckptd`` (and its errors and settings) imports neither torch nor httpx: torch comes
    with the first function that needs it."""
    code = (
        "import sys, ckptd, ckptd.formats, ckptd.gpu\n"
        "ckptd.CheckpointError, ckptd.settings.url, ckptd.formats.is_sharded_index, ckptd.gpu.DeviceError\n"
        "bad = [m for m in ('torch', 'httpx', 'cupy', 'pydantic') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "ckptd.load\n"
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------
# The import graph, read from the source: every import statement (function-level ones
# too; not those under ``if TYPE_CHECKING``, which never run) and every string naming a
# module (``importlib.import_module("ckptd.server")``, a package's table of lazy names).
# A submodule's implicit import of its own package is not an edge.
# ---------------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    package = PACKAGES[path.parent.relative_to(ROOT).as_posix()]
    return package if path.stem == "__init__" else f"{package}.{path.stem}"


SOURCES = {_module_name(p): p for folder in PACKAGES for p in sorted((ROOT / folder).glob("*.py"))}


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, skipping the bodies of ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _package_of(module: str) -> str:
    return module if SOURCES[module].stem == "__init__" else module.rpartition(".")[0]


def _absolute(module: str, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = _package_of(module)
    for _ in range(level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{target}" if target else base


def imports_of(module: str) -> set[tuple[str, str]]:
    """``(imported module, name or "")`` for every import of ``module`` that runs."""
    found: set[tuple[str, str]] = set()
    for node in _runtime_nodes(ast.parse(SOURCES[module].read_text())):
        if isinstance(node, ast.Import):
            found.update((alias.name, "") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, node.level, node.module)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add((sub, "") if sub in SOURCES else (target, alias.name))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            named = _absolute(module, 1, text[1:]) if text.startswith(".") and text[1:].isidentifier() else text
            # a dotted name only: the bare word "ckptd" is a title or a logger's name far more often
            if named in SOURCES and named != module and "." in named:
                found.add((named, ""))
    return found


def import_graph() -> dict[str, set[str]]:
    """ckptd module -> the ckptd modules it imports."""
    return {m: {target for target, _ in imports_of(m) if target in SOURCES and target != m} for m in SOURCES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_graph_sees_hidden_imports() -> None:
    """Function-level imports, importlib strings and lazy tables are edges; TYPE_CHECKING ones are not."""
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "ckptd.server" in graph["ckptd._cli"]  # `serve`, imported inside _daemon()
    assert "ckptd._client" in graph["ckptd"]  # ckptd.Client, imported on first use
    assert "ckptd.gpu._devices" not in graph["ckptd.gpu._reader"]  # type annotations only


def test_no_import_cycles() -> None:
    assert _cycle(import_graph()) is None


def _foreign(module: str, allowed_third_party: set[str]) -> set[str]:
    stdlib = set(sys.stdlib_module_names) | {"__future__", "torch"}
    return {
        target for target, _ in imports_of(module)
        if target.split(".")[0] not in stdlib | allowed_third_party and not target.startswith("ckptd")
    }  # fmt: skip


def _ckptd_imports(module: str) -> set[tuple[str, str]]:
    return {(target, name) for target, name in imports_of(module) if target.startswith("ckptd")}


def _in_package(module: str, package: str) -> bool:
    return module == package or (module.startswith(package + ".") and _package_of(module) == package)


def _private_elsewhere(module: str, target: str) -> bool:
    """``target`` is a private module of a package other than ``module``'s."""
    return target in SOURCES and target.rpartition(".")[2].startswith("_") and _package_of(target) != _package_of(module)


THIRD_PARTY = {
    "ckptd.formats": set(),
    "ckptd.engine": set(),  # no httpx: the engine knows nothing of HTTP
    "ckptd.gpu": {"cupy", "kvikio"},  # only when CUDA devices are made
    "ckptd": {"tqdm", "httpx", "httpcore"},  # httpcore: the backend under httpx's Unix-socket transport (_wire)
    "ckptd.server": {
        "fastapi", "starlette", "uvicorn", "h11", "pydantic", "pydantic_settings", "prometheus_client",
        "pythonjsonlogger",  # --log-format json
    },
}
# The five concepts of the README's picture (section "Layout"), and its arrows: each may
# import the ones it points to (public names only), and no others.
CONCEPTS = {
    "ckptd": "front/CLI", "ckptd.server": "daemon", "ckptd.engine": "engine", "ckptd.gpu": "device layer",
    "ckptd.formats": "formats",
}  # fmt: skip
ARROWS = {
    ("front/CLI", "daemon"),  # `ckptd serve` only (test_only_serve_reaches_the_daemon)
    ("front/CLI", "engine"), ("front/CLI", "device layer"), ("front/CLI", "formats"),
    ("daemon", "engine"), ("daemon", "device layer"), ("daemon", "formats"),
    ("engine", "device layer"), ("engine", "formats"),
    ("device layer", "formats"),
}  # fmt: skip


def _concept(module: str) -> str:
    return CONCEPTS[_package_of(module)]


def concept_graph() -> set[tuple[str, str]]:
    """(importer, imported) concept pairs, read from every module's imports."""
    return {
        (_concept(module), _concept(target))
        for module, targets in import_graph().items() for target in targets if _concept(module) != _concept(target)
    }  # fmt: skip


def test_the_picture_has_exactly_the_arrows_of_the_code() -> None:
    """Every arrow of the README's picture is used by the code, the code uses no other, and
    they run one way (no cycle among the concepts)."""
    assert concept_graph() == ARROWS
    graph: dict[str, set[str]] = {c: set() for c in CONCEPTS.values()}
    for source, target in ARROWS:
        graph[source].add(target)
    assert _cycle(graph) is None


def test_only_serve_reaches_the_daemon() -> None:
    """The front reaches the daemon in one place, ``ckptd serve`` (ckptd._cli), by a plain import."""
    graph = import_graph()
    reaching = {m for m in SOURCES if _concept(m) == "front/CLI" and any(_concept(t) == "daemon" for t in graph[m])}
    assert reaching == {"ckptd._cli"}
    assert {target for target, _ in imports_of("ckptd._cli") if target.startswith("ckptd.server")} == {"ckptd.server"}
    assert "import_module" not in SOURCES["ckptd._cli"].read_text()


def test_the_engine_loads_without_http_or_the_daemon_client() -> None:
    """A load through ``ckptd.engine`` imports no httpx and none of the front's modules."""
    code = (
        "import io, sys, torch, ckptd.engine\n"
        "buf = io.BytesIO(); torch.save({'w': torch.ones(2)}, buf); buf.seek(0)\n"
        "assert ckptd.engine.load(buf)['w'].tolist() == [1.0, 1.0]\n"
        "front = [m for m in sys.modules if m.startswith('ckptd._') or m.split('.')[0] == 'httpx']\n"
        "assert not front, front\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_layers_depend_one_way(module: str) -> None:
    """Each module imports only its own package and the concepts its concept points to (the
    picture's arrows), their public names only (``__all__``), and no private module of
    another package; third-party imports: formats none, gpu cupy, engine none (no httpx),
    front httpx and tqdm, the daemon its web stack."""
    package = _package_of(module)
    assert _foreign(module, THIRD_PARTY[package]) == set()
    allowed = {p for p, concept in CONCEPTS.items() if (CONCEPTS[package], concept) in ARROWS}
    for target, name in _ckptd_imports(module):
        assert not _private_elsewhere(module, target), f"{module} imports private {target}"
        if target in SOURCES and _in_package(target, package):
            continue
        assert target in allowed, f"{module} imports {target}"
        if name:
            assert name in importlib.import_module(target).__all__, f"{module} imports {target}.{name}: not public"


def test_http_layer_knows_nothing_of_cuda() -> None:
    """The FastAPI app sees the cache through a protocol: no device layer, no cupy, no torch.cuda."""
    names = {target for target, _ in imports_of("ckptd.server._app")}
    assert not {n for n in names if n.startswith(("ckptd.gpu", "cupy", "torch"))}


# ---------------------------------------------------------------------------------------
# The command line starts without torch
# ---------------------------------------------------------------------------------------

_HEALTH = (
    "import sys, time\n"
    "start = time.perf_counter()\n"
    "from ckptd._cli import main\n"
    "status = main(sys.argv[1:])\n"
    "elapsed = time.perf_counter() - start\n"
    "loaded = [m for m in ('torch', 'cupy') if m in sys.modules]\n"
    "print(f\"{status}|{elapsed}|{','.join(loaded)}\", file=sys.stderr)\n"
)


@pytest.mark.parametrize(
    "argv",
    [
        ["health", "--url", "unix:///nowhere.sock"],
        ["ls", "--url", "unix:///nowhere.sock"],
        ["stats", "--url", "unix:///nowhere.sock"],
        ["prefetch", "/m/a.pt", "--url", "unix:///nowhere.sock"],
        ["evict", "a1b2", "--url", "unix:///nowhere.sock"],
        ["--help"],
        ["--version"],
    ],
)
def test_admin_commands_import_no_torch(argv: list[str]) -> None:
    """``ckptd health/ls/stats/prefetch/evict/--help/--version`` import neither torch nor cupy."""
    proc = subprocess.run([sys.executable, "-c", _HEALTH, *argv], capture_output=True, text=True, timeout=60)
    status, _, loaded = proc.stderr.strip().splitlines()[-1].split("|")
    assert loaded == "", f"{argv} imported {loaded}"
    assert int(status) == (1 if argv[0] not in ("--help", "--version") else 0), proc.stderr


def test_health_answers_within_a_second() -> None:
    """``ckptd health --url unix:///nowhere.sock`` (a probe's command) exits 1 having used well
    under a second of CPU, interpreter start included (importing torch alone takes more than
    that). The CPU time is the check: the wall time on a busy machine is the scheduler's; the
    best of three runs must still stay under a few seconds, i.e. nothing waits on a timeout."""
    cpu, wall = [], []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ckptd", "health", "--url", "unix:///nowhere.sock"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        wall.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        assert proc.returncode == 1 and "no ckptd daemon answers" in proc.stderr, proc.stderr
    assert min(cpu) < 1.0, cpu
    assert min(wall) < 3.0, wall
