"""The notebook series is committed clean and follows its conventions (executing them is nbval's job): the library
constructors that are the lesson stand in the cells, each config checked against `helpers.settings`."""

import ast
import json
import re

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


def code_cells(number: str) -> list[str]:
    path = next(p for p in NOTEBOOKS if p.name.startswith(number))
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


# The library calls that are the lesson stand in the cells (a subclass counts: `ProjectDPOTrainer(` for DPOTrainer).
CONSTRUCTORS = {
    "02": ("BitsAndBytesConfig(", "LoraConfig(", "get_peft_model("),
    "03": ("SFTConfig(", "SFTTrainer("),
    "04": ("DPOConfig(", "DPOTrainer("),
    "06": ("RLOOConfig(", "RLOOTrainer("),
}
CONFIG_CALL = re.compile(r"\b(BitsAndBytes|Lora|SFT|DPO|RLOO)Config\(")


@pytest.mark.parametrize("number", CONSTRUCTORS)
def test_the_library_constructors_are_in_the_cells(number):
    cells = code_cells(number)
    missing = [call for call in CONSTRUCTORS[number] if not any(call in cell for cell in cells)]
    assert not missing, f"notebook {number} builds no {missing} in a code cell"


@pytest.mark.parametrize("number", CONSTRUCTORS)
def test_each_config_cell_asserts_it_equals_the_settings_helper(number):
    """What the reader sees built is what every other caller (the tests, `--stage`) builds from `settings`."""
    unchecked = [cell for cell in code_cells(number) if CONFIG_CALL.search(cell) and "== settings." not in cell]
    assert not unchecked, f"notebook {number}: a cell builds a config without asserting `== settings.…`: {unchecked}"


def helpers_imports(source: str) -> set[str]:
    """The modules a cell imports: `helpers.x` for `from helpers import x` and `from helpers.x import …`."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "helpers" else [node.module]
            found |= set(names)
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_the_first_code_cell_imports_only_settings(path):
    """`settings.load_profile()` comes first: with the Unsloth backend it imports Unsloth before anything else loads
    transformers, peft or TRL."""
    first = next(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    assert helpers_imports("".join(first["source"])) == {"helpers.settings"}
