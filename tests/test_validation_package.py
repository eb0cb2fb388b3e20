"""The validation harness is the subpackage pln_ref.validation: cheap to import, with a public
API, and the fitting code does not depend on it."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_import_is_cheap_and_all_names_exist():
    code = ("import sys, pln_ref.validation as v; "
            "missing = [n for n in v.__all__ if not hasattr(v, n)]; "
            "heavy = [m for m in ('matplotlib', 'torch') if m in sys.modules]; "
            "print(missing, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, env=ENV).stdout.strip()
    assert out == "[] []"


@pytest.mark.parametrize("old", ["engines", "gate", "compare", "psis", "sbc", "validate"])
def test_old_top_level_harness_modules_are_gone(old):
    assert importlib.util.find_spec(f"pln_ref.{old}") is None


def test_fitting_code_does_not_import_the_harness():
    import ast

    for path in (ROOT / "pln_ref").glob("*.py"):
        if path.name == "cli.py":  # registers the validate / sbc subcommands
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module + "." if node.module else "")
                names = [base + a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith((".validation", "pln_ref.validation")) for n in names), path.name


def test_cli_help_of_validate_and_sbc():
    for cmd in ("validate", "sbc"):
        r = subprocess.run([sys.executable, "-m", "pln_ref.cli", cmd, "--help"], capture_output=True,
                           text=True, cwd=ROOT, env=ENV)
        assert r.returncode == 0 and f"usage: pln-ref {cmd}" in r.stdout
