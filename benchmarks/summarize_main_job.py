"""Summarize a main-job run (`python -m helpers.run`) as one small JSON: every notebook's cells, errors and time,
the run's metrics, and the series its W&B offline runs hold (loss and memory).

    python benchmarks/summarize_main_job.py outputs/full --out benchmarks/results/h200-main-job.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from wandb_series import series  # this script's folder is first on sys.path


def notebook_summary(path: Path) -> dict:
    """Code cells, how many ran, the first error (if any), and wall time from nbclient's cell timestamps."""
    notebook = json.loads(path.read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    errors = [
        {"cell": i, "error": f"{o.get('ename')}: {o.get('evalue')}"[:500]}
        for i, c in enumerate(cells)
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    stamps = [
        datetime.datetime.fromisoformat(c["metadata"]["execution"][key].replace("Z", "+00:00"))
        for c in cells
        for key in ("iopub.execute_input", "shell.execute_reply")
        if key in c.get("metadata", {}).get("execution", {})
    ]
    return {
        "code_cells": len(cells),
        "executed": sum(c.get("execution_count") is not None for c in cells),
        "errors": errors,
        "seconds": round((max(stamps) - min(stamps)).total_seconds(), 1) if stamps else None,
    }


def eta_check(metrics: dict | None) -> dict:
    """Per training stage: the estimate printed before it started, per step, against the median step it then took
    (the pace its progress bar's ETA extrapolates), with its peak memory."""
    checked = {}
    for stage in ("sft", "dpo", "rlhf"):
        m = (metrics or {}).get(stage) or {}
        estimate, measured, steps = m.get("estimate_seconds"), m.get("seconds_per_step"), m.get("steps")
        if estimate and measured and steps:
            checked[stage] = {
                "steps": steps,
                "estimated_s_per_step": round(estimate / steps, 3),
                "measured_s_per_step": measured,
                "measured_over_estimated": round(measured / (estimate / steps), 2),
                "train_seconds": m.get("train_seconds"),
                "peak_memory_gib": m.get("peak_memory_gib"),
            }
    return checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="outputs/<profile> of the run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    run = args.run_dir
    summary = {
        "notebooks": {p.name: notebook_summary(p) for p in sorted((run / "notebooks").glob("*.ipynb"))},
        "metrics": json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else None,
        "wandb": series(run / "wandb", ["train/memory/", "train/loss", "train/rewards/accuracies"]),
    }
    summary["eta_check"] = eta_check(summary["metrics"])
    summary["all_cells_passed"] = bool(summary["notebooks"]) and all(
        not nb["errors"] and nb["executed"] == nb["code_cells"] for nb in summary["notebooks"].values()
    )
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    for name, nb in summary["notebooks"].items():
        print(f"{name}: {nb['executed']}/{nb['code_cells']} cells, {nb['seconds']} s, errors: {nb['errors'] or 'none'}")
    for stage, c in summary["eta_check"].items():
        print(
            f"{stage}: {c['measured_s_per_step']} s a step, estimated {c['estimated_s_per_step']} s "
            f"(× {c['measured_over_estimated']}), peak {c['peak_memory_gib']} GiB"
        )
    for name, r in summary["wandb"].items():
        keys = sorted({k for row in r["history"] for k in row if k.startswith("train/memory/")})
        print(f"W&B {name}: {r['rows']} rows; memory series: {', '.join(keys) or 'none'}")
    return 0 if summary["all_cells_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
