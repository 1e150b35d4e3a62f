"""The package has no import cycles: every ``import`` between modules of ``tta/`` (at module level
or inside a function) forms a directed graph, and that graph must have no cycle.

A package's ``__init__`` importing its own submodules is an edge like any other, so a submodule that
imports back from its package ``__init__`` (``from . import register``) is a cycle; registries are
leaf modules for that reason.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tta"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The ``tta`` modules ``path`` imports (``from pkg import name`` counts ``pkg.name`` when that
    is a module, else ``pkg``); imports under ``if TYPE_CHECKING:`` do not run and are skipped."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # "tta.data.stream.Batch" -> "tta.data.stream"
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_planted_cycle():
    graph = {"tta.a": {"tta.b"}, "tta.b": {"tta.c"}, "tta.c": {"tta.a"}, "tta.d": {"tta.a"}}
    assert cycles(graph) == [["tta.a", "tta.b", "tta.c"]]
    assert cycles({"tta.a": {"tta.b"}, "tta.b": set()}) == []


def test_relative_imports_resolve(tmp_path):
    graph = import_graph()
    assert "tta.methods.core" in graph["tta.methods.batch"]
    assert "tta.registry" in graph["tta.methods.registry"]


def test_no_import_cycle_in_tta():
    found = cycles(import_graph())
    if found:
        pytest.fail("import cycles in tta/:\n" + "\n".join(" <-> ".join(c) for c in found))


# ------------------------------------------------------------------------ what a start imports
#: heavy modules an eager start must not import: the compiler (about 2.7 s on a small CPU) and
#: torchvision, which imports the compiler itself (``torchvision.ops``)
NOT_AT_START = ("torch._dynamo", "torch._inductor", "torchvision")


def imported_modules(args: list[str]) -> set[str]:
    """The modules a fresh interpreter imports running ``python -X importtime <args>`` (read from
    importtime's report, so a process that exits early, like ``--help``, is covered too)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True,
                         cwd=PACKAGE.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    names = set()
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    assert "torch" in names  # the report was read
    return names


def heavy(loaded: set[str]) -> list[str]:
    return sorted(m for m in loaded for name in NOT_AT_START if m == name or m.startswith(name + "."))


def test_import_tta_does_not_import_the_compiler():
    """``import tta`` imports neither ``torch._dynamo`` nor torchvision: the eager boundaries of the
    compiled step are armed only when something compiles (:mod:`tta.compiling`), and torchvision is
    imported where an image codec or transform is used."""
    assert heavy(imported_modules(["-c", "import tta"])) == []


@pytest.mark.slow
def test_cli_help_does_not_import_the_compiler():
    assert heavy(imported_modules(["-m", "tta.run", "--help"])) == []
