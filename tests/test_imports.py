"""The import graph of edgeft: no cycle, and the device side imports nothing from the build side.

Every import statement counts, wherever it stands (module level, inside a function, inside a
try), because a lazy import only hides a cycle until the day its function runs first; only
imports under `if TYPE_CHECKING:` are left out, since they never run. The graph is read from
the source with `ast`, so nothing is imported to build it.

The device side is edgeft/runtime/: it may import edgeft.runtime.*, the modules it shares with
the build side (SHARED: the error tree and the plugin contract, which may import no further
themselves), and the package's own `edgeft/__init__.py`, which Python runs anyway before any edgeft.runtime module (so importing
`edgeft.__version__` from it costs nothing more), provided that `__init__` stays torch-free:
the last test holds it to importing no torch, transformers, peft or accelerate, directly or
through the edgeft modules it imports at module level.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = [REPO / "edgeft", *sorted(p for p in (REPO / "plugins").glob("edgeft_*") if p.is_dir())]
HEAVY = {"torch", "transformers", "peft", "accelerate", "safetensors.torch", "torchvision"}


def _module_name(path: Path, root: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    mods = {}
    for root in ROOTS:
        for path in sorted(root.rglob("*.py")):
            mods[_module_name(path, root)] = path
    return mods


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, module_level_only: bool = False):
    """(node, names imported) for every import that can run, as absolute dotted names, unresolved."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo += node.orelse
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        todo += [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.AST)]


def _targets(node, module: str, is_package: bool, modules=MODULES) -> list[str]:
    """The modules an import statement loads (the one it names, not the parents Python runs first)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        pkg = ".".join(base + ([node.module] if node.module else []))
    else:
        pkg = node.module or ""
    # `from pkg import name` loads pkg.name when that is a module, else pkg itself
    return [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in modules else pkg for a in node.names]


def import_graph(module_level_only: bool = False) -> dict[str, dict[str, int]]:
    """{module: {imported module: first line}} for every module under edgeft/ and plugins/."""
    graph = {}
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        edges: dict[str, int] = {}
        for node in _imports(tree, module_level_only):
            for target in _targets(node, mod, path.name == "__init__.py"):
                edges.setdefault(target, node.lineno)
        graph[mod] = edges
    return graph


def _reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()]:
            if w in graph and w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component of the graph's own modules: a module is on a
    cycle when it reaches itself, and its component is what it reaches that reaches it back."""
    reach = {v: _reachable(graph, v) for v in graph}
    sccs = {frozenset({v, *(w for w in reach[v] if v in reach[w])}) for v in graph if v in reach[v]}
    return [_a_cycle(graph, sorted(c)) for c in sorted(sccs, key=sorted)]


def _a_cycle(graph, scc: list[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, through the component."""
    start, members = scc[0], set(scc)
    paths, seen = {start: [start]}, {start}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return paths[v] + [start]
                if w in members and w not in seen:
                    seen.add(w)
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return scc


def _show(graph, cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)) + f" -> {cycle[-1]}"


# shared by both sides: the error tree, and the plugin contract (the device asks the plugin
# registry for the engine a bundle names)
SHARED = ("edgeft.errors", "edgeft.hookspecs", "edgeft.targets", "edgeft.plugins")


def _device_side(mod: str) -> bool:
    return mod in ("edgeft", "edgeft.runtime", *SHARED) or mod.startswith("edgeft.runtime.")


def _device_side_violations(graph, modules=MODULES) -> list[str]:
    bad = []
    for mod, edges in sorted(graph.items()):
        if mod == "edgeft" or not _device_side(mod):
            continue
        for target, line in sorted(edges.items()):
            inside = _device_side(target)
            if (target == "edgeft" or target.startswith("edgeft.")) and not inside:
                where = modules.get(mod) or Path(*mod.split(".")).with_suffix(".py")
                bad.append(f"{where.relative_to(REPO) if where.is_absolute() else where}:{line}: {mod} imports {target}")
    return bad


def test_the_graph_sees_lazy_relative_and_package_imports():
    """The reader itself, on a made-up package: a function-level import, `from . import module`,
    `from .. import name`, an import inside a try, one under `if TYPE_CHECKING:` (left out), a cycle."""
    src = {
        "edgeft.pkg.a": "from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                        "if TYPE_CHECKING:\n    from .c import X\n"
                        "def f():\n    from . import b\n",
        "edgeft.pkg.b": "from .. import __version__\nimport edgeft.pkg.a\n",
        "edgeft.pkg.c": "try:\n    from edgeft.runtime import session\nexcept ImportError:\n    pass\n",
    }
    modules = {**MODULES, **dict.fromkeys(src, Path("x.py"))}
    graph = {m: {} for m in src}
    for mod, text in src.items():
        for node in _imports(ast.parse(text)):
            for target in _targets(node, mod, False, modules):
                if target.startswith("edgeft"):
                    graph[mod].setdefault(target, node.lineno)
    assert graph == {"edgeft.pkg.a": {"edgeft.pkg.b": 6}, "edgeft.pkg.b": {"edgeft": 1, "edgeft.pkg.a": 2},
                     "edgeft.pkg.c": {"edgeft.runtime.session": 2}}
    assert cycles(graph) == [["edgeft.pkg.a", "edgeft.pkg.b", "edgeft.pkg.a"]]
    assert cycles({"x": {"y": 1}, "y": {}}) == [] and cycles({"x": {"x": 1}}) == [["x", "x"]]
    assert _device_side_violations({"edgeft.runtime.z": {"edgeft": 1, "edgeft.runtime.session": 2,
                                                         "edgeft.data": 3, "numpy": 4}}, modules) == [
        "edgeft/runtime/z.py:3: edgeft.runtime.z imports edgeft.data"]


def test_no_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(_show(graph, c) for c in found)


def test_device_side_imports_nothing_from_the_build_side():
    bad = _device_side_violations(import_graph())
    assert not bad, "edgeft/runtime reaches into the build side:\n" + "\n".join(bad)


def test_package_init_is_torch_free():
    """edgeft/__init__.py runs before every edgeft.runtime module: neither it nor any edgeft module
    it imports at module level (transitively) may import torch, transformers, peft or accelerate."""
    graph = import_graph(module_level_only=True)
    seen, todo, heavy = set(), ["edgeft"], []
    while todo:
        mod = todo.pop()
        if mod in seen or mod not in graph:
            continue
        seen.add(mod)
        for target, line in graph[mod].items():
            if target in HEAVY or target.split(".")[0] in HEAVY - {"safetensors.torch"}:
                heavy.append(f"{mod} (line {line}) imports {target}")
            todo.append(target)
    assert not heavy, heavy


def test_cli_choices_are_the_registries():
    """The CLI spells its choices out or reads them from edgeft.names, which imports nothing, so that
    `edgeft --help` imports neither torch nor the quantizers; they must still be the lists the
    implementing modules accept."""
    import click

    from edgeft import names
    from edgeft.cli import main
    from edgeft.quantize import registry

    def choices(command: str, option: str) -> tuple[str, ...]:
        cmd = main.commands[command]
        return tuple(next(p for p in cmd.params if p.name == option).type.choices)

    assert choices("quantize", "mode") == registry.names(), "edgeft quantize --mode lists other modes than the registry"
    assert choices("train", "method") == names.METHODS and choices("train", "pooling") == names.POOLINGS
    assert isinstance(main.commands["train"], click.Command)
