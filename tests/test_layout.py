"""The package's import graph stays legible: no circles between modules, and no module
imports a package above it (its own ``__init__`` or an ancestor's), so each layer can be read
and changed without the ones that use it (docs/layout.md).

Every import counts, function-local and ``TYPE_CHECKING`` ones included: a circle hidden in a
function is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import glofnd_hf

PACKAGE = Path(glofnd_hf.__file__).parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imported(module: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The package's modules that one import statement names."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.split(".")
            if path.name != "__init__.py":
                package = package[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{alias.name}" for alias in node.names]
    found = set()
    for name in names:
        # ``from pkg import module`` names a module; ``from pkg import thing`` names pkg.
        while name and name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules and name != module:
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[module] = set()
        for node in ast.walk(tree):
            graph[module] |= _imported(module, path, node, modules)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
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
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_imports_it_must():
    """The checker itself: a relative import, a package import and a function-local one."""
    graph = import_graph()
    assert "glofnd_hf.fnd.interface" in graph["glofnd_hf.fnd.glofnd"]
    assert "glofnd_hf.fnd.registry" in graph["glofnd_hf.fnd.glofnd"]
    assert "glofnd_hf.models.tiny_clip" in graph["glofnd_hf.models.tiny_siglip"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_circles_between_modules():
    assert circles(import_graph()) == []


def test_no_module_imports_a_package_above_it():
    upward = [
        (module, target)
        for module, targets in import_graph().items()
        for target in targets
        if module.startswith(target + ".")
    ]
    assert upward == []


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
LONG_REASON = "# Long:"  # a function over the limit says why in a comment that starts so


def long_functions_without_a_reason(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in root.rglob("*.py"):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            body = lines[node.lineno - 1 : node.end_lineno]
            if length > MAX_FUNCTION_LINES and not any(LONG_REASON in line for line in body):
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length})")
    return found


def test_long_functions_say_why():
    assert long_functions_without_a_reason() == []


def test_no_module_over_the_limit():
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_the_length_check_sees_a_long_function(tmp_path):
    # The check must be able to fail: a long function is found until it says why.
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    module = tmp_path / "m.py"
    module.write_text(f"def f():\n{body}\n\n\ndef g():\n    return 1\n")
    assert long_functions_without_a_reason(tmp_path) == ["m.py:1 f (81)"]
    module.write_text(f"def f():\n    {LONG_REASON} a table of constants\n{body}\n")
    assert long_functions_without_a_reason(tmp_path) == []
