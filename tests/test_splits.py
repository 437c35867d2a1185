"""Held out means unseen: no evaluation problem is trained on, in any wording, in any stage."""

from __future__ import annotations

from dataclasses import replace

import pytest

from helpers import splits
from helpers.config import full_profile
from helpers.data import load_preference_dataset, load_sft_dataset, to_dataset
from helpers.smoke import PROMPT_TEMPLATES, problem_key


def asked(rows, key) -> set[str]:
    """The problem keys every user turn of `rows` (conversations or pairs) asks."""
    return {k for row in rows for k in splits.user_keys(splits.conversation(row), key)}


@pytest.fixture
def smoke_splits(tmp_profile):
    """The smoke world's data split as a run splits it, and written to `splits/`."""
    sft, _ = load_sft_dataset(tmp_profile.data.sft_dataset)
    pairs, _ = load_preference_dataset(tmp_profile.data.preference_dataset)
    parts = dict(zip(("sft-train", "sft-eval"), splits.split_sft(sft, tmp_profile), strict=True))
    parts |= dict(zip(("dpo-train", "reward-train", "eval"), splits.split_preferences(pairs, tmp_profile), strict=True))
    for name, part in parts.items():
        splits.write_split(tmp_profile, name, part)
    return parts


def test_problem_key_ignores_wording_and_order():
    keys = {problem_key(t.format(a=3, b=4)) for t in PROMPT_TEMPLATES} | {problem_key("Add 4 and 3.")}
    assert keys == {"3+4"} and problem_key("What is 3 + 5?") != "3+4"


def test_smoke_evaluation_problems_are_never_trained_on(tmp_profile, smoke_splits):
    key = splits.key_function(tmp_profile.data.heldout_key)
    held_out = asked(smoke_splits["eval"], key)
    assert held_out and all(len(smoke_splits[name]) for name in smoke_splits)
    for name in ("sft-train", "dpo-train", "reward-train"):
        assert not held_out & asked(smoke_splits[name], key), f"{name} asks held-out problems"


def test_overlap_report_counts_zero_for_the_smoke_splits(tmp_profile, smoke_splits):
    report = splits.overlap_report(tmp_profile)
    assert report.pop("eval_pairs") == len(smoke_splits["eval"]) > 0
    assert report == dict.fromkeys(report, 0) and len(report) == 4


def test_the_reward_model_trains_on_pairs_dpo_never_sees(smoke_splits):
    def pair_ids(rows):
        return {str(row) for row in rows}

    assert not pair_ids(smoke_splits["reward-train"]) & pair_ids(smoke_splits["dpo-train"])


def pair(question: str, earlier: tuple[str, ...] = ()) -> dict:
    prompt = [m for q in earlier for m in ({"role": "user", "content": q}, {"role": "assistant", "content": "ok"})]
    prompt.append({"role": "user", "content": question})
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }


def test_full_rule_holds_out_a_prompt_in_every_spelling(tmp_path):
    profile = replace(full_profile(), outputs_root=str(tmp_path))
    profile = replace(profile, data=replace(profile.data, eval_fraction=0.5))
    questions = [f"Explain topic number {i} in simple words." for i in range(40)]
    held = next(q for q in questions if splits.unit_hash(splits.normalized_text(q), profile.seed) < 0.5)
    spellings = [held, held.upper(), "  " + held.replace(" ", "\n  ") + " "]
    rows = [pair(q) for q in questions + spellings[1:]] + [pair("Thanks!", earlier=(spellings[2],))]
    train, reward, evaluation = splits.split_preferences(to_dataset(rows), profile)
    assert len(reward) == 0 and len(train) and len(evaluation)
    held_out, trained = asked(evaluation, splits.normalized_text), asked(train, splits.normalized_text)
    assert splits.normalized_text(held) in held_out and not held_out & trained
    assert sum(splits.normalized_text(held) in asked([row], splits.normalized_text) for row in evaluation) == 4

    for name, part in (("dpo-train", train), ("eval", evaluation)):
        splits.write_split(profile, name, part)
    assert splits.overlap_report(profile)["eval_prompts_in_training"] == 0


def test_overlap_report_counts_a_leaked_prompt_in_any_spelling(tmp_path):
    profile = replace(full_profile(), outputs_root=str(tmp_path))
    splits.write_split(profile, "dpo-train", to_dataset([pair("What is DPO?"), pair("Other.")]))
    splits.write_split(profile, "eval", to_dataset([pair("  what is\tdpo? "), pair("New question.")]))
    report = splits.overlap_report(profile)
    assert (report["eval_pairs"], report["eval_prompts_in_training"], report["eval_problems_in_training"]) == (2, 1, 1)


def test_sft_conversation_asking_a_held_out_problem_anywhere_is_held_out(tmp_path):
    profile = replace(full_profile(), outputs_root=str(tmp_path))
    profile = replace(profile, data=replace(profile.data, eval_fraction=0.5))
    texts = [f"Question {i}?" for i in range(40)]
    held = next(t for t in texts if splits.unit_hash(splits.normalized_text(t), profile.seed) < 0.5)
    kept = next(t for t in texts if splits.unit_hash(splits.normalized_text(t), profile.seed) >= 0.5)
    conversation = [
        {"role": "user", "content": kept},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": held.lower()},
        {"role": "assistant", "content": "b"},
    ]
    other = [{"role": "user", "content": kept}, {"role": "assistant", "content": "c"}]
    train, evaluation = splits.split_sft(to_dataset([{"messages": conversation}, {"messages": other}]), profile)
    assert (len(train), len(evaluation)) == (1, 1) and evaluation[0]["messages"] == conversation


def test_an_empty_split_is_refused_with_what_to_change(tmp_path):
    profile = replace(full_profile(), outputs_root=str(tmp_path))
    profile = replace(profile, data=replace(profile.data, eval_fraction=0.0))  # nothing held out
    with pytest.raises(ValueError, match=r"The eval split is empty: 3 rows .* eval_fraction 0.0"):
        splits.split_preferences(to_dataset([pair(f"Question {i}?") for i in range(3)]), profile)


def test_smoke_holds_out_the_same_number_of_problems_for_every_seed():
    from helpers.config import smoke_profile
    from helpers.smoke import TOY_PROBLEMS

    for seed in range(30):
        position = splits.positions(smoke_profile(seed))
        assert sum(position(key) < 0.2 for key in TOY_PROBLEMS) == 11  # 0.2 × 55, where a hash held out 3 to 20
        assert position("say something rude.") == splits.unit_hash("say something rude.", seed)
