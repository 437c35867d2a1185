"""The numbers behind notebook 01: the DPO and RPO losses, their KL-regularised origin and what β does under Adam.

Small pure functions; `helpers.trl_loss` runs TRL's own loss code on the same inputs as `dpo_loss` and `rpo_loss`,
so the formulas written here can be checked against the library that trains the model. LoRA's share, 4-bit memory
and NF4's levels are in `helpers.qlora`.

Two margins, one name each (TRL logs the second):

- the **log-ratio margin** m = log π_θ(y_w|x)/π_ref(y_w|x) − log π_θ(y_l|x)/π_ref(y_l|x), in nats, unscaled;
- the **reward margin** β·m, the difference of DPO's implicit rewards: TRL's `rewards/margins`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "bradley_terry_prob",
    "dpo_loss",
    "kl_regularised_objective",
    "optimal_policy",
    "optimise_margin",
    "rpo_loss",
    "summed_logps",
    "token_mean_nll",
    "toy_token_logps",
]


# --------------------------------------------------------------------------------------------------
# Preferences, RLHF and DPO
# --------------------------------------------------------------------------------------------------


def bradley_terry_prob(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry probability that the chosen response is preferred: σ(r_w − r_l).

    Args:
        reward_chosen: r(x, y_w), any shape.
        reward_rejected: r(x, y_l), same shape.

    Returns:
        p(y_w ≻ y_l | x), same shape.
    """
    return torch.sigmoid(reward_chosen - reward_rejected)


def kl_regularised_objective(
    policy_probs: torch.Tensor, ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float
) -> torch.Tensor:
    """The RLHF objective for one prompt over a finite set of responses: E_π[r] − β KL(π ‖ π_ref).

    Args:
        policy_probs: π(y|x) over the responses, shape (Y,), sums to 1.
        ref_probs: π_ref(y|x), shape (Y,), sums to 1.
        rewards: r(x, y), shape (Y,).
        beta: weight of the KL penalty.

    Returns:
        The objective, a scalar tensor.
    """
    kl = (policy_probs * (policy_probs.log() - ref_probs.log())).sum()
    return (policy_probs * rewards).sum() - beta * kl


def optimal_policy(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """The maximiser of `kl_regularised_objective`: π*(y|x) = π_ref(y|x) exp(r(x, y)/β) / Z(x).

    Args:
        ref_probs: π_ref(y|x), shape (Y,).
        rewards: r(x, y), shape (Y,).
        beta: weight of the KL penalty.

    Returns:
        π*(y|x), shape (Y,).
    """
    # softmax normalises by Z(x) = Σ_y π_ref(y|x) exp(r(x, y)/β), computed stably in log space.
    return torch.softmax(ref_probs.log() + rewards / beta, dim=-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss from the formula: −log σ(β[log π(y_w|x)/π_ref(y_w|x) − log π(y_l|x)/π_ref(y_l|x)]).

    Args:
        policy_chosen_logps: log π_θ(y_w|x), summed over the response tokens, shape (B,).
        policy_rejected_logps: log π_θ(y_l|x), shape (B,).
        ref_chosen_logps: log π_ref(y_w|x), shape (B,).
        ref_rejected_logps: log π_ref(y_l|x), shape (B,).
        beta: β, the KL weight of the objective DPO is derived from.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each shape (B,). The rewards are DPO's implicit rewards
        β log π_θ(y|x)/π_ref(y|x); the loss is the Bradley-Terry negative log-likelihood of their difference.
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards, rejected_rewards


def summed_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log π(y|x) as DPO uses it: the *sum* of the answer's token log-probs.

    Args:
        token_logps: log π(y_t | x, y_<t), shape (B, T), any value where `mask` is 0.
        mask: 1 on the answer's tokens, 0 on padding, shape (B, T).

    Returns:
        Shape (B,). A longer answer sums more terms: its log-prob, and any change of it, grows with its length.
    """
    return (token_logps * mask).sum(-1)


def token_mean_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The SFT loss: the negative log-prob *per token*, averaged over every answer token of the batch.

    This is how transformers computes SFT's cross-entropy and how TRL computes the `sft` term of the DPO loss
    (a token-weighted mean: a long answer counts as many tokens, not as one example).

    Args:
        token_logps, mask: as in `summed_logps`.

    Returns:
        A scalar tensor, in nats per token.
    """
    return -(token_logps * mask).sum() / mask.sum()


def rpo_loss(
    policy_chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    policy_rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    nll_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This recipe's DPO loss for one batch: DPO's sigmoid loss plus the NLL of the chosen answers (RPO).

    RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization") is TRL's `loss_type=["sigmoid", "sft"]`
    with `loss_weights=[1, nll_weight]`: the mean over pairs of `dpo_loss` (summed log-probs) plus `nll_weight`
    times `token_mean_nll` of the chosen answers (per-token mean), as `DPOTrainer._compute_loss` adds them.

    Args:
        policy_chosen_token_logps, chosen_mask: the policy's per-token log-probs of y_w and their mask, (B, T).
        policy_rejected_token_logps, rejected_mask: the same for y_l, (B, T').
        ref_chosen_logps, ref_rejected_logps: the reference's summed log-probs, (B,).
        beta: β.
        nll_weight: the weight of the NLL term (TRL's `loss_weights[1]`).

    Returns:
        (loss, sigmoid_term, nll_term), scalar tensors, loss = sigmoid_term + nll_weight * nll_term.
    """
    losses, _, _ = dpo_loss(
        summed_logps(policy_chosen_token_logps, chosen_mask),
        summed_logps(policy_rejected_token_logps, rejected_mask),
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
    )
    sigmoid_term, nll_term = losses.mean(), token_mean_nll(policy_chosen_token_logps, chosen_mask)
    return sigmoid_term + nll_weight * nll_term, sigmoid_term, nll_term


def toy_token_logps(
    n: int, max_tokens: int = 24, vocab_size: int = 64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of `n` answers of random lengths (1 to `max_tokens`), for examples without a model.

    Each token is drawn from a random next-token distribution over `vocab_size` tokens, so every value is a
    real log-probability (≤ 0, of a token the distribution would produce).

    Returns:
        (token_logps, mask), each (n, max_tokens); token_logps is 0 where mask is 0.
    """
    g = torch.Generator().manual_seed(seed)
    log_dists = torch.log_softmax(2 * torch.randn(n, max_tokens, vocab_size, generator=g), dim=-1)
    tokens = torch.multinomial(log_dists.exp().reshape(-1, vocab_size), 1, generator=g).reshape(n, max_tokens, 1)
    lengths = torch.randint(1, max_tokens + 1, (n, 1), generator=g)
    mask = (torch.arange(max_tokens) < lengths).float()
    return log_dists.gather(-1, tokens).squeeze(-1) * mask, mask


def optimise_margin(beta: float, steps: int, lr: float, optimizer: str = "adam") -> list[float]:
    """The log-ratio margin m of one pair, trained from 0 by minimising −log σ(β m) with m as the only parameter.

    A one-number stand-in for training: it shows how β and the optimizer set how far m moves, without a model.

    Args:
        beta: β.
        steps: optimizer steps.
        lr: learning rate.
        optimizer: "adam" (torch's Adam, default betas) or "sgd".

    Returns:
        m after each step.
    """
    margin = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizers = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    opt = optimizers[optimizer]([margin], lr=lr)
    zero = torch.zeros(1, dtype=torch.float64)
    trajectory = []
    for _ in range(steps):
        opt.zero_grad()
        dpo_loss(margin, zero, zero, zero, beta)[0].sum().backward()
        opt.step()
        trajectory.append(margin.item())
    return trajectory
