"""The package layout holds: no import cycles among lopt's modules (function-level imports included),
every import goes down the package order, and the 0.1 import paths still reach the moved modules."""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lopt"


def _module_name(path: Path) -> str:
    parts = ["lopt", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the lopt modules it imports anywhere in its body. ``from lopt.a import b`` points at
    ``lopt.a.b`` when that is a module, else at ``lopt.a``; relative imports are resolved. Importing
    ``lopt.a.b`` from outside ``lopt.a`` also runs ``lopt/a/__init__.py``: an edge to ``lopt.a`` too."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                if t in mods and t != name:
                    graph[name].add(t)
                    # Importing lopt.a.b first runs lopt/a/__init__.py, unless we are inside lopt.a.
                    parts = t.split(".")
                    for i in range(2, len(parts)):
                        parent = ".".join(parts[:i])
                        if parent in mods and not name.startswith(parent + ".") and parent != name:
                            graph[name].add(parent)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


# The package order: a module may import from its own package, from a lower level, or from the
# foundation (modules that import nothing of lopt's but each other). Same-level packages are
# independent of each other.
FOUNDATION = {"_compat", "version", "jsonout", "data", "models", "prompts"}
LEVELS = {
    "engine": 1,     # the gradient boundary
    "methods": 2,    # what trains, from which signal (and wrap, LoPTConfig)
    "config": 3,     # every recipe's options
    "runtime": 4,    # the step loop, checkpoints, run state
    "eval": 5, "parallel": 5,
    "rewards": 6, "plan": 6,
    "bench": 7,      # may use the planner; not the recipes
    "integrations": 7,  # lopt inside other libraries' trainers (TRL); the recipes grpo/dpo use it
    "recipes": 8,
    "cli": 9,
    "__main__": 10, "lopt": 10,  # lopt/__init__.py: the public API, imported by nobody inside lopt
}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lopt"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every edge ``a -> b`` that breaks the package order, as 'a -> b'."""
    bad = []
    for a, targets in graph.items():
        pa = package_of(a)
        for b in targets:
            pb = package_of(b)
            if pa == pb or pb in FOUNDATION:
                continue
            if pa in FOUNDATION or LEVELS[pb] >= LEVELS[pa]:
                bad.append(f"{a} -> {b}")
    return sorted(bad)


def test_every_package_has_a_level():
    packages = {package_of(m) for m in import_graph()}
    assert packages <= FOUNDATION | set(LEVELS), sorted(packages - FOUNDATION - set(LEVELS))


def test_imports_go_down_the_package_order():
    assert upward_imports(import_graph()) == []


@pytest.mark.parametrize("edge", [("lopt.engine.boundary", "lopt.methods"),  # the engine picking its method
                                  ("lopt.bench.runner", "lopt.recipes.sft"),  # bench reading a recipe's config
                                  ("lopt.parallel.pipeline", "lopt.recipes"),  # the pipeline's own loop
                                  ("lopt.runtime.checkpoints", "lopt"),  # the version from the API package
                                  ("lopt.data", "lopt.engine.config")])  # the foundation leaning on the engine
def test_order_check_sees_an_upward_import(edge):
    graph = import_graph()
    graph[edge[0]] = graph[edge[0]] | {edge[1]}
    assert f"{edge[0]} -> {edge[1]}" in upward_imports(graph)


def private_imports() -> list[str]:
    """``from lopt.x import _name`` in a module other than lopt.x (and its package ``__init__``)."""
    found = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lopt") and not node.level:
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private and node.module != name and not name.startswith(node.module + "."):
                        found.append(f"{name}: from {node.module} import {alias.name}")
    return sorted(found)


def test_names_used_across_modules_are_public():
    assert private_imports() == []


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_function_level_imports():
    graph = import_graph()
    assert "lopt.engine.boundary" in graph["lopt"]
    assert len(graph) > 30 and sum(len(v) for v in graph.values()) > 60


@pytest.mark.parametrize("old, new", [
    ("lopt.boundary", "lopt.engine.boundary"), ("lopt.train", "lopt.recipes.sft"),
    ("lopt.evaluate", "lopt.eval"), ("lopt.distributed", "lopt.parallel"),
    ("lopt.rl", "lopt.recipes.trl_bridge"), ("lopt.memory", "lopt.engine.memory"),
])
def test_old_import_paths_still_work(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
