"""The Llama-3.1 chat format, with `{% generation %}` markers so TRL can train on assistant tokens only.

Meta's base model ships without a chat template, and TRL ships none with generation markers for Llama-3.1,
so both profiles use this one. It renders exactly the Llama-3.1 turn layout:

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|><|start_header_id|>assistant...
"""

from __future__ import annotations

import re
from typing import Any

BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = (BOS, END_OF_TEXT, START_HEADER, END_HEADER, EOT, PAD)
# The tokens of the chat format that a base model never saw in pretraining (their rows are about 0 in Meta's
# Llama-3.1 base): `helpers.model` gives them the mean embedding, and LoRA trains their input rows.
CHAT_TOKENS = (START_HEADER, END_HEADER, EOT)
# How Llama 3 cuts text before BPE (Meta's `Tokenizer.pat_str`): letters keep one leading space or punctuation
# mark, numbers are cut into groups of at most three digits with no space, so "7" is one token wherever it is.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)

# All 256 special tokens of the Llama 3 tokenizer in id order (ids 128000 to 128255), by the rule Meta's
# `llama_models/llama3/tokenizer.py` uses: twelve named ones, then reserved ones numbered on from 2.
EOM = "<|eom_id|>"
NAMED_LLAMA3_SPECIAL_TOKENS = (
    BOS,
    END_OF_TEXT,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    PAD,
    "<|step_id|>",
    START_HEADER,
    END_HEADER,
    EOM,
    EOT,
    "<|python_tag|>",
    "<|image|>",
)
NUM_LLAMA3_SPECIAL_TOKENS = 256
LLAMA3_SPECIAL_TOKENS = NAMED_LLAMA3_SPECIAL_TOKENS + tuple(
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_LLAMA3_SPECIAL_TOKENS - len(NAMED_LLAMA3_SPECIAL_TOKENS))
)
_SPECIAL_TOKEN_SET = frozenset(LLAMA3_SPECIAL_TOKENS)
_SPECIAL_TOKEN_SHAPE = re.compile(r"<\|[A-Za-z0-9_]+\|>")

LLAMA31_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def apply_llama31_template(tokenizer: Any) -> Any:
    """Give `tokenizer` the Llama-3.1 chat template and a padding token that is not end-of-sequence.

    Raises:
        ValueError: the tokenizer lacks the Llama-3 special tokens the template writes.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in (START_HEADER, END_HEADER, EOT) if t not in vocab]
    if missing:
        raise ValueError(
            f"The tokenizer has no {', '.join(missing)}: the Llama-3.1 chat template does not fit this model. "
            "Use a Llama-3.x tokenizer."
        )
    tokenizer.chat_template = LLAMA31_CHAT_TEMPLATE
    if PAD in vocab:
        tokenizer.pad_token = PAD
    elif tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        raise ValueError(f"The tokenizer has no {PAD} to pad with; padding with end-of-sequence would hide it.")
    return tokenizer


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn in generation (end of turn and end of text)."""
    return [tokenizer.convert_tokens_to_ids(t) for t in (EOT, END_OF_TEXT)]


def find_special_token(text: str) -> str | None:
    """The first Llama 3 special token written out as literal text in `text`, or None.

    Why: a Hugging Face tokenizer turns such text into the control token itself (Meta's reference encoder keeps it
    as text), so a `<|eot_id|>` inside an answer would teach the model to end its turn there. Matching is exact
    and case-sensitive, as the tokenizer's is: `<|EOT_ID|>` is plain text.
    """
    for match in _SPECIAL_TOKEN_SHAPE.finditer(text):
        if match.group() in _SPECIAL_TOKEN_SET:
            return match.group()
    return None
