"""The numbers behind notebook 01 (and the policy gradient of 06): the DPO and RPO losses and the RLHF optimum they
come from, β under Adam, LoRA's share and the 4-bit memory of Llama-3.1-8B, NF4's levels, RLOO's advantages and
loss, and TRL's own loss code run on the same inputs, so every formula is checked against the library that trains.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence


# --- preferences, RLHF and DPO ------------------------------------------------------------------------------------
def bradley_terry_prob(reward_chosen: Tensor, reward_rejected: Tensor) -> Tensor:
    """p(y_w ≻ y_l | x) = σ(r_w − r_l), the Bradley-Terry model."""
    return torch.sigmoid(reward_chosen - reward_rejected)


def kl_regularised_objective(policy_probs: Tensor, ref_probs: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """E_π[r] − β KL(π ‖ π_ref) for one prompt over a finite set of responses (probabilities of shape (Y,))."""
    kl = (policy_probs * (policy_probs.log() - ref_probs.log())).sum()
    return (policy_probs * rewards).sum() - beta * kl


def optimal_policy(ref_probs: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """The maximiser of `kl_regularised_objective`: π*(y|x) = π_ref(y|x) exp(r(x, y)/β) / Z(x)."""
    # softmax normalises by Z(x) = Σ_y π_ref(y|x) exp(r(x, y)/β), computed stably in log space.
    return torch.softmax(ref_probs.log() + rewards / beta, dim=-1)


def dpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(losses, chosen_rewards, rejected_rewards) per pair from the policy's and the reference's summed log-probs:
    the implicit rewards β log π_θ(y|x)/π_ref(y|x) and the Bradley-Terry loss −log σ of their difference."""
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def summed_logps(token_logps: Tensor, mask: Tensor) -> Tensor:
    """log π(y|x) as DPO uses it, shape (B,): the *sum* of the answer's token log-probs ((B, T), `mask` 1 on them)."""
    return (token_logps * mask).sum(-1)


def token_mean_nll(token_logps: Tensor, mask: Tensor) -> Tensor:
    """The SFT loss, and TRL's `sft` term of the DPO loss: −log-prob averaged over every answer token of the batch
    (a long answer counts as many tokens, not as one example)."""
    return -(token_logps * mask).sum() / mask.sum()


def rpo_loss(
    chosen_token_logps: Tensor,
    chosen_mask: Tensor,
    rejected_token_logps: Tensor,
    rejected_mask: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    nll_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, sigmoid_term, nll_term) of this recipe's DPO stage, TRL's `loss_type=["sigmoid", "sft"]` with
    `loss_weights=[1, nll_weight]` (RPO): the mean `dpo_loss` plus `nll_weight` times the chosen answers' NLL."""
    chosen, rejected = summed_logps(chosen_token_logps, chosen_mask), summed_logps(rejected_token_logps, rejected_mask)
    losses, _, _ = dpo_loss(chosen, rejected, ref_chosen_logps, ref_rejected_logps, beta)
    sigmoid_term, nll_term = losses.mean(), token_mean_nll(chosen_token_logps, chosen_mask)
    return sigmoid_term + nll_weight * nll_term, sigmoid_term, nll_term


def toy_token_logps(n: int, max_tokens: int = 24, vocab_size: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(token_logps, mask), each (n, max_tokens), of `n` answers of 1 to `max_tokens` tokens, each token drawn from a
    random next-token distribution: real log-probabilities, for examples without a model (0 where mask is 0)."""
    g = torch.Generator().manual_seed(seed)
    log_dists = torch.log_softmax(2 * torch.randn(n, max_tokens, vocab_size, generator=g), dim=-1)
    tokens = torch.multinomial(log_dists.exp().reshape(-1, vocab_size), 1, generator=g).reshape(n, max_tokens, 1)
    lengths = torch.randint(1, max_tokens + 1, (n, 1), generator=g)
    mask = (torch.arange(max_tokens) < lengths).float()
    return log_dists.gather(-1, tokens).squeeze(-1) * mask, mask


def optimise_margin(beta: float, steps: int, lr: float, optimizer: str = "adam") -> list[float]:
    """The log-ratio margin m after each step of minimising −log σ(β m) from m = 0 with m as the only parameter, with
    torch's Adam or SGD: a one-number stand-in for training."""
    margin = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]([margin], lr=lr)
    zero = torch.zeros(1, dtype=torch.float64)
    trajectory = []
    for _ in range(steps):
        opt.zero_grad()
        dpo_loss(margin, zero, zero, zero, beta)[0].sum().backward()
        opt.step()
        trajectory.append(margin.item())
    return trajectory


# --- parameter counts and LoRA: transformers and peft count, on the meta device (shapes only, no memory) ------------
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


