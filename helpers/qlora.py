"""QLoRA's arithmetic for notebooks 01 and 02: a Llama decoder's shapes and parameter counts, what LoRA trains,
the memory of the model loaded in 4 bits (bitsandbytes NF4 with double quantization), and NF4's levels and codes.

Pure functions of the shapes, except `peft_lora_param_counts` (transformers and PEFT count on the meta device) and
`nf4_levels`/`nf4_quantize` (bitsandbytes itself); those import their library when called.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

__all__ = [
    "LLAMA_31_8B",
    "ModelShapes",
    "linear_shapes",
    "lora_trainable_params",
    "nf4_bytes",
    "nf4_levels",
    "nf4_quantize",
    "peft_lora_param_counts",
    "quantized_memory_gb",
    "total_params",
]


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
