"""docs/architecture.md stays true: every `file:name` it names exists, its import table is the code's, and the
imports point the way it says."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "grpo"
MAP = (ROOT / "docs" / "architecture.md").read_text()
FRONT_DOORS_AND_LOOP = {"__init__", "cli", "demo", "recipe", "trainer", "trainer_rounds", "trainer_eval"}


def room_of(path: Path) -> str:
    """A module's room: its top-level module, or its package (rollout, rewards, embedded)."""
    relative = path.relative_to(SRC)
    return "__init__" if relative == Path("__init__.py") else relative.parts[0].removesuffix(".py")


def imported_modules(path: Path) -> set[str]:
    """Every absolute import of a file, those inside functions included; `from grpo import x` counts as grpo.x."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "grpo":
            names |= {f"grpo.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def code_imports() -> dict[str, set[str]]:
    """room -> the other rooms it imports."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        room = room_of(path)
        imported = {name.split(".")[1] for name in imported_modules(path) if name.startswith("grpo.")}
        graph.setdefault(room, set()).update(imported - {room})
    return graph


def documented_imports() -> dict[str, set[str]]:
    table = MAP.split("## Which way imports point", 1)[1].split("\n## ", 1)[0]
    graph = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rooms = re.findall(r"`(\w+)`", cells[0])
        if len(cells) == 2 and rooms:
            imported = set() if cells[1] == "(none)" else {name.strip() for name in cells[1].split(",")}
            graph.update(dict.fromkeys(rooms, imported))
    return graph


def test_the_import_table_is_the_code_s():
    code, documented = code_imports(), documented_imports()
    assert sorted(documented) == sorted(code), "docs/architecture.md lists other rooms than src/grpo has"
    differing = {room: (documented[room], code[room]) for room in code if documented[room] != code[room]}
    assert not differing, f"update the import table of docs/architecture.md (room: (map, code)): {differing}"


@pytest.mark.parametrize("reference", sorted(set(re.findall(r"`([\w/]+\.py):([\w.]+)`", MAP))),
                         ids=lambda r: f"{r[0]}:{r[1]}")
def test_every_named_function_exists(reference):
    path, name = reference
    assert (SRC / path).is_file(), path
    target = importlib.import_module("grpo." + path.removesuffix(".py").replace("/", "."))
    for part in name.split("."):
        target = getattr(target, part)  # AttributeError: the map names something the code no longer has


def test_only_the_front_doors_import_the_trainer():
    assert {room for room, imported in code_imports().items() if "trainer" in imported} == {"__init__", "cli", "demo"}


def test_nothing_below_the_loop_takes_or_touches_the_trainer():
    for path in SRC.rglob("*.py"):
        if room_of(path) in FRONT_DOORS_AND_LOOP:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            assert not (isinstance(node, ast.arg) and node.arg == "trainer"), f"{path}: a `trainer` parameter"
            assert not (isinstance(node, ast.Name) and node.id == "trainer"), f"{path}:{node.lineno} uses `trainer`"


def test_the_math_and_the_config_stand_alone():
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    assert {name.split(".")[0] for name in imported_modules(SRC / "algorithm.py")} <= allowed
    graph = code_imports()
    assert graph["config"] <= {"trl_fields", "sampling_params"}  # two leaf tables, which import no room
    assert graph["trl_fields"] == graph["sampling_params"] == set()
    assert "logprobs" not in graph["rollout"] and "rollout" not in graph["logprobs"]  # both read models.py
