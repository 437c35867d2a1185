"""The shape of the code: `helpers/`'s import graph (read from the source, imports inside functions included) has no
cycle and keeps its layers, and the project stays within its size budgets (the numbers are printed: `pytest -s`).

Layers: the core modules are what every notebook and stage runs on; the notebook-specific ones serve one notebook
each (`theory` notebook 01's numbers, `export` notebook 07's files); the report modules draw and run the series. A
core module imports only core modules, so the stages and tests never load a notebook's extras; the notebook-specific
and report modules build on the core; only `plots` draws `theory`'s numbers; `smoke` builds its world from the
settings alone, so that building it needs no model code.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from helpers.settings import PROJECT_ROOT

HELPERS = PROJECT_ROOT / "helpers"
CORE = {
    "settings",
    "data",
    "smoke",
    "model",
    "fixes",
    "machine",
    "generation",
    "training",
    "evaluation",
    "rl",
}
NOTEBOOK_SPECIFIC = {"theory", "export"}
REPORT = {"run", "plots"}
ALLOWED = {  # what each layer may import from helpers
    **dict.fromkeys(CORE, CORE),
    **dict.fromkeys(NOTEBOOK_SPECIFIC, CORE),
    "run": CORE,
    "plots": CORE | {"theory"},
}

MAX_MODULES = 15
MAX_HELPERS_LINES = 5_000
MAX_PYTHON_LINES = 6_000  # all Python outside tests/, benchmarks/ and deploy/
MAX_NOTEBOOK_CODE_LINES = 1_000
MAX_LINE = 120
NOT_COUNTED = {"tests", "benchmarks", "deploy", ".venv", ".cache", "outputs", "__pycache__", ".git"}


def modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(HELPERS.glob("*.py")) if p.name != "__init__.py"}


def imported(tree: ast.AST, known: set[str]) -> set[str]:
    """The helpers modules a module's source imports, anywhere in it: `import helpers.x`, `from helpers import x`,
    `from helpers.x import y` and their relative forms."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("helpers.")}
        elif isinstance(node, ast.ImportFrom):
            module = f"helpers.{node.module}" if node.level and node.module else node.module or ""
            if module == "helpers" or (node.level and not node.module):  # `from helpers import x`, `from . import x`
                found |= {a.name for a in node.names}
            elif module.startswith("helpers."):
                found.add(module.split(".")[1])
    return found & known


def import_graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: imported(ast.parse(path.read_text()), known) - {name} for name, path in modules().items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as the path of modules that closes it (first == last), or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = "done"
        return None

    return next((c for node in sorted(graph) if node not in state and (c := visit(node, [node]))), None)


def test_the_import_reader_sees_every_form_of_import():
    source = """
import helpers.data
from helpers import model, settings as s
from helpers.generation import generate

def later():
    from helpers.smoke import problem_key
    import torch
from . import fixes
from .theory import dpo_loss
"""
    known = {"data", "model", "settings", "generation", "smoke", "fixes", "theory", "plots"}
    assert imported(ast.parse(source), known) == known - {"plots"}


def test_the_cycle_finder_names_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_helpers_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle in helpers/ (imports inside functions count): {' → '.join(cycle)}"


def test_every_module_has_a_layer():
    unplaced = sorted(set(modules()) - CORE - NOTEBOOK_SPECIFIC - REPORT)
    assert not unplaced, f"helpers modules in no layer (add them to one in this file): {unplaced}"


def test_the_layers_hold():
    graph = import_graph()
    wrong = sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps - ALLOWED.get(m, set(graph)))
    assert not wrong, "core modules import only core modules; notebook-specific and report modules build on them:\n" + (
        "\n".join(wrong)
    )
    assert [m for m, deps in graph.items() if "theory" in deps and m != "plots"] == []  # only plots draws theory's
    assert graph["smoke"] <= {"settings"}, f"smoke imports {sorted(graph['smoke'])}: only settings"


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def python_outside_tests() -> list[Path]:
    return [
        p
        for p in PROJECT_ROOT.rglob("*.py")
        if not NOT_COUNTED & set(p.relative_to(PROJECT_ROOT).parts[:-1])
        and not any(part.startswith(".") for part in p.relative_to(PROJECT_ROOT).parts)
    ]


def notebook_cells() -> list[tuple[str, str, str]]:
    """(notebook, cell type, source) of every cell of the series."""
    return [
        (path.name, cell["cell_type"], "".join(cell["source"]))
        for path in sorted((PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
        for cell in json.loads(path.read_text())["cells"]
    ]


def budgets() -> dict[str, tuple[int, int]]:
    """Each budget's (measured, limit)."""
    code = sum(len(source.splitlines()) for _, kind, source in notebook_cells() if kind == "code")
    return {
        "helpers modules (without __init__.py)": (len(modules()), MAX_MODULES),
        "lines of helpers/*.py": (sum(len(lines(p)) for p in HELPERS.glob("*.py")), MAX_HELPERS_LINES),
        "lines of Python outside tests/, benchmarks/, deploy/": (
            sum(len(lines(p)) for p in python_outside_tests()),
            MAX_PYTHON_LINES,
        ),
        "lines of code cells in notebooks/*.ipynb": (code, MAX_NOTEBOOK_CODE_LINES),
    }


def test_print_the_budgets():
    for name, (measured, limit) in budgets().items():
        print(f"{name}: {measured:,} of at most {limit:,}")
    by_module = {name: len(lines(path)) for name, path in modules().items()}
    print("lines by module:", ", ".join(f"{m} {n}" for m, n in sorted(by_module.items(), key=lambda x: -x[1])))


@pytest.mark.parametrize("budget", list(budgets()))
def test_within_budget(budget):
    measured, limit = budgets()[budget]
    assert measured <= limit, f"BUDGET EXCEEDED: {budget} is {measured:,}, the budget is {limit:,}: trim"


def test_no_line_is_longer_than_120_characters():
    long = [
        f"helpers/{p.name}:{i}"
        for p in HELPERS.glob("*.py")
        for i, line in enumerate(lines(p), 1)
        if len(line) > MAX_LINE
    ]
    long += [
        f"{notebook} ({kind} cell): {line[:60]}…"
        for notebook, kind, source in notebook_cells()
        for line in source.splitlines()
        if len(line) > MAX_LINE
    ]
    assert not long, f"lines over {MAX_LINE} characters: {long}"
