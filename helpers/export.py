"""Take the tuned model out of `outputs/` (notebook 07): which one (the outside judge's first), a merged 16-bit model
that plain transformers loads and that stops by itself, a GGUF file and Ollama `Modelfile`, and a Hub push when asked.

GGUF is written with `gguf`, llama.cpp's own Python library; its converter script is not on PyPI in a maintained form,
so its Llama steps are done here: Q and K rows permuted to llama.cpp's rope layout, Llama-3.1's rope scaling as the
`rope_freqs` tensor, the tokenizer as byte-level BPE (`llama-bpe`) ending on `<|end_of_text|>` and `<|eot_id|>`.
Checked against llama.cpp built from source (2026-11): Q8_0, F16 and `llama-quantize`d Q4_K_M files give transformers'
greedy tokens and stop on `<|eot_id|>`, with Llama-3.1 rope scaling too; for Meta's Llama 3 tokenizer the vocabulary
metadata equals llama.cpp's reference file `models/ggml-vocab-llama-bpe.gguf`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helpers.model import device_map, fix_untrained_token_rows, load_base
from helpers.settings import END_OF_TEXT, EOT, LLAMA3_SPLIT_PATTERN, PAD, Profile, quantization_config, shown
from llama_sampler import stop_token_ids

MERGE_BASES = ("dequantized", "original")


def choose_model(profile: Profile) -> tuple[str, str]:
    """The tuned model to export ("rl" or "dpo") and a sentence saying why: of those trained with these settings, the
    one the outside judge ranks first in metrics.json (the published benchmark, else a code judge); on a tie or with
    no judge's result for both, the last-trained."""
    from helpers import training

    if not training.is_current(profile, "rl"):
        return "dpo", "DPO: 06 trained no RL model with these settings, so DPO's is the only tuned model."
    metrics, judges = training.read_metrics(profile), []
    if bench := metrics.get("benchmark"):
        scores = {m: bench["models"].get(m, {}).get("prompt_loose") for m in ("rl", "dpo")}
        judges.append((f"{bench['name']}'s prompt-level loose accuracy", scores))
    if profile.code_judge:
        scores = {m: metrics.get("eval", {}).get(m, {}).get("better_answer_rate") for m in ("rl", "dpo")}
        judges.append(("the code judge's better-answer rate", scores))
    for judge, scores in judges:
        if None in scores.values():
            continue
        shown_scores = f"(RL {scores['rl']:.3f}, DPO {scores['dpo']:.3f})"
        if scores["rl"] == scores["dpo"]:
            return "rl", f"RL: the last-trained model, as RL and DPO tie on {judge} {shown_scores}."
        best = max(scores, key=scores.get)
        return best, f"{best.upper()}: {judge} ranks it first {shown_scores}."
    return "rl", "RL: the last-trained model, as metrics.json holds no outside judge's result for both RL and DPO."


