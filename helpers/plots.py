"""Plots of training logs (loss, DPO rewards, memory), of data and answer lengths, and of the evaluation.

Each returns a matplotlib Figure, closed to pyplot (so a notebook shows it once); `save` writes a PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt


def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged quantity; evaluation records and others without it are skipped."""
    points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
    return [s for s, _ in points], [v for _, v in points]


def plot_training(history: list[dict], title: str):
    """Training loss against step."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*series(history, "loss"), marker=".")
    ax.set(xlabel="step", ylabel="loss", title=f"{title} training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_rewards(history: list[dict]):
    """DPO's implicit rewards (chosen, rejected), their margin, and the reward accuracy against step."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        left.plot(*series(history, key), label=key.split("/")[1])
    left.axhline(0, color="grey", lw=0.8)
    left.set(xlabel="step", ylabel="β · log-ratio", title="implicit rewards")
    left.legend()
    right.plot(*series(history, "rewards/accuracies"), color="tab:green")
    right.set(xlabel="step", ylabel="share of pairs", title="reward accuracy (chosen > rejected)", ylim=(-0.02, 1.02))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_memory(history: list[dict]):
    """Memory readings logged during training (GPU allocated/reserved/peak, CPU RSS), in GiB."""
    keys = sorted({k for h in history for k in h if k.startswith("memory/") and not k.endswith("total_gib")})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        ax.plot(*series(history, key), label=key.removeprefix("memory/").removesuffix("_gib"))
    ax.set(xlabel="step", ylabel="GiB", title="memory during training")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_histograms(values: dict[str, list[float]], title: str, xlabel: str, limit: float | None = None):
    """Overlaid histograms of one quantity for several groups (e.g. tokens per answer for each model).

    Args:
        values: group name -> values.
        limit: draw a dashed vertical line here (e.g. `max_length`).
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    everything = [v for group in values.values() for v in group]
    low, high = min(everything), max(everything)
    if all(float(v).is_integer() for v in everything):  # counts (tokens): bins of whole units, at most about 40
        width = max(1, math.ceil((high - low + 1) / 40))
        edges = [low - 0.5 + i * width for i in range(math.ceil((high - low + 1) / width) + 1)]
    else:
        edges = [low + i * (high - low + 1e-9) / 30 for i in range(31)]
    for name, group in values.items():
        ax.hist(group, bins=edges, alpha=0.55, label=f"{name} (mean {sum(group) / len(group):.1f})")
    if limit is not None:
        ax.axvline(limit, color="black", ls="--", lw=1, label=f"limit {limit}")
    ax.set(xlabel=xlabel, ylabel="count", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig


EVAL_BARS = {
    "better_answer_rate": "better-answer rate (code judge)",
    "mean_response_tokens": "mean answer length (tokens)",
    "reward_model_score_mean": "mean reward-model score",
    "win_rate_vs_sft": "reward-model win rate vs SFT",
}


def plot_eval(evaluation: dict, models: tuple[str, ...] = ("base", "sft", "dpo")):
    """One bar chart per measured quantity (`EVAL_BARS` found in `evaluation`), one bar per model.

    Args:
        evaluation: the `eval` section of metrics.json, `{model: {quantity: value}}`.
    """
    keys = [k for k in EVAL_BARS if any(k in evaluation.get(m, {}) for m in models)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.3 * max(1, len(keys)), 3.3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        heights = [evaluation.get(m, {}).get(key, 0.0) for m in models]
        bars = ax.bar(models, heights, color=[f"C{i}" for i in range(len(models))])  # as in plot_histograms
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_title(EVAL_BARS[key], fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        if key == "win_rate_vs_sft":
            ax.axhline(0.5, color="black", lw=0.8, ls="--")
    fig.tight_layout()
    plt.close(fig)
    return fig


def save(fig, path: Path) -> Path:
    """Write `fig` as a PNG and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
