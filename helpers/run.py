"""The main job: run the notebook series in order, keep executed copies (and HTML), then write the report.

    python -m helpers.run            # or: make run
    python -m helpers.run 06 07      # only these notebooks (what they need is trained first when missing)

Settings come from the `TUTORIAL_*` variables (README's table; `helpers.environment`). Executed notebooks
go to `outputs/<profile>/notebooks/`, the numbers to `outputs/<profile>/metrics.json` and `report.md`.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from helpers.config import PROJECT_ROOT, Profile
from helpers.environment import load_profile
from helpers.preflight import check_environment
from helpers.report import write_report

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
CELL_TIMEOUT_S = 3 * 3600  # a full-profile training cell runs for hours
MAX_NOISE_LINES = 50  # progress bars and warnings an executed notebook may show in all
NOISE = re.compile(r"\d+%\||it/s|s/it|examples/s|Warning|warn\(")


def series(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks, in order; with `only`, those whose name starts with one of them (e.g. "06")."""
    notebooks = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    chosen = [p for p in notebooks if not only or any(p.name.startswith(o) for o in only)]
    if only and not chosen:
        names = ", ".join(p.name for p in notebooks)
        raise SystemExit(f"No notebook starts with {' or '.join(only)}; they are {names}.")
    return chosen


def execute_notebook(path: Path, out_dir: Path) -> Path:
    """Execute `path` in a fresh kernel (working directory `notebooks/`); save the executed copy and HTML.

    Raises:
        nbclient.exceptions.CellExecutionError: a cell failed (the partly executed copy is still saved).
    """
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / path.name
    try:
        client.execute()
    finally:
        # What a reader sees: a text progress bar's updates (one output each, after `\r`) as its last state.
        notebook, _ = CoalesceStreamsPreprocessor().preprocess(notebook, {})
        nbformat.write(notebook, executed)
        html, _ = HTMLExporter().from_notebook_node(notebook)
        executed.with_suffix(".html").write_text(html)
    return executed


def noise_lines(notebook: Any) -> list[str]:
    """The lines of progress bars and warnings an executed notebook (as `nbformat.read` gives it) shows: stderr, or
    text that looks so.

    Counted as Jupyter shows them (nbconvert's `CoalesceStreamsPreprocessor`, as `execute_notebook` saves them):
    consecutive outputs of one stream run together, and text before a `\\r` within a line is overwritten (a
    progress bar's updates are one line, its last state)."""
    import nbformat
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    shown, _ = CoalesceStreamsPreprocessor().preprocess(nbformat.from_dict(notebook), {})
    lines = []
    for cell in shown["cells"]:
        for output in cell.get("outputs", []):
            noisy = output.get("name") == "stderr"
            lines += [line for line in output.get("text", "").splitlines() if line and (noisy or NOISE.search(line))]
    return lines


def pin_settings(profile: Profile) -> None:
    """Make every notebook kernel resolve the same profile, backend, seed and outputs folder as this process."""
    os.environ.update(
        TUTORIAL_PROFILE=profile.name,
        TUTORIAL_BACKEND=profile.backend,
        TUTORIAL_SEED=str(profile.seed),
        TUTORIAL_OUTPUTS=profile.outputs_root,
    )


def main(argv: list[str] | None = None) -> int:
    import argparse

    import nbformat
    from nbclient.exceptions import CellExecutionError

    parser = argparse.ArgumentParser(prog="python -m helpers.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="run only these notebooks, by number (e.g. 06 07); default: all")
    args = parser.parse_args(argv)

    profile = load_profile()
    print(profile.describe())
    check_environment(profile)  # before any notebook starts, not an hour into one
    pin_settings(profile)
    out_dir = profile.output_dir / "notebooks"
    notebooks = series(args.only)
    progress = tqdm(notebooks, desc="notebooks", unit="nb")
    for path in progress:
        progress.set_postfix_str(path.name)
        start = time.perf_counter()
        try:
            execute_notebook(path, out_dir)
        except CellExecutionError as e:
            print(f"\n{path.name} failed; the executed copy is in {out_dir / path.name}.\n{e}", file=sys.stderr)
            return 1
        noise = noise_lines(nbformat.read(out_dir / path.name, as_version=4))
        progress.write(f"{path.name}: done in {time.perf_counter() - start:.0f} s, {len(noise)} lines of noise")
        if len(noise) > MAX_NOISE_LINES:
            print(f"{path.name}: more than {MAX_NOISE_LINES} lines of progress bars or warnings:", file=sys.stderr)
            print("\n".join(noise[:20]), file=sys.stderr)
            return 1
    report = write_report(profile)
    print(f"Executed notebooks: {out_dir}\nReport: {report}\nMetrics: {profile.output_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
