"""Load a Llama in 4-bit NF4 and put LoRA adapters on it, through Unsloth or transformers + peft + bitsandbytes.

Both backends give a `peft.PeftModel` over a 4-bit base (NF4, double quantization, bf16 compute) and a tokenizer
with the Llama-3.1 chat template, so everything downstream is the same code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

import helpers.backend  # noqa: F401  (Unsloth, when selected, patches transformers and peft first)
from helpers.chat import CHAT_TOKENS, END_OF_TEXT, EOT, apply_llama31_template
from helpers.config import Profile
from helpers.distributed import local_rank
from helpers.workarounds import keep_4bit_layers_trainable_on_cpu


def device() -> str:
    """'cuda' when a CUDA GPU is present, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def quantization_config():
    """4-bit NF4 with double quantization and bf16 compute (QLoRA's recipe)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def hub_token(model_id: str) -> str | None:
    """The Hugging Face token from the environment for a hub id; None for a local folder."""
    return None if Path(model_id).exists() else os.environ.get("HF_TOKEN")


def load_base(profile: Profile, max_length: int, fix_token_rows: bool = True) -> tuple[Any, Any]:
    """The 4-bit base model (no adapter) and its tokenizer with the Llama-3.1 chat template, its untrained chat-token
    rows fixed (`fix_untrained_token_rows`; notebook 02 turns that off to show the rows before the fix)."""
    if profile.backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=profile.model_id,
            max_seq_length=max_length,
            dtype=torch.bfloat16,
            load_in_4bit=True,
            token=hub_token(profile.model_id),
        )
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(profile.model_id, token=hub_token(profile.model_id))
        model = AutoModelForCausalLM.from_pretrained(
            profile.model_id,
            quantization_config=quantization_config(),
            dtype=torch.bfloat16,
            # One whole model per process: under `accelerate launch` each loads on its own GPU, LOCAL_RANK ("cuda"
            # alone would put every process on GPU 0). Unsloth, above, places each process itself.
            device_map={"": local_rank() if device() == "cuda" else "cpu"},
            token=hub_token(profile.model_id),
        )
    apply_llama31_template(tokenizer)
    if fix_token_rows:
        fix_untrained_token_rows(model, tokenizer)
    keep_4bit_layers_trainable_on_cpu(model)
    return model, tokenizer


def lora_config(profile: Profile, tokenizer: Any = None):
    """The peft `LoraConfig` for the profile's LoRA settings."""
    from peft import LoraConfig

    return LoraConfig(**lora_arguments(profile, tokenizer), task_type="CAUSAL_LM")


def lora_arguments(profile: Profile, tokenizer: Any = None) -> dict:
    """The adapter's shape as keyword arguments, shared by peft's `LoraConfig` and Unsloth's `get_peft_model`."""
    s = profile.lora
    if s.trainable_tokens and tokenizer is None:
        raise ValueError("LoRA settings with trainable_tokens need the tokenizer to find the tokens' ids.")
    token_ids = [tokenizer.convert_tokens_to_ids(t) for t in s.trainable_tokens]
    return dict(
        trainable_token_indices={"embed_tokens": token_ids} if token_ids else None,
        r=s.r,
        lora_alpha=s.alpha,
        lora_dropout=s.dropout,
        use_rslora=s.use_rslora,
        target_modules=list(s.target_modules),
        modules_to_save=list(s.modules_to_save) or None,
        bias="none",
    )


def add_lora(model: Any, profile: Profile, tokenizer: Any = None) -> Any:
    """Wrap the 4-bit base in new, trainable LoRA adapters."""
    if profile.backend == "unsloth":
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            model,
            **lora_arguments(profile, tokenizer),
            use_gradient_checkpointing="unsloth" if device() == "cuda" else False,
            random_state=profile.seed,
        )
    from peft import get_peft_model

    # LoRA's A matrices are drawn from torch's global generator: seed it, or the same seed gives a different
    # adapter depending on what ran before in this process (Unsloth's `random_state` does the same).
    torch.manual_seed(profile.seed)
    return get_peft_model(model, lora_config(profile, tokenizer))


