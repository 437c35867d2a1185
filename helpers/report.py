"""`report.md`: the run's numbers and sample answers, written from metrics.json and samples.json."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from helpers.config import Profile

MODEL_NAMES = ("base", "sft", "dpo")


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"
    return "–" if value is None else str(value)


def eval_table(evaluation: dict) -> list[str]:
    """A markdown table: one row per model, one column per measured quantity."""
    columns = sorted({k for name in MODEL_NAMES for k in evaluation.get(name, {})})
    if not columns:
        return []
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in MODEL_NAMES:
        row = evaluation.get(name, {})
        lines.append(f"| {name} | " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return lines


def samples_section(samples_path: Path) -> list[str]:
    """Side-by-side answers of the three models to the first held-out prompts."""
    if not samples_path.exists():
        return []
    samples = json.loads(samples_path.read_text())
    lines = ["## Answers side by side", ""]
    for i, prompt in enumerate(samples["prompts"]):
        lines += [f"**Prompt:** {prompt}", ""]
        lines += [f"- *{name}*: {samples[name][i]!r}" for name in MODEL_NAMES if name in samples]
        lines.append("")
    return lines


def write_report(profile: Profile) -> Path:
    """Write `outputs/<profile>/report.md` from what the stages recorded; return its path."""
    out = profile.output_dir
    metrics_file = out / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    lines = [
        f"# Run report: {profile.name} profile",
        "",
        f"Written {datetime.now(UTC):%Y-%m-%d %H:%M UTC}. {profile.describe()}",
        "",
    ]
    for stage in ("sft", "dpo"):
        if stage in metrics:
            lines += [f"## {stage.upper()}", ""] + [f"- {k}: {fmt(v)}" for k, v in metrics[stage].items()] + [""]
    evaluation = metrics.get("eval", {})
    if evaluation:
        lines += ["## Evaluation on held-out prompts", ""] + eval_table(evaluation) + [""]
        lines += [f"- {k}: {fmt(v)}" for k, v in evaluation.items() if k not in MODEL_NAMES] + [""]
    lines += samples_section(out / "samples.json")
    plots = sorted(p.name for p in out.glob("*.png"))
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    if not metrics:
        lines += ["No stage has recorded results yet.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
