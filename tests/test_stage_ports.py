"""A stage worker's parts (fault tolerance, running ahead) see the worker through a port, never the
worker itself; with fault tolerance off the worker holds an object of the same interface instead."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
from stage_harness import port_members

STAGE = Path(__file__).resolve().parent.parent / "dejavu_py" / "stage"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, wherever the import stands (``if TYPE_CHECKING`` and functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("part", ["stage_ft.py", "ahead.py", "ft_off.py", "port.py", "dispatch.py"])
def test_a_worker_s_part_does_not_import_the_worker(part):
    """Neither the process's entry (worker.py) nor its loop (loop.py)."""
    assert not {"dejavu_py.stage.worker", "dejavu_py.stage.loop"} & imported_modules(STAGE / part)


def test_the_import_check_sees_an_import_under_type_checking(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dejavu_py.stage import worker\n")
    assert "dejavu_py.stage.worker" in imported_modules(f)


def test_ft_off_has_every_public_method_of_stage_ft_with_its_parameters():
    from dejavu_py.stage.ft_off import FTOff
    from dejavu_py.stage.stage_ft import StageFT

    methods = {n: f for n, f in inspect.getmembers(StageFT, inspect.isfunction) if not n.startswith("_")}
    assert {"after_step", "bookkeep_next", "attach_routing", "register", "stats"} <= set(methods)
    for name, fn in methods.items():
        assert hasattr(FTOff, name), f"FTOff lacks {name}"
        assert list(inspect.signature(getattr(FTOff, name)).parameters) == list(inspect.signature(fn).parameters), name
    assert FTOff.awaiting_bookkeeping == ()


def used_on(path: Path, owner: str) -> set[str]:
    """The attributes a file reads off ``self.<owner>``."""
    return {node.attr for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == owner and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


def test_a_part_uses_nothing_of_the_worker_its_port_does_not_name():
    from dejavu_py.stage.ahead import AheadPort
    from dejavu_py.stage.stage_ft import FTPort

    for part, port in (("stage_ft.py", FTPort), ("ahead.py", AheadPort)):
        used = used_on(STAGE / part, "port")
        assert used and used <= port_members(port), f"{part} uses {sorted(used - port_members(port))} off its port"
    assert "step" in port_members(AheadPort) and "me" in port_members(AheadPort)
