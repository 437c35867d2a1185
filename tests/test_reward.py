"""Reward models: scoring is batch-independent, win rates count ties half, and the toy reward model learns the toy
preference well enough to judge held-out pairs it never saw."""

import math

import pytest
import torch

from helpers import pipeline, reward
from helpers.config import full_profile


def test_win_rate_counts_wins_and_half_ties():
    assert reward.win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert reward.win_rate([1.0], [1.0]) == 0.5


@pytest.mark.parametrize("a, b", [([1.0, 2.0], [1.0]), ([], [])])
def test_win_rate_needs_paired_non_empty_scores(a, b):
    with pytest.raises(ValueError, match="equally long, non-empty"):
        reward.win_rate(a, b)


def test_summarize_gives_means_and_win_rates_against_the_baseline():
    summary = reward.summarize({"sft": [0.0, 1.0], "dpo": [2.0, 1.0], "base": [-1.0, -1.0]}, baseline="sft")
    assert summary["dpo"] == {"reward_model_score_mean": 1.5, "win_rate_vs_sft": 0.75}
    assert summary["sft"]["win_rate_vs_sft"] == 0.5  # against itself: all ties
    assert summary["base"] == {"reward_model_score_mean": -1.0, "win_rate_vs_sft": 0.0}


@pytest.fixture
def untrained_reward_model(tmp_profile):
    """The smoke base weights with a fresh scalar head: enough to check how scoring reads a conversation."""
    from transformers import LlamaForSequenceClassification

    tokenizer = reward.toy_tokenizer(tmp_profile)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification.from_pretrained(tmp_profile.model_id, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def test_score_does_not_depend_on_batching(untrained_reward_model):
    model, tokenizer = untrained_reward_model
    prompts = [[{"role": "user", "content": f"What is {a} + 2?"}] for a in range(5)]
    responses = ["1 + 2 = 3.", "Let me think about this step by step. So the answer is 3.", "", "9.", "3 + 2 = 5."]
    batched = reward.score(model, tokenizer, prompts, responses, batch_size=16)
    one_by_one = reward.score(model, tokenizer, prompts, responses, batch_size=1)
    assert len(batched) == 5 and len(set(batched)) > 1
    assert batched == pytest.approx(one_by_one, abs=1e-5)


def test_score_reads_logits_0_0_of_the_templated_conversation(untrained_reward_model):
    model, tokenizer = untrained_reward_model
    messages = [{"role": "user", "content": "Add 4 and 1."}, {"role": "assistant", "content": "4 + 1 = 5."}]
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**enc).logits[0][0].item()
    assert reward.score(model, tokenizer, [messages[:1]], ["4 + 1 = 5."]) == pytest.approx([expected], abs=1e-6)
    assert reward.score(model, tokenizer, ["Add 4 and 1."], ["4 + 1 = 5."]) == pytest.approx([expected], abs=1e-6)


def test_score_needs_one_response_per_prompt(untrained_reward_model):
    with pytest.raises(ValueError, match="one response per prompt"):
        reward.score(*untrained_reward_model, ["a", "b"], ["only one"])


@pytest.mark.slow
def test_toy_reward_model_ranks_held_out_pairs(tmp_profile):
    pairs = pipeline.preference_data(tmp_profile, reward.toy_tokenizer(tmp_profile))
    one_epoch = math.ceil(len(pairs.reward) / tmp_profile.reward.per_device_train_batch_size)
    model, tokenizer = reward.train_toy_reward_model(tmp_profile, pairs.reward, max_steps=one_epoch)
    accuracy = reward.pair_accuracy(model, tokenizer, pairs.eval)
    # Most rejected answers are verbose (easy); the others are concise but wrong, hard for so small a model.
    assert accuracy >= tmp_profile.expect.reward_model_accuracy_min, accuracy
    loaded, loaded_tokenizer = reward.ensure_reward_model(tmp_profile)  # the saved copy, current: not retrained
    some = pairs.eval.select(range(8))
    answers = [m[-1]["content"] for m in some["chosen"]]
    assert reward.score(loaded, loaded_tokenizer, some["prompt"], answers) == pytest.approx(
        reward.score(model, tokenizer, some["prompt"], answers), abs=1e-5
    )


def test_judge_report_gives_accuracy_by_kind_of_rejected_answer(untrained_reward_model):
    model, tokenizer = untrained_reward_model
    user = [{"role": "user", "content": "What is 3 + 4?"}]
    answers = ["Answer: 7.", "Answer: 8.", "Let me think about this step by step. So the answer is 7."]
    pairs = [
        {"prompt": user, "chosen": [{"role": "assistant", "content": answers[0]}], "rejected": [rejected]}
        for rejected in ({"role": "assistant", "content": answers[1]}, {"role": "assistant", "content": answers[2]})
    ]
    chosen, rejected = reward.pair_scores(model, tokenizer, pairs)
    report = reward.judge_report(model, tokenizer, pairs, by_style=True)
    right = [c > r for c, r in zip(chosen, rejected, strict=True)]
    assert report == {
        "accuracy": sum(right) / 2,
        "pairs": 2,
        "accuracy_by_rejected_style": {"concise": float(right[0]), "verbose": float(right[1])},
    }


def test_without_a_toy_reward_model_it_asks_for_its_training_pairs(tmp_profile):
    with pytest.raises(FileNotFoundError, match="train_toy_reward_model"):
        reward.load_reward_model(tmp_profile)
    with pytest.raises(ValueError, match="pass its training pairs"):
        reward.ensure_reward_model(tmp_profile)


def test_toy_reward_model_is_for_the_smoke_profile_only():
    with pytest.raises(ValueError, match="the toy reward model is for the smoke profile"):
        reward.train_toy_reward_model(full_profile(), train_pairs=None)
