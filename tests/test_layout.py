"""The package layout stays as README's "Development" section describes it: dependencies point one
way, and a name means one thing (no two modules define a class, function or type alias of the
same name)."""

from __future__ import annotations

import ast
import gc
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sdp_cli"

# Imported by anything (telemetry is written to by every part and reads none of them).
ANYONE = {"errors", "common", "telemetry"}
# For each part: the other parts it may import.
MAY_IMPORT: dict[str, set[str]] = {
    "errors": set(),
    "common": set(),
    "telemetry": {"errors", "common"},
    "config": ANYONE,
    "inference": ANYONE | {"config"},
    "tasks": ANYONE | {"config"},
    "model": ANYONE | {"config"},
    "rollout": ANYONE | {"config", "inference", "tasks"},
    "launcher": ANYONE | {"config", "inference", "model"},
    "train": ANYONE | {"config", "inference", "tasks", "model", "rollout"},
    "simulate": ANYONE | {"config", "inference", "rollout", "train"},
    "commands": ANYONE
    | {"config", "inference", "tasks", "model", "rollout", "launcher", "train", "simulate"},
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
        "cli -> commands -> launcher/train/simulate -> rollout -> inference/tasks/model -> "
        "config; errors, common and telemetry import none of them (see MAY_IMPORT)"
    )


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
