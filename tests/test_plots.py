"""helpers.plots: the loss, memory, rate, evaluation, NF4 and RL pictures the notebooks show read the numbers they are
given, and DPO's loss against the margin shows the region that matters."""

import math

import pytest
import torch

from helpers import plots
from helpers.plots import plot_dpo_loss_vs_margin


def test_plot_dpo_loss_vs_margin():
    betas = (0.1, 0.5, 1.0)
    fig = plot_dpo_loss_vs_margin(betas)
    ax_loss, ax_push = fig.axes
    curves = [line for line in ax_loss.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in curves] == [f"$\\beta$ = {b:g}" for b in betas]
    for beta, loss_line, push_line in zip(betas, curves, ax_push.get_lines(), strict=True):
        x, loss, push = loss_line.get_xdata(), loss_line.get_ydata(), push_line.get_ydata()
        middle = len(x) // 2
        assert x[middle] == pytest.approx(0, abs=1e-5) and loss[middle] == pytest.approx(math.log(2))
        assert push[0] == pytest.approx(beta / (1 + math.exp(-beta * 30.0)), rel=1e-5)  # β σ(β · 30)
        assert push[middle] == pytest.approx(beta / 2)


def test_beta_plot_shows_the_region_that_matters():
    ax_loss, ax_push = plot_dpo_loss_vs_margin((0.1, 1.0)).axes
    assert ax_loss.get_ylim() == pytest.approx((0, 3 * math.log(2)))
    assert ax_push.get_ylim()[1] == pytest.approx(1.05)
    assert "log-ratio margin" in ax_loss.get_xlabel()


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def labelled(ax) -> dict[str, object]:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_moving_average():
    assert plots.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_dpo_loss_plot_has_log2_smoothing_and_step0():
    history = [{"step": 0, "eval_loss": 3.0}] + [{"step": s, "loss": 3.0 - s / 10} for s in range(1, 11)]
    (ax,) = plots.plot_dpo_loss(history, step0_loss=3.2).axes
    lines = labelled(ax)
    assert list(lines["logged"].get_ydata()) == [3.0 - s / 10 for s in range(1, 11)]
    assert lines["mean of last 5 logs"].get_ydata()[-1] == pytest.approx((2.0 + 2.1 + 2.2 + 2.3 + 2.4) / 5)
    assert lines["log 2 (sigmoid term at step 0)"].get_ydata()[0] == pytest.approx(math.log(2))
    assert lines["step-0 eval loss 3.200"].get_ydata()[0] == 3.2


def memory_history(gpu: bool) -> list[dict]:
    records = [{"step": 0, "eval_loss": 1.0, "memory/cpu_rss_gib": 9.0}]  # an evaluation: not training
    for s in (5, 10):
        r = {"step": s, "loss": 1.0, "memory/cpu_rss_gib": 1.0 + s / 100}
        if gpu:
            r |= {"memory/gpu_allocated_gib": 5.0, "memory/gpu_reserved_gib": 6.0}
            r |= {"memory/gpu_peak_allocated_gib": 7.0, "memory/gpu_total_gib": 80.0}
        records.append(r)
    return records


def test_memory_plot_separates_gpu_and_cpu_with_capacity():
    gpu_ax, cpu_ax = plots.plot_memory(memory_history(gpu=True)).axes
    assert set(labelled(gpu_ax)) == {"allocated", "reserved", "peak_allocated", "capacity 80.0"}
    assert list(labelled(gpu_ax)["capacity 80.0"].get_ydata()) == [80.0, 80.0]
    assert list(labelled(cpu_ax)["process RSS"].get_ydata()) == [1.05, 1.1]  # the evaluation record is left out
    (only,) = plots.plot_memory(memory_history(gpu=False)).axes
    assert only.get_title() == "CPU memory"


def error_bar_ends(ax) -> list[tuple[float, float]]:
    (segments,) = [c for c in ax.collections if hasattr(c, "get_segments")]
    return [(float(s[0][1]), float(s[1][1])) for s in segments.get_segments()]


