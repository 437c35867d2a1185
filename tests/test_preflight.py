"""Clear errors before any download or training: machine, token, chat template; `trust_remote_code` stays off."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from helpers import preflight
from helpers.chat import EOT, LLAMA31_CHAT_TEMPLATE, apply_llama31_template
from helpers.config import PROJECT_ROOT, full_profile, smoke_profile
from helpers.preflight import PreflightError, check_environment

H100 = dict(cuda_available=True, bf16_supported=True, gpu_name="NVIDIA H100 80GB HBM3")
FAKE_TOKEN = "hf_FAKEpreflightTOKEN1234567890"


def test_full_profile_without_a_gpu_points_to_the_smoke_profile():
    with pytest.raises(PreflightError, match="needs a CUDA GPU") as error:
        check_environment(full_profile(), env={"HF_TOKEN": FAKE_TOKEN}, cuda_available=False)
    assert "TUTORIAL_PROFILE=smoke" in str(error.value)
    assert FAKE_TOKEN not in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="reads the machine's facts from torch: needs a CPU-only host")
def test_machine_facts_default_to_what_torch_sees():
    with pytest.raises(PreflightError, match="TUTORIAL_PROFILE=smoke"):
        check_environment(full_profile(), env={})
    check_environment(smoke_profile(), env={})  # the smoke profile is made for this machine


def test_a_gpu_without_bf16_is_a_clear_stop_naming_it():
    with pytest.raises(PreflightError) as error:
        check_environment(full_profile(), env={}, cuda_available=True, bf16_supported=False, gpu_name="Tesla T4")
    message = str(error.value)
    assert "Tesla T4 has no native bf16" in message and "fp16 is not offered" in message
    with pytest.raises(PreflightError, match="Tesla V100"):  # the smoke profile computes in bf16 too
        check_environment(smoke_profile(), env={}, cuda_available=True, bf16_supported=False, gpu_name="Tesla V100")


def test_full_profile_on_a_bf16_gpu_passes_without_a_token():
    check_environment(full_profile(), env={}, **H100)  # its unsloth/ copies of the weights are not gated


@pytest.mark.parametrize("token", [None, "", "   "])
def test_a_gated_model_without_a_token_says_where_to_get_one(token):
    profile = replace(full_profile(), model_id="meta-llama/Llama-3.1-8B")
    env = {} if token is None else {"HF_TOKEN": token}
    with pytest.raises(PreflightError) as error:
        check_environment(profile, env=env, **H100)
    message = str(error.value)
    assert "meta-llama/Llama-3.1-8B is gated" in message
    assert preflight.TOKEN_URL in message and "accept the license" in message


def test_a_gated_model_with_a_token_passes_and_the_token_is_never_printed(capsys):
    profile = replace(full_profile(), model_id="meta-llama/Llama-3.1-8B")
    check_environment(profile, env={"HF_TOKEN": FAKE_TOKEN}, **H100)
    with pytest.raises(PreflightError) as error:  # another problem, token set: the message must not show it
        check_environment(profile, env={"HF_TOKEN": FAKE_TOKEN}, cuda_available=False)
    captured = capsys.readouterr()
    assert FAKE_TOKEN not in str(error.value) + captured.out + captured.err


def test_models_listed_as_gated_need_a_token_too(monkeypatch):
    monkeypatch.setattr(preflight, "GATED_MODELS", (*preflight.GATED_MODELS, "acme/*"))
    profile = replace(full_profile(), reward_model_id="acme/reward-8b")
    with pytest.raises(PreflightError, match="acme/reward-8b is gated"):
        check_environment(profile, env={}, **H100)


def test_every_problem_is_reported_at_once():
    profile = replace(full_profile(), model_id="meta-llama/Llama-3.1-8B")
    with pytest.raises(PreflightError) as error:
        check_environment(profile, env={}, cuda_available=False)
    assert "needs a CUDA GPU" in str(error.value) and "is gated" in str(error.value)


def word_tokenizer(tokens: list[str], **special: str) -> PreTrainedTokenizerFast:
    """A minimal tokenizer whose vocabulary is `tokens` (no Llama-3 special tokens unless listed)."""
    vocab = {token: i for i, token in enumerate(["[UNK]", *tokens])}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")), **special)


def test_a_chat_template_that_does_not_fit_the_model_is_refused():
    tokenizer = word_tokenizer(["hello", "</s>"], eos_token="</s>")
    with pytest.raises(ValueError, match=re.escape("has no <|start_header_id|>, <|end_header_id|>, <|eot_id|>")):
        apply_llama31_template(tokenizer)
    assert tokenizer.chat_template is None  # left as it was


def test_padding_with_end_of_sequence_is_refused():
    headers = ["<|start_header_id|>", "<|end_header_id|>", EOT, "</s>"]
    with pytest.raises(ValueError, match=re.escape("no <|finetune_right_pad_id|> to pad with")):
        apply_llama31_template(word_tokenizer(headers, eos_token="</s>", pad_token="</s>"))


def test_a_llama3_tokenizer_gets_the_template(smoke_world):
    tokenizer = apply_llama31_template(AutoTokenizer.from_pretrained(smoke_world / "base-model"))
    assert tokenizer.chat_template == LLAMA31_CHAT_TEMPLATE and tokenizer.pad_token != tokenizer.eos_token


def test_trust_remote_code_is_never_turned_on():
    turned_on = re.compile(r"trust_remote_code[\"']?\s*[=:]\s*True")
    files = [*(PROJECT_ROOT / "helpers").glob("*.py"), *(PROJECT_ROOT / "notebooks").glob("*.ipynb")]
    offenders = [f.name for f in files if turned_on.search(f.read_text(encoding="utf-8"))]
    assert not offenders, f"trust_remote_code=True in {offenders}"