def _meta_model(shapes: ModelShapes) -> torch.nn.Module:
    """A `LlamaForCausalLM` of these shapes on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM  # imported here: seconds to import, only this needs it

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**asdict(shapes)))


def linear_shapes(shapes: ModelShapes) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of the seven linear layers in one decoder layer."""
    layer = _meta_model(replace(shapes, num_hidden_layers=1)).model.layers[0]
    linear = [(n, m) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    return {n.split(".")[-1]: (m.in_features, m.out_features) for n, m in linear}


def total_params(shapes: ModelShapes) -> int:
    """All parameters of the model (a tied lm_head counted once)."""
    return sum(p.numel() for p in _meta_model(shapes).parameters())


def lora_trainable_params(shapes: ModelShapes, r: int, target_modules: tuple[str, ...] | list[str]) -> int:
    """The parameters peft's LoRA of rank `r` on `target_modules` trains."""
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        model = get_peft_model(_meta_model(shapes), LoraConfig(r=r, target_modules=list(target_modules)))
    return model.get_nb_trainable_parameters()[0]


# --- 4-bit memory (bitsandbytes NF4 with double quantization) -------------------------------------------------------
def nf4_bytes(numel: int, blocksize: int = 64) -> dict[str, int]:
    """Bytes bitsandbytes stores for one weight in NF4 with double quantization: the 4-bit `weights`, one uint8
    `absmax` per block of `blocksize`, one fp32 `absmax2` per 256 of those, and the fp32 `tables` (the
    16-entry NF4 code, the 256-entry 8-bit code and the offset subtracted from the absmax values)."""
    n_absmax = math.ceil(numel / blocksize)
    return {
        "weights": math.ceil(numel / 2),
        "absmax": n_absmax,
        "absmax2": 4 * math.ceil(n_absmax / 256),
        "tables": 4 * (16 + 256 + 1),
    }


def quantized_memory_gb(shapes: ModelShapes = LLAMA_31_8B, blocksize: int = 64) -> dict[str, float]:
    """GB (10^9 bytes) per part, and `total`, of the model's weights as bitsandbytes loads them in 4 bits: the
    decoder's linear layers in NF4 with double quantization, embed_tokens, lm_head and the norms in bf16."""
    model, nf4 = _meta_model(shapes), Counter()
    for module in model.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            nf4.update(nf4_bytes(module.weight.numel(), blocksize))
    kept = {n: p.numel() for n, p in model.named_parameters() if "proj" not in n}  # embeddings, lm_head, norms
    sizes = {
        "linear weights (NF4, 4 bit)": nf4["weights"],
        f"absmax, 1 per {blocksize} (uint8)": nf4["absmax"],
        "absmax scales, 1 per 256 (fp32)": nf4["absmax2"],
        "code tables and offsets (fp32)": nf4["tables"],
        "embed_tokens + lm_head (bf16)": 2 * sum(v for n, v in kept.items() if "norm" not in n),
        "norms (bf16)": 2 * sum(v for n, v in kept.items() if "norm" in n),
    }
    return {part: size / 1e9 for part, size in sizes.items()} | {"total": sum(sizes.values()) / 1e9}


def nf4_levels() -> Tensor:
    """bitsandbytes' 16 NF4 values, as fractions of a block's absmax: 7 negative, 0, 8 positive."""
    from bitsandbytes.functional import get_4bit_type  # imported here: only the NF4 pictures need bitsandbytes

    return get_4bit_type("nf4", device="cpu").float()


def nf4_quantize(weight: Tensor, blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """Quantize `weight` (numel a multiple of `blocksize`) to NF4 with bitsandbytes, as `load_in_4bit` does: (scaled,
    codes), flat, each weight divided by its block's absmax and the index into `nf4_levels()` bitsandbytes chose."""
    from bitsandbytes.functional import quantize_4bit

    flat = weight.detach().float().cpu().reshape(-1, blocksize)
    packed, state = quantize_4bit(flat, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).flatten().long()  # two codes a byte, high nibble first
    return (flat / state.absmax.reshape(-1, 1)).flatten(), codes


# --- TRL's own loss code ------------------------------------------------------------------------------------------
_SINGLE_PROCESS = SimpleNamespace(  # accelerate's `Accelerator` in one process, where a gather returns its input
    device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t, reduce=lambda t, reduction="sum": t
)


def _bare_trainer(trainer_class: type, args: object) -> object:
    """A TRL trainer built without `__init__` (which needs a model and a dataset), enough for its `_compute_loss`:
    one process, a model in training mode, no router loss (a dense Llama has none)."""
    trainer = object.__new__(trainer_class)
    trainer.args, trainer.accelerator, trainer.aux_loss_enabled = args, _SINGLE_PROCESS, False
    trainer.model = SimpleNamespace(training=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return trainer


def trl_batch_loss(
    chosen_token_logps: Tensor,
    chosen_mask: Tensor,
    rejected_token_logps: Tensor,
    rejected_mask: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: tuple[str, ...] = ("sigmoid",),
    loss_weights: tuple[float, ...] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """(loss, logged metrics) of one batch (arguments as in `rpo_loss`) by TRL's own `DPOTrainer._compute_loss`, for
    any `loss_type`. TRL 1.15 has no standalone loss function: the method runs unmodified on a bare trainer, with the
    loss settings of a real `DPOConfig` copied as `__init__` does and a policy that returns the given log-probs."""
    from trl import DPOConfig, DPOTrainer  # imported here: TRL takes seconds to import and only this needs it

    weights = list(loss_weights) if loss_weights else None
    args = DPOConfig(
        beta=beta, loss_type=list(loss_type), loss_weights=weights, precompute_ref_log_probs=True, bf16=False
    )
    trainer = _bare_trainer(DPOTrainer, args)
    copied = ("beta", "ld_alpha", "f_divergence_type", "f_alpha_divergence_coef", "label_smoothing", "use_weighting")
    for name in copied:
        setattr(trainer, name, getattr(args, name))
    trainer.precompute_ref_logps, trainer.loss_types = True, args.loss_type
    trainer.loss_weights = args.loss_weights or [1.0] * len(args.loss_type)
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    # The batch is [chosen rows, rejected rows], padded to one width, each a prompt token then the completion tokens.
    logps = pad_sequence([*chosen_token_logps, *rejected_token_logps], batch_first=True)
    completion_mask = F.pad(pad_sequence([*chosen_mask, *rejected_mask], batch_first=True).long(), (1, 0))

    def policy(labels: Tensor, **kwargs) -> SimpleNamespace:  # as TRL's fused LM head: 0 off the completion
        masked, zeros = logps * (labels[:, 1:] != -100), torch.zeros_like(logps)
        # entropy, mean_logits and is_top1 only feed TRL's logged metrics, not the loss or the rewards.
        return SimpleNamespace(log_probs=masked, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    inputs = {
        "input_ids": torch.zeros_like(completion_mask),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    loss = trainer._compute_loss(policy, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_dpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """`dpo_loss`'s (losses, chosen_rewards, rejected_rewards) by TRL's `_compute_loss` (`trl_batch_loss`): each pair
    is its own batch of one token an answer, since TRL returns only the batch mean; the rewards are what it logs."""
    one, dtype = torch.ones(1, 1), chosen_logps.dtype
    pairs = zip(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, strict=True)
    runs = [trl_batch_loss(c[None, None], one, r[None, None], one, rc[None], rr[None], beta) for c, r, rc, rr in pairs]
    rewards = [torch.tensor([m[f"rewards/{k}"] for _, m in runs], dtype=dtype) for k in ("chosen", "rejected")]
    return torch.stack([loss for loss, _ in runs]), *rewards


# --- RLOO: the policy gradient TRL's RLOOTrainer follows (notebook 06) ----------------------------------------------
def rloo_advantages(scores: Tensor, kl: Tensor, beta: float, k: int) -> Tensor:
    """Each answer's reward R_i = score_i − β·KL_i minus the mean reward of the other k − 1 answers to its prompt (the
    k answers of a prompt next to each other; `kl`: each answer's summed log-ratio to the reference, TRL's estimate)."""
    rewards = (scores - beta * kl).view(-1, k)
    baseline = (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
    return (rewards - baseline).view(-1)


def rloo_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, epsilon: float = 0.2) -> Tensor:
    """−mean_i min(ρ_i A_i, clip(ρ_i, 1 − ε, 1 + ε) A_i) with ρ_i = π_θ(y_i)/π_old(y_i) from sequence log-probs."""
    ratio = torch.exp(logps - old_logps)
    return -torch.min(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages).mean()


def trl_rloo_loss(token_logps: Tensor, mask: Tensor, old_logps: Tensor, advantages: Tensor, epsilon: float) -> Tensor:
    """`rloo_loss` by TRL's own `RLOOTrainer._compute_loss`, unmodified, on a bare trainer (its clipping range from a
    real `RLOOConfig`) with a stand-in for its log-prob pass; `token_logps` and `mask` are (answers, tokens)."""
    from trl import RLOOConfig, RLOOTrainer

    args = RLOOConfig(epsilon=epsilon, use_cpu=True, bf16=False)
    trainer = _bare_trainer(RLOOTrainer, args)
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (token_logps, torch.zeros_like(token_logps), None)
    inputs = {
        "prompt_ids": torch.zeros(len(mask), 1, dtype=torch.long),
        "prompt_mask": torch.ones(len(mask), 1, dtype=torch.long),
        "completion_ids": torch.zeros_like(mask, dtype=torch.long),
        "completion_mask": mask,
        "old_logps": old_logps,
        "advantages": advantages,
    }
    return trainer._compute_loss(trainer.model, inputs)
