"""The package's import graph has no cycles, counting imports inside functions and under
TYPE_CHECKING too: a module that needs another's types or helpers takes them from a module
below both, not from one that imports it back. And every import of the package, lazy ones
included, names a module or a name that exists (a moved module breaks here, not in the one
code path that imports it late)."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(SRC).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imported(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body (a name imported from a
    package counts as its submodule when there is one, else as the package)."""
    package = module_name(path) if path.name == "__init__.py" else \
        module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in modules:
                    found.add(target)
                elif base in modules:
                    found.add(base)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_finder_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycles() -> None:
    paths = sorted(SRC.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    graph = {module_name(path): imported(path, modules) for path in paths}
    assert len(graph) > 100 and graph["idlm.stage"] >= {"idlm.config", "idlm.errors"}
    assert cycles(graph) == []


@cache
def defined_names(path: Path) -> set[str]:
    """Names a module binds anywhere (defs, classes, assignments, imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def test_every_import_of_the_package_resolves() -> None:
    modules = {module_name(path): path for path in SRC.rglob("*.py")}
    missing = []
    for folder in ("src", "tests", "bench", "flows", "stages"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    missing += [f"{path}:{node.lineno} {a.name}" for a in node.names
                                if a.name.startswith("idlm") and a.name not in modules]
                elif isinstance(node, ast.ImportFrom) and not node.level and \
                        (node.module or "").startswith("idlm"):
                    if node.module not in modules:
                        missing.append(f"{path}:{node.lineno} {node.module}")
                        continue
                    names = defined_names(modules[node.module])
                    missing += [f"{path}:{node.lineno} {node.module}.{a.name}"
                                for a in node.names if a.name not in names
                                and f"{node.module}.{a.name}" not in modules]
    assert missing == []