def test_rates_plot_reads_the_intervals_in_metrics():
    evaluation = {
        "sft": {"better_answer_rate": 0.1, "better_answer_rate_ci": [0.05, 0.2], "mean_response_tokens": 20.0},
        "dpo": {"better_answer_rate": 0.8, "better_answer_rate_ci": [0.7, 0.9], "mean_response_tokens": 6.0},
        "rl": {"mean_response_tokens": 6.0},  # no interval: no bar
    }
    (ax,) = plots.plot_rates(evaluation, "better_answer_rate", "better-answer rate", reference=0.5).axes
    assert error_bar_ends(ax) == [pytest.approx((0.05, 0.2)), pytest.approx((0.7, 0.9))]
    assert [p.get_height() for p in ax.patches] == [0.1, 0.8]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sft", "dpo"]


def test_nf4_plot():
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    left, right = plots.plot_nf4(weight).axes
    assert len(left.get_lines()) == 16  # one vertical line per level
    heights = [p.get_height() for p in right.patches]
    assert len(heights) == 16 and sum(heights) == pytest.approx(1.0)


def test_training_plot_draws_the_held_out_loss_where_it_was_measured():
    history = [{"step": s, "loss": 2.0 / s} for s in (1, 2, 3, 4)] + [
        {"step": 2, "eval_loss": 1.5},
        {"step": 4, "eval_loss": 1.0},
    ]
    (ax,) = plots.plot_training(history, "SFT").axes
    lines = labelled(ax)
    assert list(lines["training batches"].get_xdata()) == [1, 2, 3, 4]
    assert list(lines["held-out conversations"].get_ydata()) == [1.5, 1.0]


def test_rewards_plot_draws_trls_logged_rewards():
    history = [
        {"step": s, "rewards/chosen": s, "rewards/rejected": -s, "rewards/margins": 2 * s, "rewards/accuracies": 0.5}
        for s in (1, 2)
    ]
    left, right = plots.plot_rewards(history).axes
    assert list(labelled(left)["reward margin"].get_ydata()) == [2, 4]
    assert list(right.get_lines()[0].get_ydata()) == [0.5, 0.5]


def test_histograms_use_whole_token_bins_and_name_the_means():
    (ax,) = plots.plot_histograms({"sft": [3, 5, 7], "dpo": [2, 2, 4]}, "lengths", "tokens", limit=8).axes
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"limit 8", "sft (mean 5.0)", "dpo (mean 2.7)"}
    assert all(p.get_width() == pytest.approx(1.0) for p in ax.patches)  # one bin a token


def test_rl_curves_draw_the_objective_and_the_held_out_readings():
    reading = dict(reward_model_score=1.0, kl_nats=0.0, better_answer_rate=0.5, mean_response_tokens=9.0)
    readings = [
        {"step": 0, "proxy_reward": 1.0} | reading,
        {"step": 10, "proxy_reward": 2.0} | reading | {"kl_nats": 4.0},
    ]
    history = [{"step": 5, "reward": 1.5, "completions/mean_length": 8.0}]
    fig = plots.plot_rl_curves(readings, history, beta=0.2, title="RL")
    objective = fig.axes[0]
    assert objective.get_title() == "what RL maximises: reward-model score − β·KL"
    assert list(labelled(objective)["held-out prompts"].get_ydata()) == [1.0, 2.0 - 0.2 * 4.0]
    assert list(labelled(fig.axes[1])["training batches (no KL term)"].get_ydata()) == [1.5]
    assert sum(ax.axison for ax in fig.axes) == 5  # the five quantities measured (no cut share): one panel each
    hacked = plots.plot_rl_curves(readings, history, beta=0.2, title="RL", proxy="answer length (tokens)")
    assert "training batches (no KL term)" not in labelled(hacked.axes[1])  # TRL's reward is the proxy's, not the RM's
