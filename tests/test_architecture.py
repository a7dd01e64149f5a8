"""The floors of docs/architecture.md: every import arrow points down, and one place calls backward()."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peftbench"
FLOORS = {  # top-level module or sub-package -> floor (higher may import lower)
    "errors": 0, "config": 0, "records": 0, "measure": 0, "registry": 0, "metrics": 0, "noise": 0, "client": 0,
    "model_index": 0, "heartbeat": 0,
    "methods": 1, "tasks": 1, "models": 1, "data": 1, "checkpoint": 1, "leaderboard": 1, "distributed": 1, "claims": 1,
    "tricks": 1,
    "loop": 2, "evaluate_modules": 2, "inference": 2, "mixed": 2,
    "train": 3, "pretrain": 3, "ensemble": 3,
    "export": 4, "plan": 4,
    "serve": 4,
    "sweep": 4,
    "search": 5,
    "cli": 6, "__init__": 6, "__main__": 7,
}


def unit(path: Path) -> str:
    """The floor unit a file belongs to: its sub-package, or its module name."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_units(path: Path) -> set[str]:
    """peftbench units imported anywhere in the file (function-local imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("peftbench"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from peftbench import x
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("peftbench."))
    return found


FILES = sorted(PACKAGE.rglob("*.py"))


def test_every_unit_has_a_floor():
    assert {unit(f) for f in FILES} <= set(FLOORS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    """A unit imports only from floors below its own; the ground floor also from itself, nothing above."""
    own = unit(path)
    for target in imported_units(path) - {own}:
        assert FLOORS[target] < FLOORS[own] or FLOORS[target] == FLOORS[own] == 0, \
            f"{path.name} ({own}, floor {FLOORS[own]}) imports {target} (floor {FLOORS[target]})"


@pytest.mark.parametrize("path", sorted((PACKAGE / "leaderboard").glob("*.py")), ids=lambda p: p.name)
def test_leaderboard_reads_records_only(path):
    # ground-floor helpers with no state: a metric (the CLUE average), a format (model-index)
    assert imported_units(path) <= {"records", "errors", "leaderboard", "metrics", "model_index"}


def test_one_place_calls_backward():
    callers = [f.relative_to(PACKAGE).as_posix() for f in FILES if ".backward(" in f.read_text(encoding="utf-8")]
    assert callers == ["loop.py"]


def test_a_name_registered_twice_is_refused():
    from peftbench.registry import Registry

    registry = Registry("method", "peftbench.methods")
    registry.register("x", object())
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("x", object())
