"""The README works as written: its Python snippets run, and every ``pln_ref.<name>`` it cites
resolves (issue 10, item 6)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", TEXT, re.S)
NAMES = sorted(set(re.findall(r"\bpln_ref(?:\.[A-Za-z_][A-Za-z_0-9]*)+", TEXT)))


def _resolve(dotted: str):
    """Attribute lookup from ``import pln_ref``, importing a submodule where the README names one
    (``import pln_ref.laplace`` is how a user reaches a module)."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def test_readme_has_snippets_and_names():
    assert SNIPPETS and len(NAMES) > 10


@pytest.mark.parametrize("name", NAMES)
def test_every_cited_name_resolves(name):
    _resolve(name)


@pytest.mark.parametrize("i", range(len(SNIPPETS)))
def test_python_snippet_runs(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    exec(compile(SNIPPETS[i], f"README snippet {i}", "exec"), {"__name__": "__readme__"})
