"""`report.md` and the notebooks' markdown tables: the run's numbers and sample answers, written from metrics.json
and samples.json."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from helpers.config import MODELS, Profile
from helpers.metrics import read_metrics


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"
    return "–" if value is None else str(value)


def eval_table(evaluation: dict) -> list[str]:
    """A markdown table: one row per model, one column per measured number (with its 95% interval when the
    section holds one as `<name>_ci`)."""
    rows = {name: evaluation[name] for name in MODELS if isinstance(evaluation.get(name), dict)}
    columns = sorted({k for row in rows.values() for k, v in row.items() if isinstance(v, int | float)})
    if not columns:
        return []

    def cell(row: dict, column: str) -> str:
        interval = row.get(f"{column}_ci")
        text = fmt(row.get(column))
        return f"{text} [{fmt(interval[0])}, {fmt(interval[1])}]" if interval else text

    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(row, c) for c in columns) + " |" for name, row in rows.items()]
    return lines


TABLE_COLUMNS = {  # column header: (metrics section, key); the section "eval" is read per model
    "better-answer rate": ("eval", "better_answer_rate"),
    "reward-model score": ("eval", "reward_model_score_mean"),
    "win rate vs SFT": ("eval", "win_rate_vs_sft"),
    "mean tokens": ("eval", "mean_response_tokens"),
    "training s": ("stage", "train_seconds"),
    "peak memory GiB": ("stage", "peak_memory_gib"),
}
STAGE_SECTIONS = {"sft": "sft", "dpo": "dpo", "rl": "rlhf"}  # the metrics section that holds each model's training


def comparison_table(profile: Profile) -> str:
    """A markdown table of the models in metrics.json's `eval` section: the held-out numbers of notebook 05's
    comparison and each stage's training cost (– where a number was not recorded)."""
    metrics = read_metrics(profile)
    models = [m for m in MODELS if m in metrics.get("eval", {})]
    lines = ["| model | " + " | ".join(TABLE_COLUMNS) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for model in models:
        cells = []
        for section, key in TABLE_COLUMNS.values():
            source = metrics["eval"][model] if section == "eval" else metrics.get(STAGE_SECTIONS.get(model), {})
            value = source.get(key)
            cells.append("–" if value is None else f"{value:.3g}" if section == "stage" else f"{value:.3f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def samples_section(samples_path: Path) -> list[str]:
    """Side-by-side answers of the three models to the first held-out prompts."""
    if not samples_path.exists():
        return []
    samples = json.loads(samples_path.read_text())
    lines = ["## Answers side by side", ""]
    for i, prompt in enumerate(samples["prompts"]):
        lines += [f"**Prompt:** {prompt}", ""]
        lines += [f"- *{name}*: {samples[name][i]!r}" for name in MODELS if name in samples]
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
        lines += [f"- {k}: {fmt(v)}" for k, v in evaluation.items() if k not in MODELS] + [""]
    lines += samples_section(out / "samples.json")
    plots = sorted(p.name for p in out.glob("*.png"))
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    if not metrics:
        lines += ["No stage has recorded results yet.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