def load_adapter_plainly(base_id: str, adapter_dir: Path) -> tuple[Any, Any]:
    """The adapter on the 4-bit base with nothing but transformers + peft: what another machine does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(
        base_id, quantization_config=quantization_config(), dtype=torch.bfloat16, device_map=device_map()
    )
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval(), AutoTokenizer.from_pretrained(str(adapter_dir))


# --- merging --------------------------------------------------------------------------------------------------
def merge_adapter(profile: Profile, adapter_dir: Path, merge_into: str = "dequantized") -> tuple[Any, Any]:
    """A plain bf16 `LlamaForCausalLM` (base plus the adapter's low-rank updates and chat-token rows) and the adapter's
    tokenizer. The base is the 4-bit weights the adapter was trained against, `"dequantized"`, or the 16-bit checkpoint
    they came from (`"original"`: `original_model_id`, else the `…-bnb-4bit` repo's name without the suffix), off by a
    quantization error the adapter never saw."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if merge_into not in MERGE_BASES:
        raise ValueError(f"merge_into={merge_into!r} is not one of {', '.join(MERGE_BASES)}.")
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    if merge_into == "dequantized":  # plain transformers: the merge needs no Unsloth
        model, _ = load_base(replace(profile, backend="hf"), max(profile.sft.max_length, profile.dpo.max_length))
        model = model.dequantize()  # NF4 -> bf16, exactly the numbers the 4-bit layers compute with
    else:
        source = profile.original_model_id or profile.model_id.removesuffix("-bnb-4bit")
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, device_map=device_map())
        fix_untrained_token_rows(model, tokenizer)  # for an adapter that does not carry the rows itself
    # Plain peft, not `helpers.model.load_adapter`: the adapter's own token rows, as trained, go into the merge.
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return merged.eval(), tokenizer


def save_merged(model: Any, tokenizer: Any, target: Path) -> Path:
    """Save the merged model, its tokenizer with the inference chat template, and a generation config whose
    `eos_token_id` is `[<|eot_id|>, <|end_of_text|>]`, so plain `generate()`, vLLM or TGI end a turn untold."""
    from trl.chat_template_utils import llama3_chat_template

    model.config.eos_token_id, model.config.pad_token_id = stop_token_ids(tokenizer), tokenizer.pad_token_id
    model.generation_config.update(
        eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
    )
    # The weights as they are in memory: a base loaded from a pre-quantized 4-bit checkpoint remembers how its
    # weights were deserialized, and reverting that for the dequantized model raises NotImplementedError.
    model.save_pretrained(str(target), save_original_format=False)
    tokenizer.save_pretrained(str(target))
    # TRL's Llama 3 template without the `{% generation %}` markers: they only matter for training, and inference
    # engines with their own Jinja (llama.cpp, TGI's minijinja) reject the unknown tag.
    (target / "chat_template.jinja").write_text(llama3_chat_template)
    return target


def folder_sizes(folder: Path) -> dict[str, str]:
    """`{file name: size}` of a folder's files, for a look at what was written."""
    return {p.name: f"{p.stat().st_size / 2**20:.2f} MiB" for p in sorted(folder.iterdir()) if p.is_file()}


# --- the Hugging Face Hub ----------------------------------------------------------------------------------------
def push_to_hub(
    requested: bool, repo_id: str | None, folder: Path, private: bool = True, env: Mapping[str, str] = os.environ
) -> str | None:
    """Upload `folder` to a (private by default) model repository, only when the user asked for it, named one, and
    `HF_TOKEN` is set; prints the files and why it pushes or not (never the token). Returns the URL, or None."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    size_mib = sum((folder / f).stat().st_size for f in files) / 2**20
    print(f"{shown(folder)} -> {repo_id or '(no repository)'}: {len(files)} files, {size_mib:.1f} MiB")
    print(f"  {', '.join(files)}")
    if not requested:
        print("no push: not requested (set PUSH_TO_HUB = True in the configuration cell)")
    elif not repo_id:
        print("no push: no repository named (set HUB_REPO_ID, e.g. 'you/llama-3.1-8b-dpo')")
    elif not env.get("HF_TOKEN"):
        print("no push: HF_TOKEN is not set (a write token from huggingface.co/settings/tokens)")
    else:
        from huggingface_hub import HfApi

        api = HfApi(token=env["HF_TOKEN"])
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload from align-llama")
        return f"https://huggingface.co/{repo_id}"
    return None


# --- GGUF --------------------------------------------------------------------------------------------------------
OLLAMA_TEMPLATE = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
OLLAMA_STOPS = ("<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>")


def permute_for_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder a Q or K projection's output rows from Hugging Face's rotate-half pairs (i, i + d/2) to llama.cpp's
    adjacent pairs (2i, 2i + 1): the same rotation (transformers' GGUF reader applies the inverse)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(config: Any) -> torch.Tensor | None:
    """What Llama-3.1's rope scaling (`rope_type: llama3`) divides each rope frequency by, as llama.cpp reads it from
    `rope_freqs`: transformers' unscaled over its scaled frequencies. None for plain rope."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if config.rope_parameters["rope_type"] != "llama3":
        return None
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float) / config.head_dim
    return (1.0 / config.rope_parameters["rope_theta"] ** exponents) / scaled


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, `llama-bpe` (Llama 3's split); another would split text
    differently in llama.cpp, so it raises ValueError."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    splits = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", [pre]) if p.get("type") == "Split"]
    if splits != [LLAMA3_SPLIT_PATTERN]:
        raise ValueError(f"Unknown pre-tokenizer {pre}: not Llama 3's split.")
    return "llama-bpe"


