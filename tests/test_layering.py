"""The layering contracts of setup.cfg hold, and they do catch a forbidden import."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint(root: Path) -> subprocess.CompletedProcess:
    # lint-imports finds the package on sys.path: the copy under test, not the installed one
    env = {"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)}
    tool = Path(sys.executable).parent / "lint-imports"  # import-linter's command, from the test extra
    return subprocess.run([str(tool), "--no-cache", str(root / "setup.cfg")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_contracts_kept():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_a_forbidden_import_breaks_a_contract(tmp_path):
    shutil.copytree(ROOT / "dejavu_py", tmp_path / "dejavu_py", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    victim = tmp_path / "dejavu_py" / "coordinator" / "colocated.py"
    victim.write_text(victim.read_text() + "\nfrom dejavu_py.stage import runner  # noqa: E402,F401\n")
    out = _lint(tmp_path)
    assert out.returncode != 0
    assert "dejavu_py.coordinator is not allowed to import dejavu_py.stage" in out.stdout
