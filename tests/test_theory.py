"""helpers.theory, trl_loss, qlora and diagrams: DPO loss, RLHF optimum, LoRA counts, 4-bit memory, pictures."""

import math

import pytest
import torch

from helpers.config import LORA_TARGET_MODULES
from helpers.diagrams import draw_dpo_pipeline, draw_rlhf_pipeline, draw_sft_pipeline, plot_dpo_loss_vs_margin
from helpers.qlora import (
    LLAMA_31_8B,
    ModelShapes,
    lora_trainable_params,
    nf4_bytes,
    peft_lora_param_counts,
    quantized_memory_gb,
    total_params,
)
from helpers.theory import bradley_terry_prob, dpo_loss, kl_regularised_objective, optimal_policy
from helpers.trl_loss import trl_dpo_loss


def random_logps(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Four (n,) tensors of sequence log-probs in a realistic range (tens of nats, negative)."""
    g = torch.Generator().manual_seed(seed)
    return [(-40 + 15 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype) for _ in range(4)]


# --------------------------------------------------------------------------------------------------
# DPO loss
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_dpo_loss_is_log2_at_zero_margin(beta):
    chosen, rejected = torch.tensor([-12.0, -3.0]), torch.tensor([-20.0, -5.0])
    # Policy equal to the reference: every log-ratio is 0, so the margin is 0 whatever the log-probs.
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, chosen, rejected, beta)
    torch.testing.assert_close(losses, torch.full((2,), math.log(2)))
    assert chosen_rewards.abs().max() == 0 and rejected_rewards.abs().max() == 0


def test_dpo_loss_known_value():
    # chosen log-ratio -10 - (-20) = 10, rejected log-ratio 0: β·margin = 1, loss = log(1 + e^-1).
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        torch.tensor([-10.0]), torch.tensor([-30.0]), torch.tensor([-20.0]), torch.tensor([-30.0]), beta=0.1
    )
    torch.testing.assert_close(losses, torch.tensor([math.log1p(math.exp(-1))]))
    torch.testing.assert_close(chosen_rewards, torch.tensor([1.0]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([0.0]))


def test_dpo_loss_swapping_chosen_and_rejected():
    pc, pr, rc, rr = random_logps(32)
    beta = 0.3
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta)
    swapped, swapped_chosen, swapped_rejected = dpo_loss(pr, pc, rr, rc, beta)
    torch.testing.assert_close(swapped_chosen, rejected_rewards)
    torch.testing.assert_close(swapped_rejected, chosen_rewards)
    # softplus(-z) - softplus(z) = -z with z = β·margin.
    torch.testing.assert_close(losses - swapped, -(chosen_rewards - rejected_rewards))
    assert ((losses < math.log(2)) == (chosen_rewards > rejected_rewards)).all()


def test_dpo_loss_depends_on_beta_times_margin():
    pc, pr, rc, rr = random_logps(32, seed=1)
    beta = 0.25
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta)
    scaled, scaled_chosen, _ = dpo_loss(beta * pc, beta * pr, beta * rc, beta * rr, 1.0)
    torch.testing.assert_close(losses, scaled)
    torch.testing.assert_close(chosen_rewards, scaled_chosen)
    more, _, _ = dpo_loss(pc, pr, rc, rr, 2 * beta)
    wins = chosen_rewards > rejected_rewards
    # A larger β sharpens the sigmoid: won pairs lose less, lost pairs lose more.
    assert (more[wins] < losses[wins]).all() and (more[~wins] > losses[~wins]).all()


def test_dpo_loss_is_bradley_terry_nll_of_implicit_rewards():
    losses, chosen_rewards, rejected_rewards = dpo_loss(*random_logps(16, seed=2), 0.1)
    torch.testing.assert_close(losses, -bradley_terry_prob(chosen_rewards, rejected_rewards).log())


@pytest.mark.parametrize(("beta", "dtype"), [(0.1, torch.float64), (0.5, torch.float32), (2.0, torch.float64)])
def test_dpo_loss_matches_trl(beta, dtype):
    logps = random_logps(48, seed=3, dtype=dtype)
    ours = dpo_loss(*logps, beta)
    trl = trl_dpo_loss(*logps, beta)
    for mine, theirs in zip(ours, trl, strict=True):
        assert theirs.shape == (48,) and theirs.dtype == dtype
        assert (mine - theirs).abs().max().item() < 1e-6
    assert trl[0].std() > 0.1  # the pairs really differ: the agreement is not between constants


def test_trl_dpo_loss_notices_a_wrong_reference():
    pc, pr, rc, rr = random_logps(8, seed=4)
    with_ref, _, _ = trl_dpo_loss(pc, pr, rc, rr, 0.1)
    swapped_ref, _, _ = trl_dpo_loss(pc, pr, rr, rc, 0.1)
    assert (with_ref - swapped_ref).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# The KL-regularised objective and its optimum
# --------------------------------------------------------------------------------------------------


def test_optimal_policy_maximises_kl_regularised_objective():
    g = torch.Generator().manual_seed(5)
    ref = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), dim=0)
    rewards = torch.randn(6, generator=g, dtype=torch.float64)
    beta = 0.5
    best = kl_regularised_objective(optimal_policy(ref, rewards, beta), ref, rewards, beta)
    for _ in range(200):
        other = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64) * 2, dim=0)
        assert kl_regularised_objective(other, ref, rewards, beta) < best
    # The optimum is β log Z(x): log-sum-exp of the rewards under the reference.
    torch.testing.assert_close(best, beta * torch.logsumexp(ref.log() + rewards / beta, dim=0))


def test_implicit_reward_of_optimal_policy_is_reward_up_to_a_constant():
    g = torch.Generator().manual_seed(6)
    ref = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), dim=0)
    rewards = torch.randn(5, generator=g, dtype=torch.float64)
    beta = 0.2
    implicit = beta * (optimal_policy(ref, rewards, beta).log() - ref.log())
    gap = rewards - implicit  # β log Z(x), the same for every response
    torch.testing.assert_close(gap, gap[0].expand(5))


# --------------------------------------------------------------------------------------------------
# Parameters and LoRA
# --------------------------------------------------------------------------------------------------


def test_llama_31_8b_counts():
    assert total_params(LLAMA_31_8B) == 8_030_261_248
    lora = lora_trainable_params(LLAMA_31_8B, r=16, target_modules=LORA_TARGET_MODULES)
    assert lora == 41_943_040
    assert round(100 * lora / total_params(LLAMA_31_8B), 2) == 0.52


def test_lora_count_is_linear_in_rank_and_sums_over_modules():
    attn = lora_trainable_params(LLAMA_31_8B, 8, ("q_proj", "k_proj", "v_proj", "o_proj"))
    mlp = lora_trainable_params(LLAMA_31_8B, 8, ("gate_proj", "up_proj", "down_proj"))
    assert attn + mlp == lora_trainable_params(LLAMA_31_8B, 16, LORA_TARGET_MODULES) // 2
    assert lora_trainable_params(LLAMA_31_8B, 1, ("k_proj",)) == 32 * (4096 + 1024)


def test_lora_unknown_module_raises():
    with pytest.raises(ValueError, match="lm_head"):
        lora_trainable_params(LLAMA_31_8B, 16, ("q_proj", "lm_head"))


def test_counts_agree_with_peft():
    small = ModelShapes(256, 3, 688, 8, 2, 32, 1000)
    for shapes in (small, LLAMA_31_8B):
        trainable, everything = peft_lora_param_counts(shapes, 16, LORA_TARGET_MODULES)
        assert trainable == lora_trainable_params(shapes, 16, LORA_TARGET_MODULES)
        assert everything == total_params(shapes) + trainable


# --------------------------------------------------------------------------------------------------
# 4-bit memory
# --------------------------------------------------------------------------------------------------


def test_nf4_bytes_match_bitsandbytes():
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(512, 1024, dtype=torch.bfloat16)
    packed, state = functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    expected = nf4_bytes(weight.numel())
    nbytes = {
        "weights": packed.numel() * packed.element_size(),
        "absmax": state.absmax.numel() * state.absmax.element_size(),
        "absmax2": state.state2.absmax.numel() * state.state2.absmax.element_size(),
        "tables": 4 * (state.code.numel() + state.state2.code.numel() + 1),
    }
    assert nbytes == expected


def test_quantized_memory_llama_31_8b():
    gb = quantized_memory_gb()
    total = gb.pop("total")
    assert total == pytest.approx(sum(gb.values()))
    assert 5.6 < total < 5.8
    # 4 bits per linear weight; embeddings and lm_head, 2 × 128256 × 4096 in bf16, are over a third of it all.
    linear = total_params(LLAMA_31_8B) - 2 * 128256 * 4096 - 65 * 4096
    assert gb["linear weights (NF4, 4 bit)"] == pytest.approx(linear / 2 / 1e9)
    assert gb["embed_tokens + lm_head (bf16)"] == pytest.approx(2 * 2 * 128256 * 4096 / 1e9)
    assert gb["absmax, 1 per 64 (uint8)"] == pytest.approx(linear / 64 / 1e9)


def test_quantized_memory_grows_with_smaller_blocks():
    assert quantized_memory_gb(blocksize=32)["total"] > quantized_memory_gb(blocksize=64)["total"]


# --------------------------------------------------------------------------------------------------
# Diagrams
# --------------------------------------------------------------------------------------------------


def texts(fig) -> str:
    return "\n".join(t.get_text() for ax in fig.axes for t in ax.texts)


@pytest.mark.parametrize(
    ("draw", "labels"),
    [
        (draw_sft_pipeline, ["Demonstrations", "Base model", "SFT: minimise", "SFT model"]),
        (
            draw_rlhf_pipeline,
            ["Preference pairs", "Reward model", "Bradley-Terry", "Policy", "PPO", "Reference"],
        ),
        (draw_dpo_pipeline, ["Preference pairs", "SFT model", "Policy", "Reference", "DPO loss"]),
    ],
)
def test_pipeline_diagrams(draw, labels, tmp_path):
    fig = draw()
    shown = texts(fig)
    for label in labels:
        assert label in shown
    assert "Reward model" not in shown or draw is draw_rlhf_pipeline
    assert not list(tmp_path.iterdir())
    draw(tmp_path / "pipeline.png")
    assert (tmp_path / "pipeline.png").stat().st_size > 10_000


def test_plot_dpo_loss_vs_margin():
    betas = (0.1, 0.5, 1.0)
    fig = plot_dpo_loss_vs_margin(betas, max_margin=20.0)
    ax_loss, ax_push = fig.axes
    curves = [line for line in ax_loss.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in curves] == [f"$\\beta$ = {b:g}" for b in betas]
    for beta, loss_line, push_line in zip(betas, curves, ax_push.get_lines(), strict=True):
        x, loss, push = loss_line.get_xdata(), loss_line.get_ydata(), push_line.get_ydata()
        middle = len(x) // 2
        assert x[middle] == pytest.approx(0, abs=1e-5) and loss[middle] == pytest.approx(math.log(2))
        assert push[0] == pytest.approx(beta / (1 + math.exp(-beta * 20.0)), rel=1e-5)  # β σ(β · 20)
        assert push[middle] == pytest.approx(beta / 2)
