"""The package's shape: no import cycle, counting imports inside functions too (a cycle
hidden by a function-local import is still one module needing another that needs it)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (subpackages included, `__init__` as the package)."""
    modules, imports = set(), {}
    for package in ("cvae", "jobs"):
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules.add(name)
            imports[name] = [node for node in ast.walk(ast.parse(path.read_text()))
                             if isinstance(node, (ast.Import, ast.ImportFrom))]
    graph = {}
    for name, nodes in imports.items():
        deps = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from cvae.data import grid` imports the submodule, `from cvae.data.grid import X`
                # the module, `from cvae import CausalModel` the package's __init__
                submodules = {f"{node.module}.{a.name}" for a in node.names} & modules
                deps |= submodules or {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in modules} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None: depth-first, three colours."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
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


def test_no_import_cycle():
    graph = import_graph()
    # the walker sees the subpackages and both import forms
    assert "cvae.rng" in graph["cvae.causal.image"] and "cvae.data.grid" in graph["cvae.causal.factors"]
    assert "cvae.serve.api" in graph["cvae"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_is_much_longer_than_a_screen():
    """Each function does one thing: none over 70 lines in the package and the jobs."""
    long = []
    for package in ("cvae", "jobs"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > 70:
                        long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "functions to split: " + ", ".join(long)
