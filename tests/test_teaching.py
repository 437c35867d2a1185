"""What notebook 01 teaches and the plots the notebooks show: RPO against TRL, summed vs mean log-probs, β under
Adam, NF4's levels, the RLHF diagram's four models, and the loss, memory, rate and NF4 plots."""

import math

import pytest
import torch

from helpers import plots
from helpers.diagrams import draw_rlhf_pipeline, plot_dpo_loss_vs_margin
from helpers.memory import MemoryCallback
from helpers.qlora import nf4_levels, nf4_quantize
from helpers.theory import dpo_loss, optimise_margin, rpo_loss, summed_logps, token_mean_nll, toy_token_logps
from helpers.trl_loss import trl_batch_loss


def batch(n: int = 24, seed: int = 0, policy_shift: float = 0.0):
    """Per-token log-probs of chosen and rejected answers, and reference log-probs moved by `policy_shift`."""
    chosen, chosen_mask = toy_token_logps(n, max_tokens=20, seed=seed)
    rejected, rejected_mask = toy_token_logps(n, max_tokens=31, seed=seed + 1)  # another width: padding is exercised
    g = torch.Generator().manual_seed(seed + 2)
    ref_chosen = summed_logps(chosen, chosen_mask) + policy_shift * torch.randn(n, generator=g)
    ref_rejected = summed_logps(rejected, rejected_mask) + policy_shift * torch.randn(n, generator=g)
    return (chosen, chosen_mask, rejected, rejected_mask), ref_chosen, ref_rejected


# --------------------------------------------------------------------------------------------------
# Summed and mean log-probs, RPO
# --------------------------------------------------------------------------------------------------


def test_summed_and_mean_log_probs():
    logps = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(summed_logps(logps, mask), torch.tensor([-3.0, -1.5]))
    # SFT's mean is over all answer tokens of the batch (token-weighted), not a mean of per-answer means.
    torch.testing.assert_close(token_mean_nll(logps, mask), torch.tensor(4.5 / 5))


def test_toy_token_logps_are_log_probs_of_answers_of_random_length():
    logps, mask = toy_token_logps(200, max_tokens=12, seed=3)
    lengths = mask.sum(-1)
    assert (logps <= 0).all() and (logps[mask == 0] == 0).all() and (logps[mask == 1] < 0).any()
    assert lengths.min() >= 1 and lengths.max() <= 12 and len(set(lengths.tolist())) > 6
    assert (mask[:, :-1] >= mask[:, 1:]).all()  # each answer is a prefix: no holes


