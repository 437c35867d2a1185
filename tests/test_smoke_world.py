"""The smoke world: deterministic, in the real datasets' schemas, with a code-decided better answer."""

import random

from helpers.chat import LLAMA31_CHAT_TEMPLATE
from helpers.data import load_preference_dataset, load_sft_dataset
from helpers.smoke import (
    TOXIC_SOURCE,
    Sum,
    build_smoke_world,
    is_better_answer,
    preference_rows,
    sft_rows,
)


def test_judge_prefers_concise_and_correct_answers():
    item = Sum(3, 4, 0)
    assert is_better_answer(item.prompt, "3 + 4 = 7.")
    assert not is_better_answer(item.prompt, item.verbose)
    assert not is_better_answer(item.prompt, "3 + 4 = 8.")
    assert not is_better_answer(item.prompt, "2 + 5 = 7.")  # right sum, wrong question
    assert not is_better_answer("Tell me a joke.", "3 + 4 = 7.")


def test_rows_follow_the_real_schemas():
    sft = sft_rows(random.Random(0))[0]
    assert set(sft) == {"conversations", "source", "score"}
    assert {t["from"] for t in sft["conversations"]} <= {"system", "human", "gpt"}
    pref = preference_rows(random.Random(0))
    assert set(pref[0]) == {"source", "chosen", "rejected", "prompt", "question"}
    assert isinstance(pref[0]["prompt"], str) and isinstance(pref[0]["chosen"], list)
    assert sum(r["source"] == TOXIC_SOURCE for r in pref) > 0


def test_data_depends_on_the_seed_alone():
    assert sft_rows(random.Random(5)) == sft_rows(random.Random(5)) != sft_rows(random.Random(6))
    assert preference_rows(random.Random(5)) == preference_rows(random.Random(5))


def test_world_is_cached_and_read_by_the_real_loader(smoke_world):
    assert build_smoke_world(42) == smoke_world and (smoke_world / "DONE").exists()
    assert not smoke_world.with_name(smoke_world.name + ".partial").exists()
    sft, report = load_sft_dataset(str(smoke_world / "finetome-smoke.jsonl"))
    assert report.rows_usable == len(sft) == report.rows_read
    pairs, report = load_preference_dataset(str(smoke_world / "orpo-dpo-mix-smoke.jsonl"))
    assert report.dropped[f"source {TOXIC_SOURCE} (dropped as the dataset card asks)"] > 0
    assert set(pairs.column_names) == {"prompt", "chosen", "rejected"}


def test_tokenizer_renders_the_llama31_format(smoke_world):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smoke_world / "base-model")
    assert tokenizer.chat_template == LLAMA31_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenize=False
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
    )
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>" != tokenizer.eos_token


def test_base_model_completes_text_but_not_chat(smoke_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smoke_world / "base-model")
    model = AutoModelForCausalLM.from_pretrained(smoke_world / "base-model")
    enc = tokenizer("3 plus 4 is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, enc.input_ids.shape[1] :]).strip().startswith("7")
