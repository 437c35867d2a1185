"""Load a Llama in 4-bit NF4 and put LoRA adapters on it, through Unsloth or transformers + peft + bitsandbytes.

Both backends give a `peft.PeftModel` over a 4-bit base (NF4, double quantization, bf16 compute) and a tokenizer
with the Llama-3.1 chat template, so everything downstream is the same code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from helpers.chat import END_HEADER, EOT, START_HEADER, apply_llama31_template
from helpers.config import Profile


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


def load_base(profile: Profile, max_length: int) -> tuple[Any, Any]:
    """The 4-bit base model (no adapter) and its tokenizer with the Llama-3.1 chat template."""
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
            device_map={"": device()},
            token=hub_token(profile.model_id),
        )
    apply_llama31_template(tokenizer)
    fix_untrained_token_rows(model, tokenizer)
    return model, tokenizer


def lora_config(profile: Profile):
    """The peft `LoraConfig` for the profile's LoRA settings."""
    from peft import LoraConfig

    return LoraConfig(**lora_arguments(profile), task_type="CAUSAL_LM")


def lora_arguments(profile: Profile) -> dict:
    """The adapter's shape as keyword arguments, shared by peft's `LoraConfig` and Unsloth's `get_peft_model`."""
    s = profile.lora
    return dict(
        r=s.r,
        lora_alpha=s.alpha,
        lora_dropout=s.dropout,
        use_rslora=s.use_rslora,
        target_modules=list(s.target_modules),
        modules_to_save=list(s.modules_to_save) or None,
        bias="none",
    )


def add_lora(model: Any, profile: Profile) -> Any:
    """Wrap the 4-bit base in new, trainable LoRA adapters."""
    if profile.backend == "unsloth":
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            model,
            **lora_arguments(profile),
            use_gradient_checkpointing="unsloth" if device() == "cuda" else False,
            random_state=profile.seed,
        )
    from peft import get_peft_model

    # LoRA's A matrices are drawn from torch's global generator: seed it, or the same seed gives a different
    # adapter depending on what ran before in this process (Unsloth's `random_state` does the same).
    torch.manual_seed(profile.seed)
    return get_peft_model(model, lora_config(profile))


def load_adapter(model: Any, adapter_dir: Path, trainable: bool, adapter_name: str = "default") -> Any:
    """Put a saved adapter on a base model (or add it under `adapter_name` to a `PeftModel`)."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(f"No adapter in {adapter_dir}: run the step that trains it first.")
    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=trainable)
        return model
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=trainable)


def load_for_training(profile: Profile, max_length: int, adapter_dir: Path | None = None) -> tuple[Any, Any]:
    """Base model plus trainable LoRA: fresh adapters, or the saved ones in `adapter_dir` to keep training."""
    model, tokenizer = load_base(profile, max_length)
    if adapter_dir is None:
        return add_lora(model, profile), tokenizer
    if profile.backend == "unsloth":
        # Unsloth's fast LoRA paths are set up by get_peft_model; build the same adapters, then load the weights.
        model = add_lora(model, profile)
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(Path(adapter_dir) / "adapter_model.safetensors"))
        return model, tokenizer
    return load_adapter(model, adapter_dir, trainable=True), tokenizer


def fix_untrained_token_rows(model: Any, tokenizer: Any) -> list[int]:
    """Give never-trained chat special tokens the mean embedding (input and output), as Unsloth does.

    Meta's Llama-3.1 *base* model never saw `<|start_header_id|>`, `<|end_header_id|>` or `<|eot_id|>` in
    training; their rows are (close to) zero, so the chat format starts from nothing and LoRA, which does not
    touch embeddings, cannot fix that. Returns the token ids it changed (none for a model that knows them).
    """
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (START_HEADER, END_HEADER, EOT)]
    changed = []
    for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        if matrix.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            continue  # a quantized head: leave it
        with torch.no_grad():
            norms = matrix.float().norm(dim=1)
            untrained = [i for i in ids if norms[i] < 1e-3 * norms.median()]
            if untrained:
                trained = torch.ones(matrix.shape[0], dtype=torch.bool, device=matrix.device)
                trained[untrained] = False
                matrix[untrained] = matrix[trained].float().mean(dim=0).to(matrix.dtype)
                changed += untrained
    return sorted(set(changed))


def count_parameters(model: Any) -> dict[str, float]:
    """Trainable and total parameters (4-bit weights counted as the numbers they stand for) and the share."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)  # two 4-bit values per byte
        total += n
        trainable += n if p.requires_grad else 0
    return {"trainable": trainable, "total": total, "trainable_share": trainable / total}
