"""The package's shape: no import cycle, counting imports inside functions too (a cycle
hidden by a function-local import is still one module needing another that needs it)."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for package in ("cvae", "jobs"):
        for path in (REPO / package).glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            deps = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    if node.module in ("cvae", "jobs"):  # from cvae import fs: the submodule
                        deps |= {f"{node.module}.{a.name}" for a in node.names}
                    elif node.module.split(".")[0] in ("cvae", "jobs"):
                        deps.add(node.module)
                elif isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names if a.name.split(".")[0] in ("cvae", "jobs")}
            graph[name] = deps - {name}
    return {m: {d for d in deps if d in graph} for m, deps in graph.items()}


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
    assert "cvae.scm" in graph and "cvae.rng" in graph["cvae.scm"]  # the walker sees the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_is_much_longer_than_a_screen():
    """Each function does one thing: none over 70 lines in the package and the jobs."""
    long = []
    for package in ("cvae", "jobs"):
        for path in (REPO / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > 70:
                        long.append(f"{package}/{path.name}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "functions to split: " + ", ".join(long)