def load_adapter(model: Any, adapter_dir: Path, trainable: bool, adapter_name: str = "default") -> Any:
    """Put a saved adapter on a base model (or add it under `adapter_name` to a `PeftModel`).

    The chat-token rows the adapter carries for other machines (`export.make_adapter_portable`) are left out: the
    base from `load_base` holds them already, and peft's wrapper on `lm_head` breaks TRL's fused DPO loss. Rows
    the adapter trained (`LoraSettings.trainable_tokens`) are loaded.
    """
    from peft import PeftModel

    from helpers.export import config_without_fixed_rows

    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(f"No adapter in {adapter_dir}: run the step that trains it first.")
    config = config_without_fixed_rows(adapter_dir, trainable)
    if not isinstance(model, PeftModel):
        return PeftModel.from_pretrained(
            model, str(adapter_dir), adapter_name=adapter_name, is_trainable=trainable, config=config
        )
    model.add_adapter(adapter_name, config)  # load_adapter then takes this config instead of the saved one
    model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=trainable)
    if trainable:
        model.set_requires_grad(adapter_name)
    return model


def load_for_training(profile: Profile, max_length: int, adapter_dir: Path | None = None) -> tuple[Any, Any]:
    """Base model plus trainable LoRA: fresh adapters, or the saved ones in `adapter_dir` to keep training."""
    model, tokenizer = load_base(profile, max_length)
    if adapter_dir is None:
        return add_lora(model, profile, tokenizer), tokenizer
    if profile.backend == "unsloth":
        # Unsloth's fast LoRA paths are set up by get_peft_model; build the same adapters, then load the weights.
        model = add_lora(model, profile, tokenizer)
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(Path(adapter_dir) / "adapter_model.safetensors"))
        return model, tokenizer
    return load_adapter(model, adapter_dir, trainable=True), tokenizer


def fix_untrained_token_rows(model: Any, tokenizer: Any) -> list[int]:
    """Give the chat tokens a base model never saw useful rows: `<|eot_id|>` those of `<|end_of_text|>`, the
    header tokens the mean row (input and output embeddings). Returns the token ids it changed.

    Meta's Llama-3.1 *base* model never saw `<|start_header_id|>`, `<|end_header_id|>` or `<|eot_id|>` in
    training; their rows are about 0. An output row of 0 gives `<|eot_id|>` a logit of 0 wherever the answer
    should end, so the model does not stop. `<|end_of_text|>` was trained to end every document: starting
    `<|eot_id|>` from its rows makes the base model end a turn where it would end a text, and SFT refines it (the
    input rows train with the adapters, `LoraSettings.trainable_tokens`). Headers only need to be distinct from
    text and get the mean row, as Unsloth does. A model that knows the tokens (an instruct model) is unchanged.
    """
    eot, end = tokenizer.convert_tokens_to_ids(EOT), tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    changed = []
    for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        if matrix.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            continue  # a quantized head: leave it
        with torch.no_grad():
            norms = matrix.float().norm(dim=1)
            untrained = {
                i for i in tokenizer.convert_tokens_to_ids(list(CHAT_TOKENS)) if norms[i] < 1e-3 * norms.median()
            }
            trained = torch.ones(matrix.shape[0], dtype=torch.bool, device=matrix.device)
            trained[list(untrained)] = False
            for i in untrained:
                source = matrix[end] if i == eot and norms[end] >= 1e-3 * norms.median() else matrix[trained].mean(0)
                matrix[i] = source.float().to(matrix.dtype)
            changed += untrained
    return sorted(set(changed))


def chat_token_norms(model: Any, tokenizer: Any) -> dict[str, tuple[float, float]]:
    """The norms of each chat token's input and output embedding row, and (key "median row") the median row's."""
    matrices = (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    norms = [m.detach().float().norm(dim=1) for m in matrices]
    result = {t: tuple(n[tokenizer.convert_tokens_to_ids(t)].item() for n in norms) for t in CHAT_TOKENS}
    return result | {"median row": tuple(n.median().item() for n in norms)}


def count_parameters(model: Any) -> dict[str, float]:
    """Trainable and total parameters (4-bit weights counted as the numbers they stand for) and the share."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)  # two 4-bit values per byte
        total += n
        trainable += n if p.requires_grad else 0
    return {"trainable": trainable, "total": total, "trainable_share": trainable / total}
