"""The notebook series is committed clean and follows its conventions (executing them is nbval's job)."""

import json

import pytest

from helpers.run import series

NOTEBOOKS = series()


def test_series_is_numbered_01_to_05():
    assert [p.name[:2] for p in NOTEBOOKS][:5] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    notebook = json.loads(path.read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    assert set(notebook["metadata"]) <= {"kernelspec", "language_info"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_opens_with_goal_and_needs(path):
    first = "".join(json.loads(path.read_text())["cells"][0]["source"])
    assert first.startswith("# ") and "**Goal" in first and "**Needs" in first


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_path_hacks_or_star_imports(path):
    sources = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert not any("sys.path" in s or "import *" in s or "%%capture" in s for s in sources)
