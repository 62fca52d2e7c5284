"""The stages read one way (docs/architecture.md): no import cycle among memwatchd's modules.

Imports are read with ast, including those inside functions (a lazy import still ties two
modules together); only `if TYPE_CHECKING:` blocks are skipped, since they never run."""
from __future__ import annotations

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "memwatchd")


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def module_imports(source: str, modules: set) -> set:
    """The memwatchd modules (by short name) that this source imports, anywhere in it."""
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "memwatchd" and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] == "memwatchd":
                if len(parts) > 1:
                    found.add(parts[1])
                else:
                    found.update(a.name for a in node.names if a.name in modules)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found & modules


def import_graph(package: str = PACKAGE) -> dict:
    names = {f[:-3] for f in os.listdir(package) if f.endswith(".py") and f != "__init__.py"}
    graph = {}
    for name in sorted(names):
        with open(os.path.join(package, name + ".py")) as f:
            graph[name] = module_imports(f.read(), names) - {name}
    return graph


def find_cycle(graph: dict):
    """One import cycle as a list of modules (first == last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    path = []

    def dfs(node):
        colour[node] = GREY
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == GREY:
                return path[path.index(nxt):] + [nxt]
            if colour.get(nxt) == WHITE:
                found = dfs(nxt)
                if found:
                    return found
        path.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_lazy_and_direct_cycles():
    mods = {"a", "b", "c"}
    a = module_imports("from memwatchd import b\n", mods)
    b = module_imports("def f():\n    from memwatchd.c import x\n", mods)
    c = module_imports("import memwatchd.a as m\nif TYPE_CHECKING:\n    from memwatchd import b\n", mods)
    assert (a, b, c) == ({"b"}, {"c"}, {"a"})
    assert find_cycle({"a": a, "b": b, "c": c}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_memwatchd_has_no_import_cycle():
    graph = import_graph()
    assert "cli" in graph and "daemon" in graph["cli"]     # the reader sees the real modules
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_the_console_script():
    """entry.py dispatches to cli.py; a module importing entry would close a circle."""
    assert not [name for name, deps in import_graph().items() if "entry" in deps and name != "__main__"]
