"""The package as a whole: its public surface, its docstring examples, its layering."""

from __future__ import annotations

import ast
import doctest
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import ckptd

import ckptd.server  # noqa: E402  (its modules' examples run too)

MODULES = sorted(
    {m.name for m in pkgutil.walk_packages(ckptd.__path__, "ckptd.")}
    | {m.name for m in pkgutil.walk_packages(ckptd.server.__path__, "ckptd.server.")}
    - {"ckptd.__main__"}
)


def test_public_api_is_exactly_all() -> None:
    public = {
        name for name in dir(ckptd) if not name.startswith("_") and not isinstance(getattr(ckptd, name), ModuleType)
    }
    assert public - {"annotations"} == set(ckptd.__all__) - {"__version__"}
    for name in ckptd.__all__:
        assert getattr(ckptd, name) is not None


def test_every_error_derives_from_the_root() -> None:
    errors = [getattr(ckptd, n) for n in ckptd.__all__ if n.endswith("Error")]
    assert all(issubclass(e, ckptd.CkptdError) for e in errors)


@pytest.mark.parametrize("module", ["ckptd", *MODULES])
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_import_touches_no_device_and_no_http() -> None:
    """Importing ckptd initialises no CUDA context and pulls in neither the daemon's web stack nor cupy."""
    code = (
        "import sys, torch, ckptd, ckptd.formats, ckptd.gpu\n"
        "assert not torch.cuda.is_initialized()\n"
        "bad = [m for m in ('fastapi', 'uvicorn', 'starlette', 'cupy', 'ckptd.server._app') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _imports(folder: Path) -> set[str]:
    """Top-level names of absolute imports in a source folder (relative ones stay inside)."""
    found: set[str] = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
    return found


def _foreign(names: set[str], allowed: set[str]) -> set[str]:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    return {n for n in names if n.split(".")[0] not in stdlib and n not in allowed and n.split(".")[0] != "torch"}


def test_layers_depend_one_way() -> None:
    """formats: stdlib + torch; gpu: + formats; the engine never imports the daemon's HTTP stack."""
    root = Path(__file__).resolve().parents[1]
    assert _foreign(_imports(root / "formats"), set()) == set()
    assert _foreign(_imports(root / "gpu"), {"ckptd.formats", "cupy", "kvikio"}) == set()  # only when CUDA devices are made
    client = _foreign(_imports(root / "client"), {"tqdm", "httpx"})
    assert {n for n in client if not n.startswith("ckptd") or n.startswith("ckptd.server")} == set()


def test_http_layer_knows_nothing_of_cuda() -> None:
    """The FastAPI app sees the cache through a protocol: no device layer, no cupy, no torch.cuda."""
    app = Path(__file__).resolve().parents[1] / "server" / "_app.py"
    names: set[str] = set()
    tree = ast.parse(app.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    assert not {n for n in names if n.startswith(("ckptd.gpu", "cupy", "torch"))}