def add_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> None:
    """Tokens, types, merges, special ids and chat template of the tokenizer saved in `model_dir`."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    by_id, kind = {i: t for t, i in tokenizer.get_vocab().items()}, gguf.TokenType
    types = {i: kind.CONTROL if t.special else kind.USER_DEFINED for i, t in tokenizer.added_tokens_decoder.items()}
    types |= {i: kind.UNUSED for i in range(vocab_size) if i not in by_id}  # embedding rows beyond the tokenizer's
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    writer.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types([types.get(i, kind.NORMAL) for i in range(vocab_size)])
    merges = tokenizer_json["model"]["merges"]  # "a b" strings, or [a, b] pairs since tokenizers 0.20
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.convert_tokens_to_ids(END_OF_TEXT))  # llama.cpp ends on eos and eot alike
    writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(EOT))
    writer.add_pad_token_id(tokenizer.convert_tokens_to_ids(PAD))
    writer.add_add_bos_token(tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id)
    writer.add_chat_template(tokenizer.chat_template)


def _load_tensor(path: Path, key: str, n_head: int | None) -> np.ndarray:
    """One tensor of a safetensors file in float32, a Q or K projection permuted for llama.cpp's rope (`n_head`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        weight = f.get_tensor(key).float()
    return (permute_for_rope(weight, n_head) if n_head else weight).numpy()


def write_gguf(model_dir: Path, target: Path, file_type: str = "Q8_0") -> Path:
    """Convert the merged Hugging Face Llama in `model_dir` into one GGUF file of `file_type` (`Q8_0`: 8-bit, half of
    16-bit, near-lossless; `F16`; `BF16`) for matrices, F32 for vectors. Tensors are lazy (`gguf.LazyNumpyTensor`):
    each is read, converted and written in turn, so memory holds one tensor, not the model."""
    import gguf
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    target.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(target), arch="llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, "MOSTLY_" + file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, model_dir, config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    kinds = gguf.GGMLQuantizationType
    matrix_type = kinds[file_type]
    block = gguf.GGML_QUANT_SIZES[matrix_type][0]  # F16 where a row does not split into the type's blocks
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (not a dict)
        for key, shape in shapes.items():
            ggml_type = kinds.F32 if len(shape) < 2 else matrix_type if shape[-1] % block == 0 else kinds.F16
            meta = gguf.LazyNumpyTensor.meta_with_dtype_and_shape(np.float32, shape)
            tensor = gguf.LazyNumpyTensor(meta=meta, args=(path, key, heads.get(key.split(".")[-2])), func=_load_tensor)
            name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            writer.add_tensor(name, gguf.quants.quantize(tensor, ggml_type), raw_dtype=ggml_type)
    if (factors := llama3_rope_factors(config)) is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def write_modelfile(gguf_path: Path, system: str | None = None) -> Path:
    """The Ollama `Modelfile` next to `gguf_path`: the file, the Llama-3.1 chat layout, and the stop tokens. Then, on
    the user's machine: `ollama create my-model -f Modelfile` and `ollama run my-model`."""
    lines = [f"FROM ./{gguf_path.name}", f'TEMPLATE """{OLLAMA_TEMPLATE}"""']
    lines += [f'PARAMETER stop "{s}"' for s in OLLAMA_STOPS]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    target = gguf_path.with_name("Modelfile")
    target.write_text("\n".join(lines) + "\n")
    return target
