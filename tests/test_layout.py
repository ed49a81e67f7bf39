"""The package's layout: the import graph has no cycle, no module imports a higher stage, and no private name
crosses modules (docs/development.md names the stages)."""

from __future__ import annotations

import ast
from pathlib import Path

import transferctl

PACKAGE = Path(transferctl.__file__).parent
# Lower stages never import higher ones: the foundation, the experiment file, what a run leaves on disk, images
# and networks, training, then what uses a run or chooses among strategies, then the command line.
STAGES = {"errors": 0, "paths": 0, "config": 1, "runs": 2, "data": 3, "models": 3, "testing": 3, "training": 4,
          "inference": 5, "analysis": 5, "cli": 6, "__main__": 7}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(path: Path) -> list[tuple[str, str]]:
    """(module imported, name imported) for every transferctl import in the file, also inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transferctl"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append((submodule, "") if submodule in MODULES else (node.module, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.startswith("transferctl")]
    return found


GRAPH = {name: {imported for imported, _ in imports(path) if imported in MODULES and imported not in (name, "transferctl")} for name, path in MODULES.items()}


def stage(module: str) -> int:
    parts = module.split(".")
    return STAGES[parts[1]] if len(parts) > 1 else 0


def test_every_module_belongs_to_a_stage() -> None:
    assert {name.split(".")[1] for name in MODULES if "." in name} <= set(STAGES)


def test_the_import_graph_has_no_cycle() -> None:
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path[path.index(module) :], module))
        if module not in done:
            for imported in sorted(GRAPH[module]):
                visit(imported, (*path, module))
            done.add(module)

    for module in sorted(GRAPH):
        visit(module, ())


def test_no_module_imports_a_higher_stage() -> None:
    upward = [f"{module} -> {imported}" for module, targets in GRAPH.items() for imported in targets if stage(imported) > stage(module)]
    assert upward == []


def test_no_private_name_is_imported_from_another_module() -> None:
    private = [f"{module_name(path)}: {name} from {source}" for path in MODULES.values() for source, name in imports(path)
               if name.startswith("_") and not name.startswith("__")]  # fmt: skip
    assert private == []
