"""The package layout stays as README's "Development" section describes it: dependencies point one
way, and a name means one thing (no two modules define a class, function or type alias of the
same name, and no two modules share a basename)."""

from __future__ import annotations

import ast
import gc
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from tests import REPO

PACKAGE = REPO / "sdp_cli"

# Imported by anything (events are written to by every part and read none of them).
ANYONE = {"errors", "common", "events"}
# For each part: the other parts it may import.
MAY_IMPORT: dict[str, set[str]] = {
    "errors": set(),
    "common": set(),
    "events": {"errors", "common"},
    # Views of the events: only the commands show them.
    "views": ANYONE,
    "config": ANYONE,
    "inference": ANYONE | {"config"},
    "tasks": ANYONE | {"config"},
    "model": ANYONE | {"config"},
    "rollout": ANYONE | {"config", "inference", "tasks"},
    # Multi-turn episodes build on the rollout's trajectories and workflow.
    "episodes": ANYONE | {"config", "inference", "tasks", "rollout"},
    # The OpenAI-compatible gateway drives episodes for agent programs.
    "gateway": ANYONE | {"config", "inference", "tasks", "rollout", "episodes"},
    "weight_sync": ANYONE | {"config", "inference", "rollout"},
    "launcher": ANYONE | {"config", "inference", "model", "weight_sync"},
    "orchestrator": ANYONE | {"config", "inference", "tasks", "rollout", "episodes", "weight_sync"},
    # The torch trainer implements what the orchestration asks of it (orchestrator.loop.Trainer,
    # orchestrator.run_state); nothing but commands/ imports it.
    "trainer": ANYONE | {"config", "rollout", "orchestrator", "weight_sync"},
    "simulate": ANYONE | {"config", "inference", "rollout", "orchestrator", "weight_sync"},
    "commands": ANYONE
    | {
        "config",
        "inference",
        "tasks",
        "model",
        "rollout",
        "episodes",
        "gateway",
        "launcher",
        "weight_sync",
        "orchestrator",
        "trainer",
        "simulate",
        "views",
    },
    "cli": {"commands", "config", "errors", "common"},
    "__main__": {"cli"},
    "__init__": set(),
}


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def part_of(path: Path) -> str:
    """The top-level folder (or module) of sdp_cli a file belongs to."""
    first = path.relative_to(PACKAGE).parts[0]
    return first.removesuffix(".py")


def parsed(path: Path) -> ast.Module:
    """The module's syntax tree, built with the garbage collector off: in Python 3.11.7 a
    collection during `ast.parse` can run a finalizer that formats a traceback, which parses
    again and leaves the outer parse with "AST constructor recursion depth mismatch" (CPython
    gh-106905; seen in CI after an earlier test left a failed asyncio task behind)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(path.read_text())
    finally:
        if enabled:
            gc.enable()


def imported_parts(path: Path) -> set[str]:
    parts = set()
    for node in ast.walk(parsed(path)):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.startswith("sdp_cli."):
                parts.add(name.split(".")[1])
    return parts


def test_every_part_has_a_dependency_rule() -> None:
    assert {part_of(p) for p in modules()} - {"conf"} <= set(MAY_IMPORT)


def test_dependencies_point_one_way() -> None:
    wrong = [
        f"{path.relative_to(PACKAGE.parent)} imports sdp_cli.{target}"
        for path in modules()
        for target in sorted(imported_parts(path))
        if target != part_of(path) and target not in MAY_IMPORT[part_of(path)]
    ]
    assert wrong == [], (
        "cli -> commands -> launcher/trainer/simulate -> orchestrator -> weight_sync -> rollout "
        "-> inference/tasks/model -> config; errors, common and events import none of them; "
        "views only events (see MAY_IMPORT)"
    )


def test_only_the_commands_import_views() -> None:
    wrong = [
        str(path.relative_to(PACKAGE.parent))
        for path in modules()
        if "views" in imported_parts(path) and part_of(path) not in {"views", "commands", "cli"}
    ]
    assert wrong == [], "a view (dashboard, report, plot, audit) is shown by a command"


def test_module_names_are_unique() -> None:
    """One basename, one module: `staleness.py` means one thing wherever it is named."""
    where: dict[str, list[str]] = defaultdict(list)
    for path in modules():
        if path.name not in {"__init__.py", "__main__.py"}:
            where[path.name].append(str(path.relative_to(PACKAGE.parent)))
    repeated = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert repeated == {}, "name the module after what it holds in its package"


def top_level_names(path: Path) -> list[str]:
    """Classes, functions and type aliases (`Name = ...` with a capitalised, not all-caps
    name) defined at the top of a module."""
    names = []
    for node in parsed(path).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [
                t.id
                for t in targets
                if isinstance(t, ast.Name) and t.id[:1].isupper() and not t.id.isupper()
            ]
    return names


def test_no_two_modules_define_the_same_name() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for path in modules():
        for name in top_level_names(path):
            where[name].append(str(path.relative_to(PACKAGE.parent)))
    repeated = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert repeated == {}, "give each its own name, or define it once and import it"


# Parts that run without torch: `sdp simulate` and the orchestration must not pull the trainer
# in, not even through another module, when they are imported.
TORCH_FREE = {"orchestrator", "simulate"}
TORCH_MODULES = {"torch", "safetensors.torch"}


def module_file(name: str) -> Path | None:
    """The file of an sdp_cli module name, or None for a name that is not a module."""
    relative = Path(*name.split(".")[1:])
    for candidate in (PACKAGE / relative.with_suffix(".py"), PACKAGE / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_time_imports(path: Path) -> set[str]:
    """Modules a module imports when it is imported: its top-level import statements (not
    those under `if TYPE_CHECKING:` or in a function), with the packages above each."""
    names: set[str] = set()
    for node in parsed(path).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    with_parents = set()
    for name in names:
        parts = name.split(".")
        with_parents |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return with_parents


def imported_when_loaded(path: Path) -> set[str]:
    """Every module importing `path` loads, sdp_cli's own followed transitively."""
    seen: set[str] = set()
    todo = [path]
    done: set[Path] = set()
    while todo:
        current = todo.pop()
        if current in done:
            continue
        done.add(current)
        for name in import_time_imports(current):
            seen.add(name)
            target = module_file(name) if name.startswith("sdp_cli.") else None
            if target is not None:
                todo.append(target)
    return seen


def test_the_orchestration_and_the_simulator_import_no_torch() -> None:
    wrong = {
        str(path.relative_to(PACKAGE.parent)): sorted(
            name
            for name in imported_when_loaded(path)
            if name in TORCH_MODULES or name.startswith("sdp_cli.trainer")
        )
        for path in modules()
        if part_of(path) in TORCH_FREE
    }
    assert {path: names for path, names in wrong.items() if names} == {}, (
        "the torch trainer is reached only through orchestrator.loop.Trainer, which commands/ "
        "wires to it"
    )


def test_importing_the_orchestration_and_the_simulator_loads_no_torch() -> None:
    """The same at run time, through third-party packages too (transformers' auto classes
    import torch)."""
    names = [
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for path in modules()
        if part_of(path) in TORCH_FREE
    ]
    script = (
        f"import importlib, sys\nfor name in {names!r}:\n    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('sdp_cli.trainer')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
