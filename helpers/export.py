"""Take the tuned model out of `outputs/`: a portable adapter, a merged 16-bit model that stops, a Hub push.

Two traps this module closes:

- The base model's chat-token rows (`<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>`) are fixed in
  memory at load time (`helpers.model.fix_untrained_token_rows`), and LoRA does not save embeddings. Loaded
  anywhere else, the adapter meets the untrained rows again and the model never ends its turn.
  `make_adapter_portable` (called by `checkpoints.save_adapter`) stores those rows in the adapter folder as peft
  "trainable tokens", which plain `PeftModel.from_pretrained` applies by itself; the merge reads them from there.
- A merged model that stops only when the caller passes the right `eos_token_id`. `save_merged` writes a
  `generation_config.json` whose `eos_token_id` holds `<|eot_id|>` and `<|end_of_text|>`.

GGUF files for llama.cpp and Ollama are written by `helpers.gguf_export`; generation, the token-by-token comparison
of two models and the chat loop are in `helpers.inference`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from helpers.chat import CHAT_TOKENS, LLAMA31_CHAT_TEMPLATE, stop_token_ids
from helpers.config import Profile, shown
from helpers.model import device, fix_untrained_token_rows, load_base, quantization_config

MERGE_BASES = ("dequantized", "original")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The matrices whose chat-token rows `make_adapter_portable` added (fixed, not trained): project loads leave them out.
FIXED_ROWS_FILE = "fixed-token-rows.json"
# The chat template without TRL's `{% generation %}` markers: they only matter for training, and inference
# engines with their own Jinja (llama.cpp, TGI's minijinja) reject the unknown tag.
INFERENCE_CHAT_TEMPLATE = LLAMA31_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def heldout_prompts(profile: Profile, tokenizer: Any) -> list[list[dict]]:
    """The first `profile.eval.num_prompts` held-out prompts (chat message lists) that every model is judged on."""
    from helpers import pipeline

    return list(pipeline.preference_data(profile, tokenizer).eval["prompt"])[: profile.eval.num_prompts]


def chat_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the chat tokens whose embedding rows `fix_untrained_token_rows` may set."""
    return [tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS]


# --- a portable adapter ---------------------------------------------------------------------------------------


def make_adapter_portable(adapter_dir: Path, model: Any, tokenizer: Any) -> list[str]:
    """Save `model`'s chat-token embedding rows with the adapter in `adapter_dir`, so that plain peft applies them.

    The rows go in as peft 0.21 trainable tokens: `trainable_token_indices` in `adapter_config.json` and one
    `...<module>.token_adapter.trainable_tokens_delta` tensor per matrix in the weights file. peft *replaces* those
    rows of the base by the saved values on load (`index_copy`, not an addition), so loading the adapter on the
    raw base anywhere gives the fixed rows; on a base whose rows were fine, the values are the same and nothing
    changes. A matrix whose rows the adapter trained (`LoraSettings.trainable_tokens`, the smoke profile's
    `embed_tokens`) or saves in full (`modules_to_save`) carries them already, as trained. The matrices added are
    listed in `FIXED_ROWS_FILE`. Idempotent: a second call adds nothing.

    Args:
        adapter_dir: a folder written by `PeftModel.save_pretrained`.
        model: the model the adapter was trained on (a `PeftModel` or its base), with the rows as trained.
        tokenizer: its tokenizer (gives the token ids).

    Returns:
        The matrices whose rows were added (`embed_tokens`, `lm_head`), empty when nothing was needed.
    """
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    carried = set(config.get("modules_to_save") or []) | set(config.get("trainable_token_indices") or {})
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    prefix = "" if isinstance(model, PeftModel) else "base_model.model."
    names = {id(m): n for n, m in model.named_modules()}
    ids = chat_token_ids(tokenizer)
    weights = load_file(adapter_dir / ADAPTER_WEIGHTS)
    added = []
    for short, module in (("embed_tokens", model.get_input_embeddings()), ("lm_head", model.get_output_embeddings())):
        if short in carried or (tied and short == "lm_head"):  # peft ties a tied head to the embedding's rows
            continue
        path = names[id(module)]
        weights[f"{prefix}{path}.token_adapter.trainable_tokens_delta"] = module.weight[ids].detach().cpu().clone()
        added.append(short)
    if not added:
        return []
    config["trainable_token_indices"] = dict(config.get("trainable_token_indices") or {}) | dict.fromkeys(added, ids)
    tmp = adapter_dir / (ADAPTER_WEIGHTS + ".tmp")
    save_file(weights, tmp, metadata={"format": "pt"})
    tmp.replace(adapter_dir / ADAPTER_WEIGHTS)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (adapter_dir / FIXED_ROWS_FILE).write_text(json.dumps(sorted(fixed_rows(adapter_dir) + added)) + "\n")
    return added


def fixed_rows(adapter_dir: Path) -> list[str]:
    """The matrices whose chat-token rows `make_adapter_portable` added to the adapter in `adapter_dir`."""
    path = Path(adapter_dir) / FIXED_ROWS_FILE
    return json.loads(path.read_text()) if path.exists() else []


def config_without_fixed_rows(adapter_dir: Path, trainable: bool):
    """The adapter's `LoraConfig` without the rows `make_adapter_portable` added, for loads inside this project.

    Inside `helpers` the base already holds those fixed rows (`load_base` fixes them), and peft's token wrapper on
    `lm_head` breaks TRL 1.15's fused DPO loss (it reads the unwrapped `lm_head.weight`). Rows the adapter trained
    stay. Pass the result as `config=` to `PeftModel.from_pretrained`; peft then skips the left-out tensors.
    """
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(adapter_dir))
    fixed = fixed_rows(adapter_dir)
    trained = {k: v for k, v in (config.trainable_token_indices or {}).items() if k not in fixed}
    config.trainable_token_indices = trained or None
    config.inference_mode = not trainable
    return config


