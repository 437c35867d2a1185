"""The numbers behind notebook 01: the DPO and RPO losses, their KL-regularised origin, what β does under Adam,
LoRA's share, 4-bit memory and NF4's levels.

Small pure functions; `trl_dpo_loss` and `trl_batch_loss` run TRL's own loss code on the same inputs as
`dpo_loss` and `rpo_loss`, so the formulas written here can be checked against the library that trains the model.

Two margins, one name each (TRL logs the second):

- the **log-ratio margin** m = log π_θ(y_w|x)/π_ref(y_w|x) − log π_θ(y_l|x)/π_ref(y_l|x), in nats, unscaled;
- the **reward margin** β·m, the difference of DPO's implicit rewards: TRL's `rewards/margins`.
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
    "nf4_levels",
    "nf4_quantize",
    "optimal_policy",
    "optimise_margin",
    "peft_lora_param_counts",
    "quantized_memory_gb",
    "rpo_loss",
    "summed_logps",
    "token_mean_nll",
    "toy_token_logps",
    "total_params",
    "trl_batch_loss",
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


def nf4_levels() -> torch.Tensor:
    """bitsandbytes' 16 NF4 values, as fractions of a block's absmax: 7 negative, 0, 8 positive.

    They are quantiles of a normal distribution scaled to [−1, 1] (QLoRA, Dettmers et al. 2023), so normally
    distributed weights fall into the 16 bins about equally often; the extra positive level gives 0 an exact code.
    """
    from bitsandbytes.functional import get_4bit_type  # imported here: only the NF4 pictures need bitsandbytes

    return get_4bit_type("nf4", device="cpu").float()


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `weight` to NF4 with bitsandbytes, as `load_in_4bit` does, and unpack what it stored.

    Args:
        weight: any float tensor; its numel must be a multiple of `blocksize`.
        blocksize: weights per absmax scale (bitsandbytes' 4-bit default, 64).

    Returns:
        (scaled, codes), both flat with `weight.numel()` entries: each weight divided by its block's absmax (what
        the 16 levels are compared with), and the 4-bit code bitsandbytes chose (an index into `nf4_levels()`).
    """
    from bitsandbytes.functional import quantize_4bit

    flat = weight.detach().float().cpu().reshape(-1, blocksize)
    packed, state = quantize_4bit(flat, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    packed = packed.flatten()
    codes = torch.stack([packed >> 4, packed & 15], dim=1).flatten().long()  # two codes a byte, high nibble first
    return (flat / state.absmax.reshape(-1, 1)).flatten(), codes
