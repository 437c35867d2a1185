"""Load a Llama in 4-bit NF4 and put LoRA adapters on it, through Unsloth or transformers + peft + bitsandbytes; and
the models around it: adapters saved so that plain peft can load them anywhere, and the reward model. Both backends
give a `peft.PeftModel` over a 4-bit base and a tokenizer with the Llama 3 chat template, so everything downstream is
the same code (notebook 02 shows the calls). A hub download reads `HF_TOKEN` through huggingface_hub itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from safetensors.torch import load_file, save_file

from helpers import fixes, settings
from helpers.settings import CHAT_TOKENS, END_OF_TEXT, EOT, PAD, Profile

ADAPTER_WEIGHTS = "adapter_model.safetensors"
FIXED_ROWS_FILE = "fixed-token-rows.json"  # the matrices whose chat-token rows `make_adapter_portable` added


def device_map() -> dict[str, Any]:
    """The whole model on this process's GPU (under `accelerate launch`, each process its own), else the CPU."""
    return {"": PartialState().local_process_index if torch.cuda.is_available() else "cpu"}


def apply_chat_template(tokenizer: Any) -> Any:
    """Give `tokenizer` TRL's Llama 3 training template (`{% generation %}` marks the answers TRL trains on) and a
    padding token that is not end-of-sequence; a ValueError when it lacks the tokens these need."""
    from trl.chat_template_utils import llama3_training_chat_template

    vocab = tokenizer.get_vocab()
    missing = [t for t in CHAT_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"The tokenizer has no {', '.join(missing)}: the Llama 3 chat template does not fit it.")
    if PAD not in vocab:
        raise ValueError(f"The tokenizer has no {PAD} to pad with; padding with end-of-sequence would hide it.")
    tokenizer.chat_template, tokenizer.pad_token = llama3_training_chat_template, PAD
    return tokenizer


def load_base(profile: Profile, max_length: int) -> tuple[Any, Any]:
    """The 4-bit base model (no adapter), its untrained chat-token rows fixed, and its tokenizer with the template."""
    if profile.backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=profile.model_id, max_seq_length=max_length, dtype=torch.bfloat16, load_in_4bit=True
        )
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(profile.model_id)
        model = AutoModelForCausalLM.from_pretrained(
            profile.model_id,
            quantization_config=settings.quantization_config(),
            dtype=torch.bfloat16,
            device_map=device_map(),
        )
    apply_chat_template(tokenizer)
    fix_untrained_token_rows(model, tokenizer)
    fixes.keep_4bit_layers_trainable_on_cpu(model)
    return model, tokenizer


def add_lora(model: Any, profile: Profile, tokenizer: Any) -> Any:
    """Wrap the 4-bit base in fresh, trainable LoRA adapters (`settings.lora_config`)."""
    if profile.backend == "unsloth":
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            model,
            **settings.lora_arguments(profile, tokenizer),
            use_gradient_checkpointing="unsloth" if torch.cuda.is_available() else False,
            random_state=profile.seed,
        )
    from peft import get_peft_model

    # LoRA's A matrices are drawn from torch's global generator: seed it, or the same seed gives another adapter
    # depending on what ran before in this process (Unsloth's `random_state` does the same).
    torch.manual_seed(profile.seed)
    return get_peft_model(model, settings.lora_config(profile, tokenizer))


def load_adapter(model: Any, adapter_dir: Path, trainable: bool, adapter_name: str = "default") -> Any:
    """Put a saved adapter on a base model (or add it to a `PeftModel` under `adapter_name`). The chat-token rows it
    carries for other machines (`make_adapter_portable`) are left out: the base from `load_base` holds them already,
    and peft's wrapper on `lm_head` breaks TRL's fused DPO loss. Rows it trained (`trainable_tokens`) are loaded."""
    from peft import PeftConfig, PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise FileNotFoundError(f"No adapter in {adapter_dir}: run the stage that trains it first.")
    config = PeftConfig.from_pretrained(str(adapter_dir))
    trained = {k: v for k, v in (config.trainable_token_indices or {}).items() if k not in fixed_rows(adapter_dir)}
    config.trainable_token_indices, config.inference_mode = trained or None, not trainable
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
        # Unsloth's fast LoRA paths are set up by get_peft_model: build the same adapters, then load the weights.
        from peft import set_peft_model_state_dict

        model = add_lora(model, profile, tokenizer)
        set_peft_model_state_dict(model, load_file(Path(adapter_dir) / ADAPTER_WEIGHTS))
        return model, tokenizer
    return load_adapter(model, adapter_dir, trainable=True), tokenizer


