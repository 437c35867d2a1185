"""The Llama-3.1 chat format, with `{% generation %}` markers so TRL can train on assistant tokens only.

Meta's base model ships without a chat template, and TRL ships none with generation markers for Llama-3.1,
so both profiles use this one. It renders exactly the Llama-3.1 turn layout:

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|><|start_header_id|>assistant...
"""

from __future__ import annotations

from typing import Any

BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = (BOS, END_OF_TEXT, START_HEADER, END_HEADER, EOT, PAD)

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
