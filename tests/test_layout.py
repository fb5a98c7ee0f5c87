"""The package layout's rules: no import cycles, dependencies flow one way, typer only in the CLI,
``__init__`` files only re-export (docs/architecture.md draws the same picture)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "memattn"

# What each core package may import from memattn at module level (its own modules always).
ALLOWED = {
    "attention": {"errors"},
    "detection": {"attention", "errors", "quiet"},
    "mitigation": {"attention", "detection", "errors"},
    "training": {"attention", "detection", "errors", "interrupts", "paths"},
}
REEXPORT_ONLY = (ast.Import, ast.ImportFrom, ast.Expr, ast.Assign, ast.AnnAssign)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """memattn modules one import statement names (``from pkg import mod`` names ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        return {r for a in node.names if (r := _resolve(a.name)) and a.name.startswith("memattn")}
    base = node.module or ""
    if node.level:
        package = module.split(".")
        if MODULES[module].name != "__init__.py":
            package = package[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    if not base.startswith("memattn"):
        return set()
    out = set()
    for alias in node.names:
        target = _resolve(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        if target:
            out.add(target)
    return out


def module_level_imports(module: str) -> set[str]:
    """Imports run when the module is imported (not inside functions, classes or TYPE_CHECKING)."""
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()
    for statement in tree.body:
        if isinstance(statement, ast.If) and "TYPE_CHECKING" in ast.unparse(statement.test):
            continue
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for node in ast.walk(statement):
            if isinstance(node, ast.Import | ast.ImportFrom):
                found |= _imported(module, node)
    found.discard(module)
    return found


def all_imports(module: str) -> set[str]:
    """Every top-level package name imported anywhere in the module (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_resolver_sees_the_imports_it_must():
    assert "memattn.attention.session" in module_level_imports("memattn.attention.trace")
    assert "memattn.errors" in module_level_imports("memattn.attention.session")
    assert {"memattn.detection.step1"} <= module_level_imports("memattn.mitigation.guard")


def test_no_import_cycle_at_module_level():
    graph = {module: module_level_imports(module) for module in MODULES}
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]  # the check itself can fail


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_core_packages_import_only_the_layers_below(package):
    wrong = {}
    for module in MODULES:
        if module.split(".")[1:2] != [package]:
            continue
        others = {dep.split(".")[1] for dep in module_level_imports(module) if dep.count(".")}
        bad = others - ALLOWED[package] - {package}
        if bad:
            wrong[module] = sorted(bad)
    assert wrong == {}


def test_typer_and_rich_are_imported_only_by_the_cli():
    users = sorted(
        module
        for module in MODULES
        if {"typer", "rich"} & all_imports(module) and not module.startswith("memattn.cli")
    )
    assert users == []
    library = [m for m in MODULES if not m.startswith(("memattn.cli", "memattn.__main__"))]
    assert [m for m in library if any(d.startswith("memattn.cli") for d in module_level_imports(m))] == []


def test_package_init_files_only_reexport():
    exceptions = {"memattn.cli"}  # the entry point: main() and the lazily imported Typer app
    for module, path in MODULES.items():
        if path.name != "__init__.py" or module in exceptions:
            continue
        tree = ast.parse(path.read_text())
        kinds = {
            type(statement).__name__ for statement in tree.body if not isinstance(statement, REEXPORT_ONLY)
        }
        assert kinds == set(), f"{module}/__init__.py holds {kinds}"
