"""Every figure of the series: training logs (loss with the held-out loss, DPO's loss and rewards, memory), lengths,
rates with bootstrap intervals, RL's curves, notebook 04's experiments, NF4's levels, and DPO's loss against the
margin. Each returns a matplotlib Figure, closed to pyplot (a notebook shows it once, a test can read it).
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from helpers.settings import MODELS
from helpers.theory import dpo_loss, nf4_levels, nf4_quantize


def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged quantity; evaluation records and others without it are skipped."""
    points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
    return [s for s, _ in points], [v for _, v in points]


def _done(fig: Figure, *axes: Any, legend: bool = True) -> Figure:
    """Grid (and legend) on `axes`, a tight layout, and the figure closed to pyplot."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_training(history: list[dict], title: str) -> Figure:
    """The training loss and, where the Trainer evaluated, the held-out loss (`eval_loss`), against step."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*series(history, "loss"), marker=".", label="training batches")
    if series(history, "eval_loss")[0]:
        ax.plot(*series(history, "eval_loss"), marker="o", label="held-out conversations")
    ax.set(xlabel="step", ylabel="loss (nats per assistant token)", title=f"{title}: training and held-out loss")
    return _done(fig, ax)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean of the last `window` values (fewer at the start), one per value."""
    return [sum(values[max(0, i + 1 - window) : i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def plot_dpo_loss(history: list[dict], step0_loss: float) -> Figure:
    """DPO's logged training loss, its moving average over 5 logs, log 2 (the sigmoid term of every pair while
    the policy equals the reference) and `step0_loss`, the evaluation loss before the first step (with RPO's NLL term,
    above log 2). Each logged value averages the steps since the previous log, so even the first is not step 0's."""
    (steps, values), window = series(history, "loss"), 5
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.plot(steps, values, color="tab:blue", alpha=0.35, lw=1, marker=".", label="logged")
    ax.plot(steps, moving_average(values, window), color="tab:blue", lw=2, label=f"mean of last {window} logs")
    ax.axhline(math.log(2), color="grey", ls=":", lw=1.2, label="log 2 (sigmoid term at step 0)")
    ax.axhline(step0_loss, color="black", ls="--", lw=1, label=f"step-0 eval loss {step0_loss:.3f}")
    ax.set(xlabel="step", ylabel="loss", title="DPO training loss", ylim=(0, None))
    return _done(fig, ax)


