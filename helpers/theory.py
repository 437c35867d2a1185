"""The numbers behind notebook 01: the DPO loss, its KL-regularised origin, LoRA's share, 4-bit memory.

Small pure functions; `trl_dpo_loss` runs TRL's own loss code on the same inputs as `dpo_loss`, so the
formula written here can be checked against the library that trains the model.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

__all__ = [
    "LLAMA_31_8B",
    "ModelShapes",
    "bradley_terry_prob",
    "dpo_loss",
    "kl_regularised_objective",
    "linear_shapes",
    "lora_trainable_params",
    "nf4_bytes",
    "optimal_policy",
    "peft_lora_param_counts",
    "quantized_memory_gb",
    "total_params",
    "trl_dpo_loss",
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


class _SingleProcess:
    """Stands in for `accelerate.Accelerator` in one process, where a gather returns its input."""

    device = torch.device("cpu")

    @staticmethod
    def gather(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    gather_for_metrics = gather


class _FixedLogProbs(torch.nn.Module):
    """Stands in for the policy: forward returns given per-token log-probs, as TRL's fused LM head does."""

    def __init__(self, per_token_logps: torch.Tensor):
        super().__init__()
        self.per_token_logps = per_token_logps

    def forward(self, **kwargs) -> SimpleNamespace:
        zeros = torch.zeros_like(self.per_token_logps)
        # entropy, mean_logits and is_top1 only feed TRL's logged metrics, not the loss or the rewards.
        return SimpleNamespace(log_probs=self.per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def trl_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same quantities as `dpo_loss`, computed by TRL's own `DPOTrainer._compute_loss`.

    TRL 1.15 has no standalone loss function: the loss lives in that method, which runs the model, sums the
    per-token log-probs of each completion, takes the reference log-probs from the batch (with
    `precompute_ref_log_probs=True`), applies the `sigmoid` loss, and logs the implicit rewards. Here it runs
    unmodified on a real `DPOTrainer` object built without `__init__` (which needs a model and a
    dataset): its settings are copied from a real `DPOConfig` as `__init__` copies them; the model is a
    stand-in whose forward returns the given log-probs as one completion token per sequence; the accelerator
    is a single-process stand-in. Each pair is its own batch, because TRL returns only the batch mean: the
    loss is what the method returns, the rewards are what it logs as `rewards/chosen` and `rewards/rejected`.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: as in `dpo_loss`,
            shape (B,).
        beta: β.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each shape (B,).
    """
    from trl import DPOConfig, DPOTrainer  # imported here: TRL takes seconds to import and only this needs it

    args = DPOConfig(beta=beta, loss_type=["sigmoid"], precompute_ref_log_probs=True, bf16=False, report_to="none")
    trainer = object.__new__(DPOTrainer)
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

    # One pair = a batch of two sequences [chosen, rejected], each a prompt token then a completion token.
    input_ids = torch.zeros(2, 2, dtype=torch.long)
    completion_mask = torch.tensor([[0, 1], [0, 1]])
    losses = []
    policy_logps = torch.stack([policy_chosen_logps, policy_rejected_logps], dim=1)  # (B, 2)
    for pair_logps, ref_w, ref_l in zip(policy_logps, ref_chosen_logps, ref_rejected_logps, strict=True):
        trainer.model = _FixedLogProbs(pair_logps.unsqueeze(1))  # (2, 1): shifted sequence length is 1
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "completion_mask": completion_mask,
            "ref_chosen_logps": ref_w.reshape(1),
            "ref_rejected_logps": ref_l.reshape(1),
        }
        losses.append(trainer._compute_loss(trainer.model, inputs, return_outputs=False))
    metrics = trainer._metrics["train"]
    dtype = policy_chosen_logps.dtype
    return (
        torch.stack(losses),
        torch.tensor(metrics["rewards/chosen"], dtype=dtype),
        torch.tensor(metrics["rewards/rejected"], dtype=dtype),
    )


# --------------------------------------------------------------------------------------------------
# Parameter counts and LoRA
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShapes:
    """The shapes of a Llama decoder (names as in transformers' `LlamaConfig`)."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False


LLAMA_31_8B = ModelShapes(
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
)


def linear_shapes(shapes: ModelShapes) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of the seven linear layers in one decoder layer (Llama has no biases)."""
    d, q, kv, ff = (
        shapes.hidden_size,
        shapes.num_attention_heads * shapes.head_dim,
        shapes.num_key_value_heads * shapes.head_dim,  # grouped-query attention: fewer K/V heads
        shapes.intermediate_size,
    )
    return {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, ff),
        "up_proj": (d, ff),
        "down_proj": (ff, d),
    }


def _embedding_params(shapes: ModelShapes) -> int:
    """embed_tokens plus lm_head (one matrix when they are tied)."""
    return shapes.vocab_size * shapes.hidden_size * (1 if shapes.tie_word_embeddings else 2)


def _norm_params(shapes: ModelShapes) -> int:
    """Two RMSNorm weights per layer plus the final one."""
    return (2 * shapes.num_hidden_layers + 1) * shapes.hidden_size


def _linear_params(shapes: ModelShapes) -> int:
    return shapes.num_hidden_layers * sum(i * o for i, o in linear_shapes(shapes).values())


def total_params(shapes: ModelShapes) -> int:
    """All parameters of the model: embeddings, lm_head, the linear layers and the norms."""
    return _embedding_params(shapes) + _linear_params(shapes) + _norm_params(shapes)


def lora_trainable_params(shapes: ModelShapes, r: int, target_modules: tuple[str, ...] | list[str]) -> int:
    """Parameters LoRA trains: for each targeted W (d_in × d_out), A (r × d_in) and B (d_out × r).

    Args:
        shapes: the model's shapes.
        r: LoRA rank.
        target_modules: names from `linear_shapes`, e.g. `config.LORA_TARGET_MODULES`.

    Returns:
        The count, r · Σ (d_in + d_out) over the targeted layers of every decoder layer.

    Raises:
        ValueError: a target module is not one of the seven linear layers.
    """
    layers = linear_shapes(shapes)
    unknown = sorted(set(target_modules) - set(layers))
    if unknown:
        raise ValueError(f"target_modules {unknown} are not among the linear layers {sorted(layers)}.")
    return shapes.num_hidden_layers * sum(r * (layers[m][0] + layers[m][1]) for m in target_modules)


def peft_lora_param_counts(shapes: ModelShapes, r: int, target_modules: tuple[str, ...] | list[str]) -> tuple[int, int]:
    """Count with transformers and PEFT themselves: a `LlamaForCausalLM` of these shapes on the meta device
    (shapes only, no memory), wrapped by `get_peft_model`.

    Args:
        shapes, r, target_modules: as in `lora_trainable_params`.

    Returns:
        (trainable, all) parameters as PEFT reports them; `all` includes the adapters.
    """
    from peft import LoraConfig, get_peft_model  # imported here: seconds to import, only this needs them
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{f: getattr(shapes, f) for f in ModelShapes.__dataclass_fields__})
    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=r, target_modules=list(target_modules)))
    return model.get_nb_trainable_parameters()


# --------------------------------------------------------------------------------------------------
# 4-bit memory (bitsandbytes NF4 with double quantization)
# --------------------------------------------------------------------------------------------------


def nf4_bytes(numel: int, blocksize: int = 64, blocksize2: int = 256) -> dict[str, int]:
    """Bytes bitsandbytes stores for one weight quantized to NF4 with double quantization.

    Each block of `blocksize` weights has one absmax scale; double quantization stores those scales as
    8-bit codes, with one fp32 scale per `blocksize2` of them.

    Args:
        numel: number of weights in the tensor.
        blocksize: weights per absmax (bitsandbytes' default for 4-bit: 64).
        blocksize2: absmax values per second-level fp32 scale (256).

    Returns:
        Bytes of `weights` (4 bits each), `absmax` (uint8), `absmax2` (fp32) and `tables` (the 16-entry NF4
        code, the 256-entry 8-bit code, both fp32, and the fp32 offset subtracted from the absmax values).
    """
    n_absmax = math.ceil(numel / blocksize)
    return {
        "weights": math.ceil(numel / 2),
        "absmax": n_absmax,
        "absmax2": 4 * math.ceil(n_absmax / blocksize2),
        "tables": 4 * (16 + 256 + 1),
    }


def quantized_memory_gb(
    shapes: ModelShapes = LLAMA_31_8B, blocksize: int = 64, blocksize2: int = 256
) -> dict[str, float]:
    """Weight memory of the model loaded in 4 bits, as bitsandbytes and Unsloth load it.

    The linear layers are NF4 with double quantization; embed_tokens, lm_head and the norms stay in bf16.

    Args:
        shapes: the model's shapes.
        blocksize, blocksize2: as in `nf4_bytes`.

    Returns:
        GB (10^9 bytes) per part, plus `total`.
    """
    parts: dict[str, int] = defaultdict(int)
    for numel in (i * o for i, o in linear_shapes(shapes).values()):
        for part, size in nf4_bytes(numel, blocksize, blocksize2).items():
            parts[part] += shapes.num_hidden_layers * size
    bf16 = 2
    sizes = {
        "linear weights (NF4, 4 bit)": parts["weights"],
        f"absmax, 1 per {blocksize} (uint8)": parts["absmax"],
        f"absmax scales, 1 per {blocksize2} (fp32)": parts["absmax2"],
        "code tables and offsets (fp32)": parts["tables"],
        "embed_tokens + lm_head (bf16)": bf16 * _embedding_params(shapes),
        "norms (bf16)": bf16 * _norm_params(shapes),
    }
    gb = {part: size / 1e9 for part, size in sizes.items()}
    gb["total"] = sum(gb.values())
    return gb