def fix_untrained_token_rows(model: Any, tokenizer: Any) -> list[int]:
    """Give the chat tokens a base model never saw useful rows (input and output embeddings): `<|eot_id|>` those of
    `<|end_of_text|>`, the headers the mean row; return the token ids changed (none for a model that knows them).
    Meta's Llama-3.1 *base* never trained the headers or `<|eot_id|>`: their rows are about 0, so the model never ends
    a turn. `<|end_of_text|>` ended every pretraining document: from its rows, it ends a turn where it would a text."""
    eot, end = tokenizer.convert_tokens_to_ids(EOT), tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    changed = set()
    for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        if matrix.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            continue  # a quantized head: leave it
        with torch.no_grad():
            norms = matrix.float().norm(dim=1)
            small = 1e-3 * norms.median()
            untrained = {i for i in tokenizer.convert_tokens_to_ids(list(CHAT_TOKENS)) if norms[i] < small}
            trained = torch.ones(matrix.shape[0], dtype=torch.bool, device=matrix.device)
            trained[list(untrained)] = False
            for i in untrained:
                source = matrix[end] if i == eot and norms[end] >= small else matrix[trained].mean(0)
                matrix[i] = source.float().to(matrix.dtype)
        changed |= untrained
    return sorted(changed)


def chat_token_norms(model: Any, tokenizer: Any) -> dict[str, tuple[float, float]]:
    """The norms of each chat token's input and output embedding row, and (key "median row") the median row's."""
    matrices = (model.get_input_embeddings(), model.get_output_embeddings())
    norms = [m.weight.detach().float().norm(dim=1) for m in matrices]
    rows = {t: tuple(n[tokenizer.convert_tokens_to_ids(t)].item() for n in norms) for t in CHAT_TOKENS}
    return rows | {"median row": tuple(n.median().item() for n in norms)}


def count_parameters(model: Any) -> dict[str, float]:
    """Trainable and total parameters (a 4-bit weight counted as the number it stands for) and the share."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)  # two 4-bit values a byte
        total += n
        trainable += n if p.requires_grad else 0
    return {"trainable": trainable, "total": total, "trainable_share": trainable / total}


def make_adapter_portable(adapter_dir: Path, model: Any, tokenizer: Any) -> list[str]:
    """Save the `PeftModel`'s chat-token rows with its adapter as peft trainable tokens, which peft *replaces* the
    base's rows with on load: LoRA saves no embeddings and `load_base` fixed the rows in memory only, so elsewhere the
    model would never end its turn. Returns the matrices added (none for those already carried)."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    carried = set(config.get("modules_to_save") or []) | set(config.get("trainable_token_indices") or {})
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    names = {id(m): n for n, m in model.named_modules()}
    ids = [tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS]
    weights, added = load_file(adapter_dir / ADAPTER_WEIGHTS), []
    for short, module in (("embed_tokens", model.get_input_embeddings()), ("lm_head", model.get_output_embeddings())):
        if short in carried or (tied and short == "lm_head"):  # peft ties a tied head to the embedding's rows
            continue
        weights[f"{names[id(module)]}.token_adapter.trainable_tokens_delta"] = module.weight[ids].detach().cpu()
        added.append(short)
    if added:
        config["trainable_token_indices"] = (config.get("trainable_token_indices") or {}) | dict.fromkeys(added, ids)
        save_file(weights, adapter_dir / (ADAPTER_WEIGHTS + ".tmp"), metadata={"format": "pt"})
        (adapter_dir / (ADAPTER_WEIGHTS + ".tmp")).replace(adapter_dir / ADAPTER_WEIGHTS)
        (adapter_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (adapter_dir / FIXED_ROWS_FILE).write_text(json.dumps(sorted(fixed_rows(adapter_dir) + added)) + "\n")
    return added


def fixed_rows(adapter_dir: Path) -> list[str]:
    """The matrices whose chat-token rows `make_adapter_portable` added to the adapter in `adapter_dir`."""
    path = Path(adapter_dir) / FIXED_ROWS_FILE
    return json.loads(path.read_text()) if path.exists() else []


def load_reward_model(profile: Profile) -> tuple[Any, Any]:
    """The profile's reward model and its tokenizer, in eval mode: the published one (`reward_model_id`, bf16 or 4-bit
    with `reward_model_4bit`), else the smoke profile's toy one (a FileNotFoundError until trained)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = profile.reward_model_id or str(profile.adapter_dir("reward"))
    if profile.reward_model_id is None and not (profile.adapter_dir("reward") / "config.json").exists():
        raise FileNotFoundError(
            f"No toy reward model in {source}: train it first (training.ensure(profile, 'reward'))."
        )
    quantized = {"quantization_config": settings.quantization_config()} if profile.reward_model_4bit else {}
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, dtype=torch.bfloat16 if profile.reward_model_id else torch.float32, device_map=device_map(), **quantized
    )
    use_neutral_padding(model, tokenizer)
    return model.eval(), tokenizer


def use_neutral_padding(model: Any, tokenizer: Any) -> str:
    """Pad with a token that never ends a conversation (a ValueError when the vocabulary has none); return it. The
    head scores the last token that is not padding: padding with `<|eot_id|>` or end-of-text would move the score off
    the `<|eot_id|>` that closes the answer, to a token the reward model was never trained to score."""
    if tokenizer.pad_token is None or tokenizer.pad_token in {tokenizer.eos_token, EOT, END_OF_TEXT}:
        if PAD not in tokenizer.get_vocab():
            raise ValueError(f"The reward model pads with {tokenizer.pad_token!r}, an end token, and has no {PAD}.")
        tokenizer.pad_token = PAD
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer.pad_token
