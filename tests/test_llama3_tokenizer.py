"""TRL's Llama 3 training template (`helpers.model.apply_chat_template`) and TRL's tokenization give Meta's own Llama 3
token ids.

The reference is Meta's package `llama-models`: its `tokenizer.model` and its dialog encoder `ChatFormat`. The
Hugging Face tokenizer is built from that file as the real checkpoints' is (tiktoken BPE, the 256 special tokens,
`<|begin_of_text|>` prepended by a post-processor). Known differences, by design: the template trims each
message's text, and it turns literal special-token text into control tokens (the data loader drops such rows).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import llama_models.llama3.tokenizer as meta_tokenizer
import pytest
import torch
from datasets import Dataset
from llama_models.datatypes import RawMessage, ToolPromptFormat
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.tokenizer import Tokenizer
from tokenizers import processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from helpers import generation, settings, training
from helpers.data import find_special_token, loss_token_spans
from helpers.model import add_lora, apply_chat_template
from helpers.settings import BOS, END_OF_TEXT, EOT, LLAMA3_SPECIAL_TOKENS, full_profile
from llama_sampler import render_prompt


@pytest.fixture(scope="session")
def meta() -> ChatFormat:
    """Meta's reference dialog encoder over Meta's tokenizer."""
    return ChatFormat(Tokenizer.get_instance())


def meta_special_tokens(meta: ChatFormat) -> list[str]:
    """Meta's 256 special tokens in id order."""
    return sorted(meta.tokenizer.special_tokens, key=meta.tokenizer.special_tokens.get)


@pytest.fixture(scope="session")
def tokenizer(meta):
    """A Hugging Face fast tokenizer from Meta's tokenizer.model, with TRL's Llama 3 template (~3 s)."""
    vocab_file = str(Path(meta_tokenizer.__file__).with_name("tokenizer.model"))
    converter = TikTokenConverter(vocab_file, Tokenizer.pat_str, extra_special_tokens=meta_special_tokens(meta))
    backend = converter.converted()
    bos_id = meta.tokenizer.bos_id
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)]
    )
    # The base checkpoint's settings: end of sequence is <|end_of_text|> (the Instruct one uses <|eot_id|>).
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=END_OF_TEXT)
    return apply_chat_template(hf)


def meta_ids(meta: ChatFormat, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Meta's ids for a conversation; with `add_generation_prompt`, `encode_dialog_prompt` (ends with the header)."""
    raw = [RawMessage(role=m["role"], content=m["content"]) for m in messages]
    if add_generation_prompt:
        return meta.encode_dialog_prompt(raw).tokens
    return [meta.tokenizer.bos_id] + [t for m in raw for t in meta.encode_message(m, ToolPromptFormat.json)[0]]


def template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=True)[
        "input_ids"
    ]


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


CODE = "Here:\n\n```python\ndef f(x):\n    if x:\n\treturn `x` * 2  # tab\n\n\n    return {'a': [1, 2]}\n```\r\nDone."
CONVERSATIONS = {
    "single turn": turns(("user", "What is 2 + 2?"), ("assistant", "2 + 2 = 4.")),
    "system": turns(("system", "Answer briefly."), ("user", "Capital of France?"), ("assistant", "Paris.")),
    "multi-turn": turns(
        ("system", "You are helpful."),
        ("user", "Hi!"),
        ("assistant", "Hello! How can I help?"),
        ("user", "Add 1 and 3."),
        ("assistant", "1 + 3 = 4."),
    ),
    "unicode": turns(
        ("user", "Traduis « café crème » : naïve façade, Ærøskøbing, ß."),
        ("assistant", "日本語のテキスト、中文：你好，世界。한국어. Emoji: 👍🏽 🎉 👨‍👩‍👧 ∑∞ ¯\\_(ツ)_/¯"),
    ),
    "code": turns(("user", "Write `f` in Python:\n  indented\n\n\nthree newlines"), ("assistant", CODE)),
}


def test_the_special_token_list_is_metas(meta):
    assert meta_special_tokens(meta) == list(LLAMA3_SPECIAL_TOKENS)
    assert [meta.tokenizer.special_tokens[t] for t in LLAMA3_SPECIAL_TOKENS] == list(range(128000, 128256))
    assert [meta.tokenizer.special_tokens[t] for t in settings.CHAT_TOKENS] == [128006, 128007, 128009]


@pytest.mark.parametrize("case", CONVERSATIONS)
def test_the_template_gives_metas_ids(case, meta, tokenizer):
    messages = CONVERSATIONS[case]
    assert template_ids(tokenizer, messages) == meta_ids(meta, messages)
    prompt = messages[:-1]
    assert template_ids(tokenizer, prompt, add_generation_prompt=True) == meta_ids(meta, prompt, True)


