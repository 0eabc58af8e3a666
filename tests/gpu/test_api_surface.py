"""Every cupy and CUDA driver name the GPU backend uses exists, called with a signature that fits.

Runs in CI without a GPU: cupy imports without one (the ``gpu`` extra's ``cupy-cuda13x`` is a
test dependency), and the driver API's declarations come from NVIDIA's ``cuda-bindings``
(``cydriver.pxd``). A renamed or re-signatured function then fails here, not on the first
GPU run. The call sites are read from the source with :mod:`ast`, so a new call is checked
without anyone listing it.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path
from typing import Any

import cupy
import pytest

from ckptd.gpu import _driver

SOURCES = [Path(__file__).resolve().parents[2] / folder for folder in ("gpu", "client", "server")]
# how the code names cupy and its runtime: self.cupy / self._cp / cp / cupy, and rt = <cupy>.cuda.runtime
CUPY_ROOTS = {"cupy": "", "cp": "", "self.cupy": "", "self._cp": "", "rt": "cuda.runtime."}


def _sources() -> list[tuple[Path, ast.Module]]:
    files = sorted(p for folder in SOURCES for p in folder.rglob("*.py"))
    return [(p, ast.parse(p.read_text(), str(p))) for p in files]


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _params(signature: str) -> list[str]:
    inner = signature[signature.index("(") + 1 : signature.rindex(")")]
    depth, part, parts = 0, "", []
    for ch in inner:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(part.strip())
            part = ""
        else:
            part += ch
    if part.strip():
        parts.append(part.strip())
    return [p for p in parts if p not in ("self", "void")]


# --- the driver --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def declared() -> dict[str, int]:
    """Driver function -> parameter count, from NVIDIA's Cython declarations of the driver API."""
    spec = importlib.util.find_spec("cuda.bindings")
    assert spec is not None and spec.submodule_search_locations, "cuda-bindings (a test dependency) is not installed"
    pxd = Path(next(iter(spec.submodule_search_locations))) / "cydriver.pxd"
    found = {}
    for match in re.finditer(r"^cdef CUresult (\w+)\((.*?)\) except", pxd.read_text(), re.MULTILINE):
        found[match.group(1)] = len(_params(f"({match.group(2)})"))
    assert len(found) > 300  # the whole driver API, not a stub
    return found


def test_declared_driver_functions_exist_with_their_arity(declared: dict[str, int]) -> None:
    for name, arity in _driver.ARITY.items():
        # the header #defines cuX to cuX_v2; the library exports the suffixed symbol
        api = name if name in declared else name.removesuffix("_v2")
        assert api in declared, f"{name} is not a CUDA driver function"
        assert declared[api] == arity, f"{name} takes {declared[api]} parameters, ARITY says {arity}"


def test_every_driver_call_is_declared_and_called_with_its_arity() -> None:
    calls = 0
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and re.fullmatch(r"cu[A-Z]\w*", node.func.attr):
                name = node.func.attr
                assert name in _driver.ARITY, f"{path.name}:{node.lineno}: {name} is not declared in gpu/_driver.py ARITY"
                assert len(node.args) == _driver.ARITY[name], f"{path.name}:{node.lineno}: {name} with {len(node.args)} arguments"
                calls += 1
    assert calls >= len(_driver.ARITY)


# --- cupy ----------------------------------------------------------------------------------


def _cupy_uses() -> list[tuple[str, int, str, ast.Call | None]]:
    """(file, line, cupy attribute path, the call if it is called) for every use of cupy."""
    uses = []
    for path, tree in _sources():
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or isinstance(parents.get(node), ast.Attribute):
                continue  # only whole chains
            dotted = _dotted(node)
            if dotted is None:
                continue
            for root, prefix in CUPY_ROOTS.items():
                if dotted.startswith(root + ".") and dotted != root:
                    parent = parents.get(node)
                    call = parent if isinstance(parent, ast.Call) and parent.func is node else None
                    uses.append((path.name, node.lineno, prefix + dotted[len(root) + 1 :], call))
                    break
    return uses


def test_every_cupy_name_used_exists_and_calls_fit_its_signature() -> None:
    uses = _cupy_uses()
    names = {name for _, _, name, _ in uses}
    assert {"cuda.runtime.memcpyAsync", "cuda.runtime.memcpyPeerAsync", "cuda.runtime.hostAlloc", "cuda.Device"} <= names
    checked = 0
    for file, line, name, call in uses:
        target: Any = cupy
        for part in name.split("."):
            assert hasattr(target, part), f"{file}:{line}: cupy.{name} does not exist (cupy {cupy.__version__})"
            target = getattr(target, part)
        doc = (getattr(target, "__doc__", None) or "").splitlines()
        if call is None or not doc or not doc[0].startswith(name.rsplit(".", 1)[-1] + "("):
            continue  # not called, or cupy embeds no signature (classes): the name is checked
        params = _params(doc[0].split(" -> ")[0])
        required = [p for p in params if "=" not in p]
        keywords = {p.split("=")[0].split()[-1] for p in params}
        given = len(call.args) + len(call.keywords)
        assert len(required) <= given <= len(params), f"{file}:{line}: cupy.{name} called with {given} arguments: {doc[0]}"
        assert all(k.arg in keywords for k in call.keywords), f"{file}:{line}: cupy.{name}: {doc[0]}"
        checked += 1
    assert checked >= 10
