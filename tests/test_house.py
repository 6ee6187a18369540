"""The house's size rules (ARCHITECTURE.md): modules and functions of a readable size, imports at the top of their
module (a function-level import only where it saves import time a user would notice, said in a comment there), and
no import circles. Static: the source is parsed, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lora_ranks", "tasks", "flows", "deployments")
MAX_MODULE_LINES = 400
LONG_FUNCTION_LINES = 80
MAX_LONG_FUNCTIONS = 3  # the training loop on one screen, one K-FAC pass, building a PEFT peer
MAX_FUNCTION_IMPORTS = 100


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _runtime_nodes(tree: ast.Module) -> list[ast.AST]:
    """Every node outside ``if TYPE_CHECKING:`` blocks (imports for annotations only never run)."""
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    return [n for n in ast.walk(tree) if id(n) not in typing_only]


def _imported(module: str, is_package: bool, node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The project's modules an import statement of ``module`` imports."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    submodules = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
    if len(submodules) == len(node.names):  # from package import submodule, ...
        return submodules
    return submodules | ({base} if base in modules else set())


def _survey():
    modules = _modules()
    long_modules, long_functions, function_imports, graph = [], [], [], {}
    for name, path in modules.items():
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES and path.name != "settings.py":
            long_modules.append(f"{path.relative_to(REPO)}: {lines} lines")
        tree = ast.parse(source)
        nodes = _runtime_nodes(tree)
        graph[name] = set()
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONG_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
                function_imports += [f"{path.relative_to(REPO)}:{n.lineno}" for n in ast.walk(node)
                                     if isinstance(n, (ast.Import, ast.ImportFrom))]
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name] |= _imported(name, path.name == "__init__.py", node, modules) - {name}
    return long_modules, long_functions, sorted(set(function_imports)), graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_modules_and_functions_are_of_a_readable_size():
    long_modules, long_functions, _, _ = _survey()
    assert long_modules == []
    assert len(long_functions) <= MAX_LONG_FUNCTIONS, "\n".join(long_functions)


def test_imports_are_at_the_top_and_form_no_circle():
    _, _, function_imports, graph = _survey()
    assert len(function_imports) < MAX_FUNCTION_IMPORTS, f"{len(function_imports)} function-level imports"
    assert _circles(graph) == []


def test_the_survey_sees_what_it_counts():
    """The rules' own check: a circle, a long function and a function-level import are found when present."""
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    import os\n" + "    x = 1\n" * 90)
    function = next(n for n in _runtime_nodes(tree) if isinstance(n, ast.FunctionDef))
    assert function.end_lineno - function.lineno + 1 > LONG_FUNCTION_LINES
    assert any(isinstance(n, ast.Import) for n in ast.walk(function))
    typing_only = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n")
    assert not any(isinstance(n, ast.Import) for n in _runtime_nodes(typing_only))