def plot_rewards(history: list[dict]) -> Figure:
    """DPO's implicit rewards (chosen, rejected), the reward margin (TRL's `rewards/margins`: β times the log-ratio
    margin, comparable only at one β) and the reward accuracy against step."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
    labels = {"rewards/chosen": "chosen", "rewards/rejected": "rejected", "rewards/margins": "reward margin"}
    for key, label in labels.items():
        left.plot(*series(history, key), label=label)
    left.axhline(0, color="grey", lw=0.8)
    left.set(xlabel="step", ylabel="β · log-ratio (nats)", title="implicit rewards")
    left.legend()
    right.plot(*series(history, "rewards/accuracies"), color="tab:green")
    right.set(xlabel="step", ylabel="share of pairs", title="reward accuracy (chosen > rejected)", ylim=(-0.02, 1.02))
    return _done(fig, left, right, legend=False)


def plot_memory(history: list[dict]) -> Figure:
    """Memory at each training log (`helpers.training.LogReadings`), in GiB: the GPU's (where logged) with its capacity,
    and the CPU's. The GPU peak is reset when training starts: it is this stage's training peak."""
    training = [h for h in history if "loss" in h]
    gpu = [k for k in ("allocated", "reserved", "peak_allocated") if any(f"memory/gpu_{k}_gib" in h for h in training)]
    fig, axes = plt.subplots(1, 2 if gpu else 1, figsize=(11 if gpu else 5.5, 3.5), squeeze=False)
    for key in gpu:
        axes[0][0].plot(*series(training, f"memory/gpu_{key}_gib"), label=key)
    if capacity := series(training, "memory/gpu_total_gib")[1]:
        axes[0][0].axhline(capacity[0], color="black", ls="--", lw=1, label=f"capacity {capacity[0]:.1f}")
    axes[0][-1].plot(*series(training, "memory/cpu_rss_gib"), color="tab:purple", label="process RSS")
    for ax, title in zip(axes[0], (["GPU memory"] if gpu else []) + ["CPU memory"], strict=True):
        ax.set(xlabel="step", ylabel="GiB", title=title, ylim=(0, None))
    return _done(fig, *axes[0])


def plot_histograms(values: dict[str, list[float]], title: str, xlabel: str, limit: float | None = None) -> Figure:
    """Overlaid histograms of one quantity for several groups (e.g. tokens per answer), a dashed line at `limit`."""
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
    return _done(fig, ax)


def plot_rates(evaluation: dict, key: str, title: str, reference: float | None = None) -> Figure:
    """One rate of each model in metrics.json's `eval` section (`key`) with its 95% interval (`key_ci`): a bar a model,
    error bars over the interval, each labelled, and a dashed line at `reference` (0.5 for a win rate)."""
    names = [m for m in MODELS if f"{key}_ci" in evaluation.get(m, {})]
    means = np.array([evaluation[n][key] for n in names])
    low, high = np.array([evaluation[n][f"{key}_ci"] for n in names]).T
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2.5, 3.5))
    ax.bar(names, means, color=[f"C{i}" for i in range(len(names))], alpha=0.75)
    ax.errorbar(names, means, yerr=[means - low, high - means], fmt="none", ecolor="black", capsize=4, lw=1.2)
    for x, (mean, lo, hi) in enumerate(zip(means, low, high, strict=True)):
        text = f"{mean:.2f}\n[{lo:.2f}, {hi:.2f}]"
        ax.annotate(text, (x, hi), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
    if reference is not None:
        ax.axhline(reference, color="black", lw=0.8, ls="--")
    ax.set(ylabel="rate", title=f"{title} (95% bootstrap interval)", ylim=(0, max(1.0, *high) * 1.18))
    return _done(fig, ax, legend=False)


def plot_nf4(weight: torch.Tensor, title: str = "a layer's weights") -> Figure:
    """NF4's 16 levels over the histogram of `weight` divided by its blocks' absmax, as bitsandbytes quantizes it,
    and the share of weights at each level against 1/16 (equal use): a block is scaled by its largest weight, so the
    outer levels hold only that weight."""
    levels, (scaled, codes) = nf4_levels(), nf4_quantize(weight)
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
    return _done(fig, left, right, legend=False)


RL_CURVES = (  # panel title, training-batch key (TRL's log), held-out key (`rl.HeldOut.measure`)
    ("what RL maximises: {proxy} − β·KL", None, "objective"),
    ("reward-model score", "reward", "reward_model_score"),
    ("better-answer rate (code judge)", None, "better_answer_rate"),
    ("KL to the reference (nats per answer)", None, "kl_nats"),
    ("answer length (tokens)", "completions/mean_length", "mean_response_tokens"),
    ("share cut at the length limit", "completions/clipped_ratio", "cut_share"),
)


def plot_rl_curves(
    readings: list[dict], history: list[dict], beta: float, title: str, proxy: str = "reward-model score"
) -> Figure:
    """RL against optimizer step, a panel a quantity: the held-out `readings` (`rl.heldout_readings`, step 0 the start
    model) and TRL's logged training batches, whose `reward` (the proxy's, without the KL term) is drawn only where the
    reward model is the `proxy`. The first panel is what the run maximises: the proxy's held-out score − β·KL."""
    readings = [r | {"objective": r["proxy_reward"] - beta * r["kl_nats"]} for r in readings]
    panels = [c for c in RL_CURVES if c[2] in readings[-1]]
    fig, axes = plt.subplots(2, 3, figsize=(14, 6.4))
    for ax, (name, batch_key, key) in zip(axes.flat, panels, strict=False):
        if batch_key and (batch_key != "reward" or proxy == "reward-model score"):
            label = "training batches" + (" (no KL term)" if batch_key == "reward" else "")
            ax.plot(*series(history, batch_key), color="C0", alpha=0.6, label=label)
        shown = [r for r in readings if key in r]
        ax.plot([r["step"] for r in shown], [r[key] for r in shown], "o-", color="C1", label="held-out prompts")
        ax.set_title(name.format(proxy=proxy), fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    return _done(fig, *list(axes.flat)[: len(panels)])


def plot_experiment(rows: list[dict], title: str) -> Figure:
    """Notebook 04's runs, a colour a run: held-out reward accuracy (dots) and, with a code judge, the better-answer
    rate (squares) against the KL to the reference and against mean answer length (from 0: a token or two looks so)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, xlabel in (
        (axes[0], "kl_nats", "KL(policy ‖ reference), nats per sampled answer"),
        (axes[1], "mean_answer_tokens", "mean sampled answer length (tokens)"),
    ):
        for i, r in enumerate(rows):
            ax.scatter(r[key], r["reward_accuracy"], color=f"C{i}", s=45)
            if r.get("better_answer_rate") is not None:
                ax.scatter(r[key], r["better_answer_rate"], s=45, marker="s", facecolors="none", edgecolors=f"C{i}")
        ax.set(xlabel=xlabel, ylabel="share, held-out", ylim=(-0.02, 1.08))
    axes[0].set_xscale("symlog", linthresh=1.0)  # KL spans orders of magnitude across β; an estimate can be < 0
    kls = [r["kl_nats"] for r in rows]
    axes[0].set_xlim(min(0.0, *kls), 2 * max(1.0, *kls))
    axes[1].set_xlim(0, 1.15 * max(r["mean_answer_tokens"] for r in rows))
    handles = [Line2D([], [], color=f"C{i}", marker="o", ls="", label=r["label"]) for i, r in enumerate(rows)]
    handles.append(Line2D([], [], color="grey", marker="o", ls="", label="reward accuracy"))
    handles.append(Line2D([], [], color="grey", marker="s", mfc="none", ls="", label="better-answer rate"))
    axes[1].legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title)
    return _done(fig, *axes, legend=False)


def plot_deltas(deltas: dict[str, list[float]]) -> Figure:
    """Histogram of |Δ log-probability| per answer token, one series a model (log axis: Δ spans decades)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    values = {name: np.abs(np.asarray(v)) + 1e-9 for name, v in deltas.items()}
    edges = np.logspace(-9, np.log10(max(v.max() for v in values.values())) + 0.1, 40)
    for name, v in values.items():
        ax.hist(v, bins=edges, alpha=0.6, label=name)
    ax.set(xscale="log", ylabel="answer tokens")
    ax.set_xlabel("|Δ log-probability| against the 4-bit model + adapter (exact zeros drawn at 1e-9)")
    return _done(fig, ax)


def plot_dpo_loss_vs_margin(betas: tuple[float, ...] | list[float]) -> Figure:
    """DPO's loss (left) and how hard its gradient pushes, −d loss/dm = β σ(−β m) by autograd (right), against the
    log-ratio margin m, one curve per β. The loss axis stops at 3 × log 2: training starts at log 2 (m = 0) and goes
    down; the steep rise for m < 0 would only squash that region."""
    fig, (ax_loss, ax_push) = plt.subplots(1, 2, figsize=(12.0, 4.2))
    margins = torch.linspace(-30, 30, 401, dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros_like(margins)
    for beta in betas:
        # A pair whose rejected log-ratio is 0 and whose chosen log-ratio is the margin.
        losses, _, _ = dpo_loss(margins, zeros, zeros, zeros, beta)
        (push,) = torch.autograd.grad(-losses.sum(), margins)
        ax_loss.plot(margins.detach(), losses.detach(), label=f"$\\beta$ = {beta:g}")
        ax_push.plot(margins.detach(), push, label=f"$\\beta$ = {beta:g}")
    ax_loss.axhline(math.log(2), color="grey", linestyle=":", linewidth=1)
    ax_loss.annotate("log 2 at m = 0", (0, math.log(2)), xytext=(6, 1.1), fontsize=9, arrowprops={"arrowstyle": "->"})
    ax_loss.set(ylabel="DPO loss", ylim=(0, 3 * math.log(2)))
    ax_loss.set_title("Loss: larger $\\beta$, steeper and sooner flat", fontsize=11)
    ax_push.set(ylabel="push on the margin, $\\beta\\,\\sigma(-\\beta\\, m)$", ylim=(0, 1.05 * max(betas)))
    ax_push.set_title("Gradient: fades once $m$ exceeds a few $1/\\beta$", fontsize=11)
    for ax in (ax_loss, ax_push):
        ax.set_xlabel("log-ratio margin $m$ = chosen log-ratio $-$ rejected log-ratio (nats)")
    return _done(fig, ax_loss, ax_push)
