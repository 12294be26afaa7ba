"""Import layers: `lint-imports` checks the contracts in pyproject.toml ([tool.importlinter]).

flows -> tasks -> maskmill, never upwards (except the one orchestration module,
maskmill.run.orchestrate, which chooses the Prefect flow or the direct runner); the library never
imports prefect; no import cycles between sibling modules or packages. The second test breaks a
copy of the sources on purpose, so a contract that could never fail would show.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("maskmill", "flows", "tasks")


def lint_imports(root: Path, *contracts: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))
    lint = Path(sys.executable).with_name("lint-imports")
    cmd = [str(lint)] if lint.exists() else [sys.executable, "-m", "importlinter.cli"]
    only = [arg for c in contracts for arg in ("--contract", c)]
    return subprocess.run([*cmd, "--no-cache", "--no-logo", *only, str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    out = lint_imports(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 kept, 0 broken" in out.stdout, out.stdout


def _copy_sources(dest: Path) -> Path:
    """The three packages' .py files and pyproject.toml (no model weights), to break on purpose."""
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dest / pkg, ignore=lambda d, names: [
            n for n in names if not n.endswith(".py") and not (Path(d) / n).is_dir() or n == "__pycache__"])
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


@pytest.mark.parametrize("module, line, contract, culprit", [
    ("maskmill/plan.py", "import flows.generate_dataset", "layers", "maskmill.plan -> flows.generate_dataset"),
    ("maskmill/run/summary.py", "from tasks.report import summarize_run", "layers", "maskmill.run.summary -> tasks.report"),
    ("tasks/plan.py", "import flows.scheduled", "layers", "tasks.plan -> flows.scheduled"),
    ("maskmill/preview.py", "import prefect", "no-prefect-in-library", "maskmill.preview -> prefect"),
    ("maskmill/capture.py", "from .extractors import base", "acyclic", ".capture -> .extractors"),
])
def test_a_violation_breaks_its_contract(tmp_path, module, line, contract, culprit):
    root = _copy_sources(tmp_path)
    assert lint_imports(root, contract).returncode == 0  # the unbroken copy passes
    path = root / module
    path.write_text(path.read_text() + f"\n{line}  # the violation under test\n")
    out = lint_imports(root, contract)
    assert out.returncode != 0 and "0 kept, 1 broken" in out.stdout, out.stdout
    assert culprit in out.stdout, out.stdout
