"""helpers.theory: the DPO and RPO losses against TRL's own loss code, the RLHF optimum, summed vs mean log-probs, β
under Adam, LoRA counts, 4-bit memory and NF4's levels (RLOO's loss against TRL's: tests/test_rl.py)."""

import math

import pytest
import torch

from helpers.settings import LORA_TARGET_MODULES
from helpers.theory import (
    LLAMA_31_8B,
    ModelShapes,
    bradley_terry_prob,
    dpo_loss,
    kl_regularised_objective,
    linear_shapes,
    lora_trainable_params,
    nf4_bytes,
    nf4_levels,
    nf4_quantize,
    optimal_policy,
    optimise_margin,
    quantized_memory_gb,
    rpo_loss,
    summed_logps,
    token_mean_nll,
    total_params,
    toy_token_logps,
    trl_batch_loss,
    trl_dpo_loss,
)


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


def test_library_counts_are_the_arithmetic():
    small = ModelShapes(256, 3, 688, 8, 2, 32, 1000)
    for shapes in (small, LLAMA_31_8B):
        per_layer = sum(16 * (d_in + d_out) for d_in, d_out in linear_shapes(shapes).values())  # r (d_in + d_out)
        assert lora_trainable_params(shapes, 16, LORA_TARGET_MODULES) == shapes.num_hidden_layers * per_layer
        embeddings, norms = (
            2 * shapes.vocab_size * shapes.hidden_size,
            (2 * shapes.num_hidden_layers + 1) * shapes.hidden_size,
        )
        linear = shapes.num_hidden_layers * sum(d_in * d_out for d_in, d_out in linear_shapes(shapes).values())
        assert total_params(shapes) == embeddings + norms + linear


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
