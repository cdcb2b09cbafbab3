"""The package's shape: packages import only downward, and files and functions stay small.

Imports inside functions count too: a cycle hidden by a function-local import is still one
package needing another that needs it. A package here is a subpackage of cvae (cvae.data,
cvae.model, ...) or a top-level module (cvae.config, cvae.fs, ...); cvae's own __init__ is
the package `cvae`, which only the notebook API's lazy import leaves."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 450  # a file holds one concept
MAX_FUNCTION_LINES = 60  # a function does one thing


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, modules: set[str]) -> set[str]:
    """The package's modules a parsed file imports, at module level and inside functions alike."""
    deps = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from cvae.data import grid` imports the submodule, `from cvae.data.grid import X`
            # the module, `from cvae import CausalModel` the package's __init__
            submodules = {f"{node.module}.{a.name}" for a in node.names} & modules
            deps |= submodules or {node.module}
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
    return {d for d in deps if d in modules}


def import_graph(packages=("cvae", "jobs")) -> dict[str, set[str]]:
    """module -> the package's modules it imports (subpackages included, `__init__` as the package)."""
    paths = {module_name(p): p for package in packages for p in (REPO / package).rglob("*.py")}
    modules = set(paths)
    return {name: imported_modules(ast.parse(path.read_text()), modules) - {name} for name, path in paths.items()}


def package_of(module: str) -> str:
    """cvae.data.grid -> cvae.data; cvae.config -> cvae.config; cvae -> cvae."""
    return ".".join(module.split(".")[:2])


def package_graph() -> dict[str, set[str]]:
    """cvae's packages -> the packages they import (from any of their modules)."""
    graph: dict[str, set[str]] = {}
    for module, deps in import_graph(("cvae",)).items():
        graph.setdefault(package_of(module), set()).update(package_of(d) for d in deps)
    return {p: deps - {p} for p, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of nodes (first == last), or None: depth-first, three colours."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_walker_finds_a_cycle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_walker_sees_function_local_imports(tmp_path):
    tree = ast.parse("import os\n\ndef f():\n    from cvae.data.grid import FACTORS\n")
    assert imported_modules(tree, {"cvae.data.grid", "cvae.data"}) == {"cvae.data.grid"}


def test_no_import_cycle_between_modules():
    graph = import_graph()
    # the walker sees the subpackages and both import forms
    assert "cvae.rng" in graph["cvae.causal.image"] and "cvae.data.grid" in graph["cvae.model.factors"]
    assert "cvae.serve.api" in graph["cvae"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_packages_import_only_downward():
    """No cycle between cvae's packages, function-local imports included (docs/contracts.md
    draws the order: data, config, model, causal, serve, evaluate, then the pipeline)."""
    graph = package_graph()
    assert {"cvae.data", "cvae.model", "cvae.causal", "cvae.serve", "cvae.evaluate", "cvae.config"} <= set(graph)
    assert "cvae.data" in graph["cvae.model"] and "cvae.model" in graph["cvae.causal"]
    cycle = find_cycle(graph)
    assert cycle is None, "packages in a cycle: " + " -> ".join(cycle)


def test_no_file_holds_more_than_one_concept():
    big = [f"{path.relative_to(REPO)} ({n} lines)" for path in sorted((REPO / "cvae").rglob("*.py"))
           if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES]
    assert not big, f"files over {MAX_FILE_LINES} lines, to split: " + ", ".join(big)


def test_no_function_is_longer_than_a_screen():
    long = []
    for package in ("cvae", "jobs"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines, to split: " + ", ".join(long)
