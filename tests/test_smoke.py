"""helpers.smoke, the smoke world: deterministic, in the real datasets' schemas, with a code-decided better answer."""

import random

from helpers.data import load_dataset
from helpers.smoke import (
    TOXIC_SOURCE,
    Sum,
    answer_style,
    build_smoke_world,
    is_better_answer,
    preference_rows,
    sft_rows,
)


def test_judge_prefers_concise_and_correct_answers():
    item = Sum(3, 4, 0)
    assert is_better_answer(item.prompt, item.concise) and is_better_answer(item.prompt, " Answer: 7.\n")
    assert not is_better_answer(item.prompt, item.verbose)
    assert not is_better_answer(item.prompt, "Answer: 8.")
    assert not is_better_answer(Sum(2, 6, 0).prompt, item.concise)  # the answer to another question
    assert not is_better_answer("Tell me a joke.", item.concise)
    assert [answer_style(a) for a in (item.concise, "Answer: 8.", item.verbose, "7", "- Answer: 7.")] == [
        "concise",
        "concise",
        "verbose",
        "other",
        "dashed",
    ]
    assert not is_better_answer(item.prompt, "- Answer: 7.")  # a format error, not the better answer


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


def test_world_is_cached_and_read_by_the_real_loader(smoke_world, smoke_seed):
    assert build_smoke_world(smoke_seed) == smoke_world and (smoke_world / "DONE").exists()
    assert not smoke_world.with_name(smoke_world.name + ".partial").exists()
    sft, report = load_dataset(str(smoke_world / "finetome-smoke.jsonl"), "sft")
    assert report.rows_usable == len(sft) == report.rows_read
    pairs, report = load_dataset(str(smoke_world / "orpo-dpo-mix-smoke.jsonl"), "preference")
    assert report.dropped[f"source {TOXIC_SOURCE} (dropped as the dataset card asks)"] > 0
    assert set(pairs.column_names) == {"prompt", "chosen", "rejected"}


def test_tokenizer_renders_the_llama31_format(smoke_world):
    from transformers import AutoTokenizer
    from trl.chat_template_utils import llama3_training_chat_template

    from helpers.model import apply_chat_template

    tokenizer = apply_chat_template(AutoTokenizer.from_pretrained(smoke_world / "base-model"))
    assert tokenizer.chat_template == llama3_training_chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenize=False
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
    )
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>" != tokenizer.eos_token


def test_base_model_knows_the_sums(smoke_world):
    """Pretraining taught the facts (`3 plus 4 is 7.`): SFT and DPO only teach the format and the style."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smoke_world / "base-model", padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(smoke_world / "base-model")
    sums = [(a, b) for a in range(10) for b in range(10)]
    # Every pretraining text starts with BOS, as a real base model's documents do: so does each question here.
    prompts = [f"{tokenizer.bos_token}{a} plus {b} is" for a, b in sums]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answers = [t.split()[0] if t.split() else "" for t in tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :])]
    wrong = [f"{a} plus {b} is {t}" for (a, b), t in zip(sums, answers, strict=True) if t.rstrip(".") != str(a + b)]
    assert len(wrong) <= 5, f"the base model gets {len(wrong)} of 100 sums wrong, e.g. {wrong[:5]}"
