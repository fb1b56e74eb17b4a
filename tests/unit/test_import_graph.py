"""The package's import structure: no cycles, and the engine side imports no torch.

The cycle check reads source, not ``sys.modules``: every module's top-level imports (those
inside functions and under ``if TYPE_CHECKING:`` are deferred, so they cannot form a cycle at
import time) become edges of a graph over ``tachyon.*``, and the graph must be acyclic.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import tachyon
import tachyon.engine

PACKAGE_ROOT = Path(tachyon.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(tree: ast.Module,
                       type_checking: bool = False) -> list[ast.Import | ast.ImportFrom]:
    """Imports executed when the module is imported: module body, and the bodies of top-level
    ``if`` / ``try`` blocks (``if TYPE_CHECKING`` too only with ``type_checking``); never
    function or class bodies."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if type_checking or not _is_type_checking(node.test):
                stack.extend(node.body)
            stack.extend(node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                stack.extend(handler.body)
    return found


def _resolve(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool,
             known: set[str]) -> set[str]:
    """The ``tachyon`` modules an import statement loads (the innermost known module per name)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_pkg else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
    targets = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            targets.add(name)
    return targets


def import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    files = sorted(PACKAGE_ROOT.rglob("*.py"))
    known = {_module_name(f) for f in files}
    graph: dict[str, set[str]] = {}
    for f in files:
        mod = _module_name(f)
        tree = ast.parse(f.read_text(), filename=str(f))
        edges: set[str] = set()
        for node in _top_level_imports(tree, type_checking):
            edges |= _resolve(node, mod, f.name == "__init__.py", known)
        # Importing a submodule runs its parent packages' __init__ first: that is not an edge
        # we can break, so only the module itself counts.
        graph[mod] = {t for t in edges if t != mod and not mod.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (iterative three-colour DFS)."""
    colour = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the stack, 2 done
    for root in sorted(graph):
        if colour[root]:
            continue
        path = [root]
        iters = [iter(sorted(graph[root]))]
        colour[root] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                colour[path.pop()] = 2
                iters.pop()
            elif colour.get(nxt, 2) == 1:
                return [*path[path.index(nxt):], nxt]
            elif colour.get(nxt) == 0:
                colour[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph[nxt])))
    return None


def test_find_cycle_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "tachyon.engine.scheduler" in graph  # the walk saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Arrows point down (DESIGN.md): what each layer may not import, type annotations included.
# The step's data types live in tachyon.step, below everyone who exchanges them.
_ABOVE_EXECUTOR = ("tachyon.engine", "tachyon.entrypoints", "tachyon.bench")
_ABOVE_WORKER = (*_ABOVE_EXECUTOR, "tachyon.executor")
_ABOVE_GRAPHS = (*_ABOVE_WORKER, "tachyon.worker")
NOT_IMPORTED_BY = {
    "tachyon.executor": _ABOVE_EXECUTOR,
    "tachyon.worker": _ABOVE_WORKER,
    "tachyon.cudagraph": _ABOVE_GRAPHS,
    "tachyon.attention": _ABOVE_GRAPHS,
    "tachyon.models": (*_ABOVE_GRAPHS, "tachyon.cudagraph"),  # never knows the graph mode
    "tachyon.layers": (*_ABOVE_GRAPHS, "tachyon.cudagraph", "tachyon.models"),
}


def test_arrows_point_down() -> None:
    graph = import_graph(type_checking=True)
    upward = sorted(
        f"{mod} -> {target}"
        for mod, targets in graph.items() for target in targets
        for layer, above in NOT_IMPORTED_BY.items()
        if (mod == layer or mod.startswith(layer + "."))
        and any(target == a or target.startswith(a + ".") for a in above))
    assert not upward, "imports that point up:\n" + "\n".join(upward)


# The engine side: scheduling, KV bookkeeping, requests, the core loop (it creates its
# executor lazily) and the client, the step's data and the graph-mode contract. A device
# is touched only below the executor.
TORCH_FREE = sorted(
    ["tachyon.step", "tachyon.config", "tachyon.cudagraph.modes", "tachyon.cudagraph.dispatcher",
     "tachyon.sampling_params", "tachyon.outputs"]
    + [f"tachyon.engine.{m.name}" for m in pkgutil.iter_modules(tachyon.engine.__path__)])


def test_engine_side_imports_no_torch() -> None:
    """Checked in a fresh interpreter (this one has torch loaded); names the first module that
    pulls it in."""
    assert "tachyon.engine.scheduler" in TORCH_FREE and "tachyon.engine.core" in TORCH_FREE
    code = ("import importlib, sys\n"
            f"for m in {TORCH_FREE!r}:\n"
            "    importlib.import_module(m)\n"
            "    if 'torch' in sys.modules:\n"
            "        sys.exit(f'importing {m} imported torch')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
