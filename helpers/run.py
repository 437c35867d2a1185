"""The main job: run the notebook series in order, keep executed copies (and HTML), then write the report.

    python -m helpers.run            # or: make run

Settings come from TUTORIAL_PROFILE / TUTORIAL_BACKEND / TUTORIAL_SEED (see helpers.config). Executed notebooks
go to `outputs/<profile>/notebooks/`, the numbers to `outputs/<profile>/metrics.json` and `report.md`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from helpers.config import PROJECT_ROOT, Profile, load_profile
from helpers.preflight import check_environment
from helpers.report import write_report

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
CELL_TIMEOUT_S = 3 * 3600  # a full-profile training cell runs for hours


def series() -> list[Path]:
    """The numbered notebooks, in order."""
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def execute_notebook(path: Path, out_dir: Path) -> Path:
    """Execute `path` in a fresh kernel (working directory `notebooks/`); save the executed copy and HTML.

    Raises:
        nbclient.exceptions.CellExecutionError: a cell failed (the partly executed copy is still saved).
    """
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / path.name
    try:
        client.execute()
    finally:
        nbformat.write(notebook, executed)
        html, _ = HTMLExporter().from_notebook_node(notebook)
        executed.with_suffix(".html").write_text(html)
    return executed


def pin_settings(profile: Profile) -> None:
    """Make every notebook kernel resolve the same profile, backend and seed as this process."""
    os.environ.update(TUTORIAL_PROFILE=profile.name, TUTORIAL_BACKEND=profile.backend, TUTORIAL_SEED=str(profile.seed))


def main() -> int:
    from nbclient.exceptions import CellExecutionError

    profile = load_profile()
    print(profile.describe())
    check_environment(profile)  # before any notebook starts, not an hour into one
    pin_settings(profile)
    out_dir = profile.output_dir / "notebooks"
    notebooks = series()
    progress = tqdm(notebooks, desc="notebooks", unit="nb")
    for path in progress:
        progress.set_postfix_str(path.name)
        start = time.perf_counter()
        try:
            execute_notebook(path, out_dir)
        except CellExecutionError as e:
            print(f"\n{path.name} failed; the executed copy is in {out_dir / path.name}.\n{e}", file=sys.stderr)
            return 1
        progress.write(f"{path.name}: done in {time.perf_counter() - start:.0f} s")
    report = write_report(profile)
    print(f"Executed notebooks: {out_dir}\nReport: {report}\nMetrics: {profile.output_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
