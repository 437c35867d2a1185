"""Plots of training logs (loss, DPO loss, rewards, memory), of data and answer lengths, of the evaluation (rates
with bootstrap intervals), and of NF4's levels over a layer's weights.

Each returns a matplotlib Figure, closed to pyplot (so a notebook shows it once); `save` writes a PNG.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from helpers.config import MODELS


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


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean of the last `window` values (fewer at the start), one per value."""
    return [sum(values[max(0, i + 1 - window) : i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def plot_dpo_loss(history: list[dict], window: int = 5, step0_loss: float | None = None):
    """DPO's logged training loss, its moving average, and where the loss starts.

    The dotted line is log 2, the sigmoid term of every pair while the policy equals the reference; with an NLL
    term (RPO, `loss_type=("sigmoid", "sft")`) the loss starts above it, at log 2 plus the chosen answers' NLL:
    pass the step-0 evaluation loss as `step0_loss` to draw that too. Each logged value averages the steps since
    the previous log, so even the first is not a step-0 value.

    Args:
        history: the Trainer's log history.
        window: logged values per point of the moving average.
        step0_loss: the evaluation loss before the first step (`eval_loss` of `trainer.evaluate()`), if measured.
    """
    steps, values = series(history, "loss")
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.plot(steps, values, color="tab:blue", alpha=0.35, lw=1, marker=".", label="logged")
    ax.plot(steps, moving_average(values, window), color="tab:blue", lw=2, label=f"mean of last {window} logs")
    ax.axhline(math.log(2), color="grey", ls=":", lw=1.2, label="log 2 (sigmoid term at step 0)")
    if step0_loss is not None:
        ax.axhline(step0_loss, color="black", ls="--", lw=1, label=f"step-0 eval loss {step0_loss:.3f}")
    ax.set(xlabel="step", ylabel="loss", title="DPO training loss")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_rewards(history: list[dict]):
    """DPO's implicit rewards (chosen, rejected), the reward margin, and the reward accuracy against step.

    The reward margin is TRL's `rewards/margins`: β times the log-ratio margin, so compare it only between runs
    with the same β.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
    labels = {"rewards/chosen": "chosen", "rewards/rejected": "rejected", "rewards/margins": "reward margin"}
    for key, label in labels.items():
        left.plot(*series(history, key), label=label)
    left.axhline(0, color="grey", lw=0.8)
    left.set(xlabel="step", ylabel="β · log-ratio (nats)", title="implicit rewards")
    left.legend()
    right.plot(*series(history, "rewards/accuracies"), color="tab:green")
    right.set(xlabel="step", ylabel="share of pairs", title="reward accuracy (chosen > rejected)", ylim=(-0.02, 1.02))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_memory(history: list[dict]):
    """Memory logged at each training log (`helpers.memory.MemoryCallback`), in GiB: GPU and CPU in separate
    panels, with the GPU's capacity as a line. The GPU peak is reset when training starts, so it is this stage's
    training peak, not an earlier evaluation's."""
    training = [h for h in history if "loss" in h]
    gpu_keys = [
        k
        for k in ("gpu_allocated_gib", "gpu_reserved_gib", "gpu_peak_allocated_gib")
        if any(f"memory/{k}" in h for h in training)
    ]
    panels = (["gpu"] if gpu_keys else []) + ["cpu"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.5), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "gpu":
            for key in gpu_keys:
                ax.plot(*series(training, f"memory/{key}"), label=key.removeprefix("gpu_").removesuffix("_gib"))
            _, capacity = series(training, "memory/gpu_total_gib")
            if capacity:
                ax.axhline(capacity[0], color="black", ls="--", lw=1, label=f"capacity {capacity[0]:.1f}")
            ax.set_title("GPU memory")
        else:
            ax.plot(*series(training, "memory/cpu_rss_gib"), color="tab:purple", label="process RSS")
            ax.set_title("CPU memory")
        ax.set(xlabel="step", ylabel="GiB")
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


def plot_eval(evaluation: dict, models: tuple[str, ...] = MODELS):
    """One bar chart per measured quantity (`EVAL_BARS` found in `evaluation`), one bar per model, with the 95%
    bootstrap interval as an error bar where `evaluation` holds one (`<quantity>_ci`).

    Args:
        evaluation: the `eval` section of metrics.json, `{model: {quantity: value}}`.
    """
    models = tuple(m for m in models if m in evaluation)
    keys = [k for k in EVAL_BARS if any(k in evaluation.get(m, {}) for m in models)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.3 * max(1, len(keys)), 3.3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=False):
        heights = [evaluation.get(m, {}).get(key, 0.0) for m in models]
        bars = ax.bar(models, heights, color=[f"C{i}" for i in range(len(models))])  # as in plot_histograms
        intervals = [evaluation.get(m, {}).get(f"{key}_ci") for m in models]
        if all(intervals):
            _error_bars(ax, range(len(models)), heights, intervals)
            ax.set_ylim(0, max(high for _, high in intervals) * 1.15)
        else:
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_title(EVAL_BARS[key], fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        if key == "win_rate_vs_sft":
            ax.axhline(0.5, color="black", lw=0.8, ls="--")
    fig.tight_layout()
    plt.close(fig)
    return fig


def _error_bars(ax: Any, xs: Any, means: list[float], intervals: list) -> None:
    """Asymmetric error bars from (low, high) intervals around `means`, each labelled above its top."""
    below = [m - low for m, (low, _) in zip(means, intervals, strict=True)]
    above = [high - m for m, (_, high) in zip(means, intervals, strict=True)]
    ax.errorbar(list(xs), means, yerr=[below, above], fmt="none", ecolor="black", capsize=4, lw=1.2)
    for x, mean, (low, high) in zip(xs, means, intervals, strict=True):
        text = f"{mean:.2f}\n[{low:.2f}, {high:.2f}]"
        ax.annotate(text, (x, high), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)


def rates_from_eval(evaluation: dict, key: str, models: tuple[str, ...] = MODELS) -> dict[str, dict[str, float]]:
    """`{model: {"mean", "low", "high"}}` for `plot_rates`, from metrics.json's `eval` section (`key`, `key_ci`)."""
    return {
        m: {"mean": evaluation[m][key], "low": evaluation[m][f"{key}_ci"][0], "high": evaluation[m][f"{key}_ci"][1]}
        for m in models
        if f"{key}_ci" in evaluation.get(m, {})
    }


def plot_rates(rates: dict[str, dict[str, float]], title: str, ylabel: str = "rate", reference: float | None = None):
    """Rates with their confidence intervals: one bar per model, error bars from `low` to `high`.

    Args:
        rates: `{model: {"mean", "low", "high"}}`, e.g. from `rates_from_eval` or
            `helpers.comparison.rate_with_interval`.
        title, ylabel: the axes' title and y label.
        reference: draw a dashed line here (0.5 for a win rate).
    """
    names = list(rates)
    means = [rates[n]["mean"] for n in names]
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2.5, 3.5))
    ax.bar(names, means, color=[f"C{i}" for i in range(len(names))], alpha=0.75)
    _error_bars(ax, range(len(names)), means, [(rates[n]["low"], rates[n]["high"]) for n in names])
    if reference is not None:
        ax.axhline(reference, color="black", lw=0.8, ls="--")
    top = max(r["high"] for r in rates.values())
    ax.set(ylabel=ylabel, title=f"{title} (95% bootstrap interval)", ylim=(0, max(1.0, top) * 1.18))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_nf4(weight: Any, blocksize: int = 64, title: str = "a layer's weights"):
    """NF4's 16 levels over the histogram of a weight tensor, and how often bitsandbytes picks each level.

    The weights are shown as bitsandbytes quantizes them: each divided by the absmax of its block of `blocksize`.
    The levels are quantiles of a normal distribution (7 negative, 0, 8 positive), so on roughly normal weights
    each code is used roughly equally often (the dashed line is 1/16).

    Args:
        weight: a float weight tensor (e.g. a linear layer's `weight`, before quantization).
        blocksize: weights per absmax scale.
        title: what the weights are, for the titles.
    """
    import torch

    from helpers.qlora import nf4_levels, nf4_quantize

    levels = nf4_levels()
    scaled, codes = nf4_quantize(weight, blocksize)
    shares = torch.bincount(codes, minlength=len(levels)).float() / len(codes)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
    left.hist(scaled.numpy(), bins=200, range=(-1, 1), color="tab:blue", alpha=0.7)
    for level in levels.tolist():
        left.axvline(level, color="tab:red", lw=0.9)
    left.set(xlabel="weight / absmax of its block", ylabel="count", title=f"{title}: histogram and the 16 NF4 levels")
    right.bar(range(len(levels)), shares.numpy(), color="tab:red", alpha=0.75)
    right.axhline(1 / len(levels), color="black", ls="--", lw=1, label="1/16")
    right.set_xticks(range(len(levels)), [f"{v:+.2f}" for v in levels.tolist()], rotation=90, fontsize=8)
    right.set(xlabel="NF4 level", ylabel="share of weights", title="how often each level is used")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
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
