"""The import graph: layers point down and no package's modules import each other in a circle
(the import-linter contracts in pyproject.toml), and no module of the package hides an import
of another inside a function, except the command line, which loads each task when it runs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "dssn"


def test_import_contracts_hold():
    # A process of its own: import-linter configures logging, which would silence other tests' logs.
    run = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                          f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True))"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def function_level_imports(source: str, name: str) -> list[str]:
    """``name:line module`` for every import of a dssn module inside a function of ``source``."""
    found = []
    for func in ast.walk(ast.parse(source)):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dssn"):
                    found.append(f"{name}:{node.lineno} {node.module}")
                elif isinstance(node, ast.Import):
                    found += [f"{name}:{node.lineno} {a.name}" for a in node.names if a.name.startswith("dssn")]
    return found


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if p.name != "cli.py"),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_dssn_import_inside_a_function(path):
    assert function_level_imports(path.read_text(), path.name) == []


def test_the_check_sees_hidden_imports():
    source = "import torch\n\ndef f():\n    import numpy\n    from dssn.engine import trainer\n    import dssn.apps\n"
    assert function_level_imports(source, "m.py") == ["m.py:5 dssn.engine", "m.py:6 dssn.apps"]
