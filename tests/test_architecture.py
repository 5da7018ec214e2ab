"""The import graph of the package, read from the source (every ``import``, also inside
functions and under ``TYPE_CHECKING``): no cycle between modules, and packages import only the
packages ARCHITECTURE.md allows.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fimntk"

#: Which packages each package may import (besides itself and the root ``fimntk``).
ALLOWED: dict[str, frozenset[str]] = {
    "contract": frozenset(),
    "engine": frozenset(),
    "core": frozenset({"contract"}),
    "client": frozenset({"contract", "engine"}),
    "worker": frozenset({"contract", "core", "engine"}),
    "service": frozenset({"contract", "core"}),
    "nngeometry": frozenset({"engine"}),
}
#: Cross-package imports allowed beyond :data:`ALLOWED`, each with its reason.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("fimntk.client.cli", "fimntk.service.command"): "the CLI offers 'serve' with the server extra",
    ("fimntk.client.cli", "fimntk.worker.command"): "the CLI offers 'worker' with the server extra",
}
#: Modules of the package that every module may import: its root and its version.
ROOT_MODULES = frozenset({"fimntk", "fimntk.version", "fimntk.__main__"})


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (``fimntk/`` links the package folders)."""
    found = {}
    paths = (Path(folder, f) for folder, _, files in os.walk(ROOT, followlinks=True) for f in files)
    for path in sorted(p for p in paths if p.suffix == ".py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """The fimntk modules ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            # A submodule, or else a name defined in the package's __init__.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


GRAPH = {name: set(_imports(name, path)) for name, path in MODULES.items()}


def _package(module: str) -> str:
    """The package a module belongs to; ``""`` for the root modules."""
    if module in ROOT_MODULES:
        return ""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_every_package_is_read() -> None:
    assert {_package(m) for m in MODULES} >= set(ALLOWED)
    assert sum(len(edges) for edges in GRAPH.values()) > 100


def test_no_import_cycle() -> None:
    assert _cycles() == []


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_it_may(package: str) -> None:
    wrong = sorted(
        f"{source} -> {target}"
        for source, targets in GRAPH.items()
        if _package(source) == package
        for target in targets
        if _package(target) not in {package, "", *ALLOWED[package]}
        and (source, target) not in EXCEPTIONS
    )
    assert wrong == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    saved = dict(GRAPH)
    try:
        GRAPH["fimntk.contract.vocabulary"] = {"fimntk.contract.problems"}
        GRAPH["fimntk.contract.problems"] = {"fimntk.contract.vocabulary"}
        assert ["fimntk.contract.problems", "fimntk.contract.vocabulary"] in _cycles()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