@pytest.mark.parametrize("shift", [0.0, 3.0])
def test_rpo_loss_matches_trl(shift):
    answers, ref_chosen, ref_rejected = batch(policy_shift=shift)
    loss, sigmoid_term, nll_term = rpo_loss(*answers, ref_chosen, ref_rejected, beta=0.3)
    trl, logged = trl_batch_loss(*answers, ref_chosen, ref_rejected, 0.3, ("sigmoid", "sft"))
    assert abs(loss - trl) < 1e-5
    assert nll_term == pytest.approx(token_mean_nll(answers[0], answers[1]).item())
    policy_chosen, policy_rejected = summed_logps(*answers[:2]), summed_logps(*answers[2:])
    _, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.3)
    assert logged["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=1e-5)
    assert logged["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=1e-5)


def test_rpo_nll_weight_is_trls_loss_weight():
    answers, ref_chosen, ref_rejected = batch(policy_shift=1.0, seed=5)
    loss, sigmoid_term, nll_term = rpo_loss(*answers, ref_chosen, ref_rejected, 0.1, nll_weight=0.25)
    trl, _ = trl_batch_loss(*answers, ref_chosen, ref_rejected, 0.1, ("sigmoid", "sft"), (1.0, 0.25))
    assert abs(loss - trl) < 1e-5 and loss == pytest.approx((sigmoid_term + 0.25 * nll_term).item())
    plain, _ = trl_batch_loss(*answers, ref_chosen, ref_rejected, 0.1, ("sigmoid",))
    assert abs(plain - sigmoid_term) < 1e-5  # the summed-log-prob DPO term, through TRL's padding and masks


def test_step0_loss_is_log2_plus_the_nll():
    answers, ref_chosen, ref_rejected = batch(policy_shift=0.0, seed=7)
    loss, sigmoid_term, nll_term = rpo_loss(*answers, ref_chosen, ref_rejected, 0.1)
    trl, logged = trl_batch_loss(*answers, ref_chosen, ref_rejected, 0.1, ("sigmoid", "sft"))
    assert sigmoid_term.item() == pytest.approx(math.log(2), rel=1e-6)
    assert nll_term > 0.5 and loss.item() == pytest.approx(math.log(2) + nll_term.item(), rel=1e-6)
    assert abs(trl - loss) < 1e-5 and logged["rewards/margins"] == 0.0


def test_summed_log_ratios_make_dpo_length_sensitive_and_trls_norm_variant_is_not():
    # The policy lowers every token of both answers by the same 0.1 nats; the rejected answer is 8× longer.
    lengths = torch.tensor([[5], [40]])
    mask = (torch.arange(40) < lengths).float()
    reference = -torch.ones(2, 40) * mask
    policy = reference - 0.1 * mask
    ref_w, ref_l = summed_logps(reference, mask)
    answers = (policy[:1], mask[:1], policy[1:], mask[1:])
    summed, _ = trl_batch_loss(*answers, ref_w.reshape(1), ref_l.reshape(1), 0.1, ("sigmoid",))
    normalised, _ = trl_batch_loss(*answers, ref_w.reshape(1), ref_l.reshape(1), 0.1, ("sigmoid_norm",))
    assert summed.item() == pytest.approx(math.log1p(math.exp(-0.1 * 3.5)), rel=1e-5)  # margin −0.5 + 4.0 = 3.5
    assert normalised.item() == pytest.approx(math.log(2), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# β under Adam; the infinite optimum
# --------------------------------------------------------------------------------------------------


def test_adam_step_size_does_not_depend_on_beta_but_sgd_does():
    for beta in (0.05, 0.5, 5.0):
        assert optimise_margin(beta, 1, lr=0.1)[0] == pytest.approx(0.1)  # Adam's first step is lr
        assert optimise_margin(beta, 1, lr=0.1, optimizer="sgd")[0] == pytest.approx(0.1 * beta / 2)


def test_larger_beta_saturates_sooner_under_adam():
    final = [optimise_margin(beta, 200, lr=0.1)[-1] for beta in (0.1, 0.5, 1.0)]
    assert final[0] > final[1] > final[2] > 1.0
    trajectory = optimise_margin(0.1, 200, lr=0.1)
    assert all(b > a for a, b in zip(trajectory, trajectory[1:], strict=False))  # never stops: no finite optimum


def test_dpo_loss_has_no_finite_minimum():
    m = torch.tensor([1.0, 10.0, 50.0, 200.0], dtype=torch.float64)
    for beta in (0.1, 1.0):
        losses = dpo_loss(m, 0 * m, 0 * m, 0 * m, beta)[0]
        assert (losses > 0).all() and (losses[1:] < losses[:-1]).all()


# --------------------------------------------------------------------------------------------------
# NF4
# --------------------------------------------------------------------------------------------------


def test_nf4_levels():
    levels = nf4_levels()
    assert len(levels) == 16 and (levels[1:] > levels[:-1]).all()
    assert (levels < 0).sum() == 7 and (levels == 0).sum() == 1 and (levels > 0).sum() == 8
    assert levels[0] == -1 and levels[-1] == 1


def test_nf4_quantize_unpacks_what_bitsandbytes_stores():
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = 0.02 * torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    scaled, codes = nf4_quantize(weight)
    levels = nf4_levels()
    assert codes.shape == scaled.shape == (weight.numel(),) and scaled.abs().max() == pytest.approx(1.0)
    assert (codes == (scaled[:, None] - levels).abs().argmin(1)).all()  # the nearest level
    packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    dequantized = functional.dequantize_4bit(packed, state).flatten()
    torch.testing.assert_close(dequantized, (levels[codes].reshape(-1, 64) * state.absmax[:, None]).flatten())
    shares = torch.bincount(codes, minlength=16) / codes.numel()
    assert shares.min() > 0.01 and shares.max() < 0.12  # roughly equal use on normal weights


# --------------------------------------------------------------------------------------------------
# Diagrams
# --------------------------------------------------------------------------------------------------


def test_rlhf_diagram_shows_the_four_models_of_ppo():
    shown = "\n".join(t.get_text() for ax in draw_rlhf_pipeline().axes for t in ax.texts)
    for model in ("Policy", "Reference", "Reward model", "Value model"):
        assert model in shown


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
    (ax,) = plots.plot_dpo_loss(history, window=3, step0_loss=3.2).axes
    lines = labelled(ax)
    assert list(lines["logged"].get_ydata()) == [3.0 - s / 10 for s in range(1, 11)]
    assert lines["mean of last 3 logs"].get_ydata()[-1] == pytest.approx((2.0 + 2.1 + 2.2) / 3)
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


def test_memory_callback_resets_the_gpu_peak_when_training_begins(monkeypatch):
    resets = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: resets.append(a))
    MemoryCallback().on_train_begin(None, None, None)
    assert resets == [()]


def error_bar_ends(ax) -> list[tuple[float, float]]:
    (segments,) = [c for c in ax.collections if hasattr(c, "get_segments")]
    return [(float(s[0][1]), float(s[1][1])) for s in segments.get_segments()]


def test_rates_plot_draws_the_intervals():
    rates = {"base": {"mean": 0.1, "low": 0.05, "high": 0.2}, "dpo": {"mean": 0.8, "low": 0.7, "high": 0.9}}
    (ax,) = plots.plot_rates(rates, "better-answer rate", reference=0.5).axes
    assert error_bar_ends(ax) == [pytest.approx((0.05, 0.2)), pytest.approx((0.7, 0.9))]
    assert [p.get_height() for p in ax.patches] == [0.1, 0.8]


def test_eval_plot_uses_intervals_from_metrics():
    evaluation = {
        "sft": {"better_answer_rate": 0.3, "better_answer_rate_ci": [0.2, 0.4], "mean_response_tokens": 20.0},
        "dpo": {"better_answer_rate": 0.9, "better_answer_rate_ci": [0.8, 0.95], "mean_response_tokens": 6.0},
    }
    assert plots.rates_from_eval(evaluation, "better_answer_rate") == {
        "sft": {"mean": 0.3, "low": 0.2, "high": 0.4},
        "dpo": {"mean": 0.9, "low": 0.8, "high": 0.95},
    }
    rate_ax, length_ax = plots.plot_eval(evaluation).axes
    assert error_bar_ends(rate_ax) == [pytest.approx((0.2, 0.4)), pytest.approx((0.8, 0.95))]
    assert not [c for c in length_ax.collections if hasattr(c, "get_segments")]


def test_nf4_plot():
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    left, right = plots.plot_nf4(weight).axes
    assert len(left.get_lines()) == 16  # one vertical line per level
    heights = [p.get_height() for p in right.patches]
    assert len(heights) == 16 and sum(heights) == pytest.approx(1.0)