def test_known_differences_trimming_and_literal_special_tokens(meta, tokenizer):
    padded = turns(("user", "  Hi \n"), ("assistant", "\nHello.  "))
    trimmed = turns(("user", "Hi"), ("assistant", "Hello."))
    assert template_ids(tokenizer, padded) == meta_ids(meta, trimmed) != meta_ids(meta, padded)
    # Meta's encoder keeps special-token text as text; Hugging Face makes it the control token. Every one of the
    # 256 does so, and `find_special_token` (the data loader's check) finds every one.
    eot = meta.tokenizer.eot_id
    assert eot in tokenizer("a<|eot_id|>b", add_special_tokens=False)["input_ids"]
    assert eot not in meta.tokenizer.encode("a<|eot_id|>b", bos=False, eos=False)
    for i, token in enumerate(LLAMA3_SPECIAL_TOKENS):
        assert tokenizer(f"x{token}y", add_special_tokens=False)["input_ids"][1] == 128000 + i
        assert find_special_token(f"x{token}y") == token
    assert find_special_token("<|EOT_ID|> <|eot_id> <|not_a_token|>") is None


def tiny_llama(tokenizer):
    """A random 1-layer Llama with the real vocabulary (4 M parameters, all in the embeddings)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def profile(tmp_path, monkeypatch):
    """The full (8B) profile's settings, those the real tokenizer meets (SFT packing, max_length 2048), on the hf
    backend; writing under tmp_path, W&B off. Building trainers needs no 8B model: the tiny one takes a second."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return replace(full_profile(42, "hf"), outputs_root=str(tmp_path))


def test_sft_loss_covers_exactly_the_assistant_turns_with_metas_ids(profile, meta, tokenizer):
    from trl import SFTTrainer

    messages = CONVERSATIONS["multi-turn"]
    rows = Dataset.from_list([{"messages": messages}])
    trainer = SFTTrainer(
        model=add_lora(tiny_llama(tokenizer), profile, tokenizer),
        args=settings.sft_config(profile),
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=tokenizer,
    )
    example = trainer.train_dataset[0]
    assert example["input_ids"] == meta_ids(meta, messages)  # TRL adds no BOS or EOS of its own
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert loss_token_spans(example, tokenizer) == [a + EOT for a in answers]
    trained = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
    assert trained == [t for a in answers for t in meta_answer_ids(meta, a)]


def meta_answer_ids(meta: ChatFormat, text: str) -> list[int]:
    """An assistant message as Meta's `encode_message` writes it after the header: the text, then <|eot_id|>."""
    header = meta.encode_dialog_prompt([]).tokens[1:]  # <|start_header_id|>assistant<|end_header_id|>\n\n
    message = meta.encode_message(RawMessage(role="assistant", content=text), ToolPromptFormat.json)[0]
    assert message[: len(header)] == header
    return message[len(header) :]


def test_dpo_tokenizes_pairs_to_metas_ids(profile, meta, tokenizer):
    prompt = CONVERSATIONS["multi-turn"][:-1]
    chosen, rejected = "1 + 3 = 4.", "Let me think… it's 4 😀"
    pair = {"prompt": prompt, "chosen": turns(("assistant", chosen)), "rejected": turns(("assistant", rejected))}
    trainer = training.ProjectDPOTrainer(
        model=add_lora(tiny_llama(tokenizer), profile, tokenizer),
        ref_model=None,
        args=settings.dpo_config(profile),
        train_dataset=Dataset.from_list([pair]),
        processing_class=tokenizer,
    )
    row = trainer.train_dataset[0]
    assert row["prompt_ids"] == meta_ids(meta, prompt, add_generation_prompt=True)
    assert row["chosen_ids"] == meta_answer_ids(meta, chosen)
    assert row["rejected_ids"] == meta_answer_ids(meta, rejected)
    # So TRL adds nothing for conversational pairs: one BOS (the template's), each answer ends with <|eot_id|>,
    # and no <|end_of_text|> (the tokenizer's EOS) is appended.
    ids = row["prompt_ids"] + row["chosen_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and tokenizer.eos_token_id not in ids + row["rejected_ids"]
    # The one scorer and the sampler read answers on the same ids DPO trained on.
    assert render_prompt(tokenizer, prompt) == row["prompt_ids"]
    assert generation.answer_ids(tokenizer, chosen) == row["chosen_ids"]
    assert generation.answer_ids(tokenizer, rejected) == row["rejected_ids"]
