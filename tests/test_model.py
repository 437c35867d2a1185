"""helpers.model: the chat template fits the model or is refused, the chat tokens a base never saw get useful rows,
a reward model pads with a neutral token, and `trust_remote_code` stays off."""

from __future__ import annotations

import re

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from trl.chat_template_utils import llama3_training_chat_template

from helpers import model
from helpers.settings import CHAT_TOKENS, END_OF_TEXT, EOT, PAD, PROJECT_ROOT
from llama_sampler import stop_token_ids


def word_tokenizer(tokens: list[str], **special: str) -> PreTrainedTokenizerFast:
    """A minimal tokenizer whose vocabulary is `tokens` (no Llama-3 special tokens unless listed)."""
    vocab = {token: i for i, token in enumerate(["[UNK]", *tokens])}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")), **special)


def test_a_chat_template_that_does_not_fit_the_model_is_refused():
    tokenizer = word_tokenizer(["hello", "</s>"], eos_token="</s>")
    with pytest.raises(ValueError, match=re.escape("has no <|start_header_id|>, <|end_header_id|>, <|eot_id|>")):
        model.apply_chat_template(tokenizer)
    assert tokenizer.chat_template is None  # left as it was


def test_padding_with_end_of_sequence_is_refused():
    headers = ["<|start_header_id|>", "<|end_header_id|>", EOT, "</s>"]
    with pytest.raises(ValueError, match=re.escape("no <|finetune_right_pad_id|> to pad with")):
        model.apply_chat_template(word_tokenizer(headers, eos_token="</s>", pad_token="</s>"))


def test_a_llama3_tokenizer_gets_trls_template(smoke_world):
    tokenizer = model.apply_chat_template(AutoTokenizer.from_pretrained(smoke_world / "base-model"))
    assert tokenizer.chat_template == llama3_training_chat_template and tokenizer.pad_token != tokenizer.eos_token
    assert stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(t) for t in (EOT, END_OF_TEXT)]


def test_the_chat_tokens_the_base_never_saw_get_useful_rows(tmp_profile):
    from transformers import AutoModelForCausalLM

    raw = AutoModelForCausalLM.from_pretrained(tmp_profile.model_id)
    tokenizer = model.apply_chat_template(AutoTokenizer.from_pretrained(tmp_profile.model_id))
    before = model.chat_token_norms(raw, tokenizer)
    assert all(before[t] == (0.0, 0.0) for t in CHAT_TOKENS)  # zeroed, as in Meta's base (about 0 there)
    changed = model.fix_untrained_token_rows(raw, tokenizer)
    assert changed == sorted(tokenizer.convert_tokens_to_ids(list(CHAT_TOKENS)))
    eot, end = (tokenizer.convert_tokens_to_ids(t) for t in (EOT, END_OF_TEXT))
    for matrix in (raw.get_input_embeddings().weight, raw.get_output_embeddings().weight):
        assert torch.equal(matrix[eot], matrix[end])  # a turn ends where a text would
    after = model.chat_token_norms(raw, tokenizer)
    assert all(min(after[t]) > 0 for t in CHAT_TOKENS)
    assert model.fix_untrained_token_rows(raw, tokenizer) == []  # a model that knows the tokens is unchanged


def test_the_4bit_base_counts_its_packed_weights_and_trains_only_the_adapters(tmp_profile):
    policy, tokenizer = model.load_for_training(tmp_profile, tmp_profile.sft.max_length)
    counts = model.count_parameters(policy)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert counts["trainable"] == trainable > 0 and 0 < counts["trainable_share"] < 0.5
    assert set(policy.peft_config) == {"default"}
    assert policy.peft_config["default"].trainable_token_indices == {
        "embed_tokens": [tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS]
    }


def test_a_reward_model_pads_with_a_neutral_token(tmp_profile):
    from transformers import LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tmp_profile.model_id)
    tokenizer.pad_token = EOT  # as some reward models ship: the answer's closing token would count as padding
    scorer = LlamaForSequenceClassification.from_pretrained(tmp_profile.model_id, num_labels=1)
    assert model.use_neutral_padding(scorer, tokenizer) == PAD
    assert scorer.config.pad_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids(PAD)
    plain = word_tokenizer(["a", EOT], eos_token=EOT, pad_token=EOT)
    with pytest.raises(ValueError, match="an end token, and has no <|finetune_right_pad_id|>"):
        model.use_neutral_padding(scorer, plain)


def test_no_toy_reward_model_means_train_it_first(tmp_profile):
    with pytest.raises(FileNotFoundError, match=r"train it first \(training.ensure\(profile, 'reward'\)\)"):
        model.load_reward_model(tmp_profile)


def test_a_missing_adapter_names_the_stage_to_run(tmp_profile):
    with pytest.raises(FileNotFoundError, match="run the stage that trains it first"):
        model.load_adapter(None, tmp_profile.adapter_dir("sft"), trainable=False)


def test_trust_remote_code_is_never_turned_on():
    turned_on = re.compile(r"trust_remote_code[\"']?\s*[=:]\s*True")
    files = [*(PROJECT_ROOT / "helpers").glob("*.py"), *(PROJECT_ROOT / "notebooks").glob("*.ipynb")]
    offenders = [f.name for f in files if turned_on.search(f.read_text(encoding="utf-8"))]
    assert not offenders, f"trust_remote_code=True in {offenders}"
