"""TRL's own DPO loss code run on given log-probs: the check of `helpers.theory`'s formulas against the library.

`trl_batch_loss` runs `DPOTrainer._compute_loss` unmodified, for any `loss_type`, on per-token log-probs of the same
shapes `helpers.theory.rpo_loss` takes; `trl_dpo_loss` gives the same quantities as `helpers.theory.dpo_loss`. The
trainer is built without a model or a dataset (`_bare_dpo_trainer`); TRL is imported only when one is called.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
import torch.nn.functional as F

__all__ = ["trl_batch_loss", "trl_dpo_loss"]


class _SingleProcess:
    """Stands in for `accelerate.Accelerator` in one process, where a gather returns its input."""

    device = torch.device("cpu")

    @staticmethod
    def gather(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    gather_for_metrics = gather


class _FixedLogProbs(torch.nn.Module):
    """Stands in for the policy: forward returns given per-token log-probs, as TRL's fused LM head does (0 where
    the label is ignored, i.e. outside the completion)."""

    def __init__(self, per_token_logps: torch.Tensor):
        super().__init__()
        self.per_token_logps = per_token_logps

    def forward(self, labels: torch.Tensor, **kwargs) -> SimpleNamespace:
        logps = self.per_token_logps * (labels[:, 1:] != -100)
        zeros = torch.zeros_like(logps)
        # entropy, mean_logits and is_top1 only feed TRL's logged metrics, not the loss or the rewards.
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _bare_dpo_trainer(beta: float, loss_type: tuple[str, ...], loss_weights: tuple[float, ...] | None) -> object:
    """A `DPOTrainer` built without `__init__` (which needs a model and a dataset): its loss settings are copied
    from a real `DPOConfig` as `__init__` copies them; the accelerator is a single-process stand-in."""
    from trl import DPOConfig, DPOTrainer  # imported here: TRL takes seconds to import and only this needs it

    args = DPOConfig(
        beta=beta,
        loss_type=list(loss_type),
        loss_weights=list(loss_weights) if loss_weights else None,
        precompute_ref_log_probs=True,
        bf16=False,
        report_to="none",
    )
    trainer = object.__new__(DPOTrainer)
    trainer.args = args
    trainer.beta = args.beta
    trainer.precompute_ref_logps = args.precompute_ref_log_probs
    trainer.loss_types = args.loss_type
    trainer.loss_weights = args.loss_weights or [1.0] * len(args.loss_type)
    trainer.ld_alpha = args.ld_alpha
    trainer.f_divergence_type = args.f_divergence_type
    trainer.f_alpha_divergence_coef = args.f_alpha_divergence_coef
    trainer.label_smoothing = args.label_smoothing
    trainer.use_weighting = args.use_weighting
    trainer.aux_loss_enabled = False  # a dense Llama has no router loss
    trainer.accelerator = _SingleProcess()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    return trainer


def trl_batch_loss(
    policy_chosen_token_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    policy_rejected_token_logps: torch.Tensor,
    rejected_mask: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: tuple[str, ...] = ("sigmoid",),
    loss_weights: tuple[float, ...] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch as TRL's own `DPOTrainer._compute_loss` computes it, for any `loss_type`.

    TRL 1.15 has no standalone loss function: the loss lives in that method, which runs the model, sums the
    per-token log-probs of each completion, takes the reference log-probs from the batch (with
    `precompute_ref_log_probs=True`), applies each loss type, adds them with `loss_weights`, and logs the
    implicit rewards. Here it runs unmodified on a `DPOTrainer` object set up from a real `DPOConfig` (see
    `_bare_dpo_trainer`), with a stand-in model whose forward returns the given per-token log-probs.

    Args:
        policy_chosen_token_logps, chosen_mask, policy_rejected_token_logps, rejected_mask,
        ref_chosen_logps, ref_rejected_logps, beta: as in `rpo_loss`; the two answers are padded to one width.
        loss_type, loss_weights: as `DPOConfig` takes them, e.g. ("sigmoid", "sft").

    Returns:
        (loss, metrics): the scalar loss the method returns, and what it logs for the batch (`rewards/chosen`,
        `rewards/rejected`, `rewards/margins`, `rewards/accuracies`, `logps/chosen`, ...).
    """
    width = max(chosen_mask.shape[1], rejected_mask.shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]))

    trainer = _bare_dpo_trainer(beta, loss_type, loss_weights)
    # The batch is [chosen rows, rejected rows], each a prompt token followed by the completion tokens.
    answers = torch.cat([pad(chosen_mask), pad(rejected_mask)]).long()
    completion_mask = F.pad(answers, (1, 0))
    trainer.model = _FixedLogProbs(torch.cat([pad(policy_chosen_token_logps), pad(policy_rejected_token_logps)]))
    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same quantities as `dpo_loss`, computed by TRL's own `DPOTrainer._compute_loss` (`trl_batch_loss`).

    Each pair is its own batch of one completion token per answer, because TRL returns only the batch mean: the
    loss is what the method returns, the rewards are what it logs as `rewards/chosen` and `rewards/rejected`.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: as in `dpo_loss`,
            shape (B,).
        beta: β.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each shape (B,).
    """
    one_token = torch.ones(1, 1)
    losses, chosen, rejected = [], [], []
    pairs = zip(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, strict=True)
    for pc, pr, rc, rr in pairs:
        loss, logged = trl_batch_loss(
            pc.reshape(1, 1), one_token, pr.reshape(1, 1), one_token, rc.reshape(1), rr.reshape(1), beta
        )
        losses.append(loss)
        chosen.append(logged["rewards/chosen"])
        rejected.append(logged["rewards/rejected"])
    dtype = policy_chosen_logps.dtype
    return torch.stack(losses), torch.tensor(chosen, dtype=dtype), torch.tensor(rejected, dtype=dtype)