def load_adapter_plainly(base_id: str, adapter_dir: Path) -> tuple[Any, Any]:
    """The adapter on the 4-bit base with nothing but transformers + peft: what another machine does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(
        base_id, quantization_config=quantization_config(), dtype=torch.bfloat16, device_map={"": device()}
    )
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval(), AutoTokenizer.from_pretrained(str(adapter_dir))


# --- merging --------------------------------------------------------------------------------------------------


def original_weights_id(profile: Profile) -> str:
    """The 16-bit checkpoint behind the profile's base: `original_model_id`, else the name Unsloth's pre-quantized
    `…-bnb-4bit` repos derive from it."""
    return profile.original_model_id or profile.model_id.removesuffix("-bnb-4bit")


def merge_adapter(
    profile: Profile, adapter_dir: Path, merge_into: str = "dequantized", original_id: str | None = None
) -> tuple[Any, Any]:
    """A plain 16-bit (bf16) model: base weights plus the adapter's low-rank updates, chat-token rows fixed.

    Args:
        merge_into: `"dequantized"`: the 4-bit weights the adapter was trained against, dequantized (the merged
            model is the evaluated model up to bf16 rounding); `"original"`: the 16-bit checkpoint the 4-bit
            weights were made from (`original_id`, default `original_weights_id(profile)`), which the adapter
            never saw: each layer differs from training by the quantization error.

    Returns:
        The merged `LlamaForCausalLM` (no peft, no quantization) and the adapter's tokenizer.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if merge_into not in MERGE_BASES:
        raise ValueError(f"merge_into={merge_into!r} is not one of {', '.join(MERGE_BASES)}.")
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    # Plain transformers: the merge needs no Unsloth, and the adapter carries the rows as trained.
    hf = replace(profile, backend="hf")
    if merge_into == "dequantized":
        model, _ = load_base(hf, max(profile.sft.max_length, profile.dpo.max_length))
        model = model.dequantize()  # NF4 -> bf16, exactly the numbers the 4-bit layers compute with
    else:
        source = original_id or original_weights_id(profile)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, device_map={"": device()})
        fix_untrained_token_rows(model, tokenizer)  # for an adapter that does not carry the rows itself
    # Plain peft, not `helpers.model.load_adapter`: the adapter's own token rows, as trained, go into the merge.
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return merged.eval(), tokenizer


def save_merged(model: Any, tokenizer: Any, target: Path) -> Path:
    """Save the merged model, its tokenizer (inference chat template) and a generation config that stops.

    `generation_config.json` gets `eos_token_id = [<|eot_id|>, <|end_of_text|>]` and the padding id, so plain
    `generate()`, vLLM or TGI end an assistant turn without being told.
    """
    target = Path(target)
    stops = stop_token_ids(tokenizer)
    model.config.eos_token_id = stops
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    # The weights as they are in memory: a base loaded from a pre-quantized 4-bit checkpoint remembers how its
    # weights were deserialized, and reverting that for the dequantized model raises NotImplementedError.
    model.save_pretrained(str(target), save_original_format=False)
    training_template, tokenizer.chat_template = tokenizer.chat_template, INFERENCE_CHAT_TEMPLATE
    try:
        tokenizer.save_pretrained(str(target))
    finally:
        tokenizer.chat_template = training_template
    return target


def folder_sizes(folder: Path) -> dict[str, str]:
    """`{file name: size}` of a folder's files, for a look at what was written."""
    return {p.name: f"{p.stat().st_size / 2**20:.2f} MiB" for p in sorted(Path(folder).iterdir()) if p.is_file()}


# --- the Hugging Face Hub ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubPlan:
    """What `push_to_hub` would do: push or not, why, where, and which files."""

    push: bool
    reason: str
    repo_id: str | None
    folder: Path
    files: tuple[str, ...]

    def describe(self) -> str:
        """A few lines for the notebook: never the token, only whether one is set."""
        size_mib = sum((self.folder / f).stat().st_size for f in self.files) / 2**20
        return (
            f"{'push' if self.push else 'no push'}: {self.reason}\n"
            f"{shown(self.folder)} -> {self.repo_id or '(no repository)'}: "
            f"{len(self.files)} files, {size_mib:.1f} MiB\n"
            f"  {', '.join(self.files)}"
        )


def plan_hub_push(requested: bool, repo_id: str | None, folder: Path, env: Mapping[str, str] | None = None) -> HubPlan:
    """Push only when the user asked for it, named a repository, and `HF_TOKEN` is set."""
    env = os.environ if env is None else env
    folder = Path(folder)
    files = tuple(sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()))
    if not requested:
        reason = "not requested (set PUSH_TO_HUB = True in the configuration cell)"
    elif not repo_id:
        reason = "no repository named (set HUB_REPO_ID, e.g. 'you/llama-3.1-8b-dpo')"
    elif not env.get("HF_TOKEN"):
        reason = "HF_TOKEN is not set (a write token from huggingface.co/settings/tokens)"
    else:
        reason = "requested, repository named, HF_TOKEN set"
    return HubPlan(requested and bool(repo_id) and bool(env.get("HF_TOKEN")), reason, repo_id, folder, files)


def push_to_hub(plan: HubPlan, private: bool = True, env: Mapping[str, str] | None = None) -> str | None:
    """Upload `plan.folder` to a (private by default) model repository; returns its URL, or None when not to push."""
    if not plan.push:
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=(os.environ if env is None else env)["HF_TOKEN"])
    api.create_repo(plan.repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=plan.repo_id, folder_path=str(plan.folder), commit_message="Upload from align-llama")
    return f"https://huggingface.co/{plan.repo_id}"
