"""Dependencies inside deltakit point one way: leaf helpers -> hooks and the method contract -> core -> methods ->
features (checkpoints, serving, integrations) -> command line and demo.

The imports are read from the source, function-level ones included, so a cycle hidden behind a late import cannot
come back; only imports under ``if TYPE_CHECKING:`` (annotations, no runtime dependency) are left out. A new module
must be given its layer here: that is where a newcomer learns what it may use.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.helpers import REPO_ROOT

PACKAGE = REPO_ROOT / "deltakit"

#: Layer of each module (a package prefix covers its submodules unless a longer one is listed). A module may import
#: modules of its own layer or lower ones; within a layer the import graph must still be acyclic.
LAYERS: dict[str, int] = {
    # 0: leaves: no deltakit imports, or only other leaves
    "deltakit._version": 0,
    "deltakit.errors": 0,
    "deltakit.io": 0,
    # 1: the method contract and the mechanics every method uses
    "deltakit.config": 1,
    "deltakit.registry": 1,
    "deltakit.site": 1,
    "deltakit.heads": 1,  # task-head copies a delta carries (modules_to_save): DeltaSite containers, no lifecycle
    "deltakit.hooks": 1,
    "deltakit.routing": 1,
    "deltakit.structures": 1,
    "deltakit.addressing": 1,
    "deltakit.hf_compat": 1,
    "deltakit.integrations.checkpointing": 1,
    "deltakit.quantization": 1,  # recognising and reading quantized weights (torchao, bitsandbytes, quanto)
    # 2: the core: the delta lifecycle, and the checkpoint files and structure view its facades hand over to
    "deltakit.base": 2,
    "deltakit.checkpoint": 2,
    "deltakit.visualization": 2,
    # the picker's tree, patterns, preview and server: the constructor flag interactive_modify calls it
    "deltakit.web.tree": 2,
    "deltakit.web.patterns": 2,
    "deltakit.web.preview": 2,
    "deltakit.web.server": 2,
    "deltakit.web.picker": 2,
    # 3: the methods
    "deltakit.deltas": 3,
    # 4: features built on deltas
    "deltakit.serving": 4,
    "deltakit.serving_gate": 4,  # a group's forward gate and writer exclusivity (used by deltakit.serving)
    "deltakit.store": 4,
    "deltakit.auto": 4,
    "deltakit.integrations": 4,
    "deltakit.web": 4,  # the package face and the report (loads checkpoints through deltakit.auto)
    "deltakit.optim": 4,
    "deltakit.combine": 4,
    "deltakit.composite": 4,  # several deltas as one: lifecycle, manifest + member checkpoints
    "deltakit.search": 4,  # structure search: gated candidates, knapsack, builds a composite
    # 5: the command line, the demo and the package's public face
    "deltakit.cli": 5,
    "deltakit.demo": 5,
    "deltakit": 6,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports() -> dict[str, set[str]]:
    """``{module: deltakit modules it imports}`` (any import statement anywhere in the file)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                # "from . import x" imports the submodule x when there is one
                targets = [f"{origin}.{a.name}" if _exists(f"{origin}.{a.name}") else origin for a in node.names]
            graph[module].update(t for t in targets if t == "deltakit" or t.startswith("deltakit."))
        graph.setdefault(module, set())
    return graph


def _layer(module: str) -> int | None:
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return best[1] if best else None


def test_every_module_has_a_layer() -> None:
    assert [m for m in _imports() if _layer(m) is None] == []


def test_imports_point_down() -> None:
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _imports().items()
        for target in sorted(targets)
        if target != module and _layer(target) is not None and _layer(target) > _layer(module)  # type: ignore[operator]
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    graph = _imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            # a package's __init__ importing its own submodules is how packages re-export; not a cycle
            if target == module or target.startswith(module + ".") or target not in graph:
                continue
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_package_is_marked_as_typed() -> None:
    assert (PACKAGE / "py.typed").is_file()  # PEP 561; shipped through [tool.setuptools.package-data]
