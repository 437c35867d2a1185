"""Held out means unseen: one rule splits every dataset by *problem*, so no evaluation problem is ever trained on.

Each user turn has a problem key (`DataSettings.heldout_key`): its whitespace-normalised, case-folded text
("text"), or in the smoke world the two numbers of the sum in any wording or order ("sum"). Each key has a seeded
position in [0, 1), and a key is held out when its position falls below `eval_fraction`: a property of the
problem, not of the row or the dataset, so the same problems are held out of SFT and DPO data alike, whatever
rows either has. A "text" key's position is a hash of it. The smoke world has only 55 problems, and a hash held
out 6 to 16 of them for 90% of seeds (3 to 20 over seeds 0-999; seed 405: 6), which made its rates averages over
too few problems to compare seeds; so a toy problem's position is its hash's rank among the 55, spread evenly,
and `eval_fraction` 0.2 holds out exactly 11 of them for every seed.

- an SFT conversation that asks any held-out problem goes to `sft-eval`, the rest to `sft-train`;
- a preference pair that asks any held-out problem goes to `eval` (the held-out pairs and prompts every model is
  judged on); of the others, those whose question hashes into the next `reward_fraction` go to `reward-train`
  (the smoke profile's toy reward model trains on pairs DPO never sees), the rest to `dpo-train`.

Every run writes its splits to `outputs/<profile>/splits/*.jsonl`, and `overlap_report` re-reads them to count,
independently of the rule, what the evaluation shares with training (all zeros).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers.config import Profile
from helpers.distributed import is_main_process

TRAIN_SPLITS = ("sft-train", "dpo-train", "reward-train", "rl-train")


def normalized_text(text: str) -> str:
    """Whitespace-normalised, case-folded text: the "text" problem key."""
    return " ".join(text.split()).casefold()


def key_function(name: str):
    """The problem-key function called `name` ('text' or 'sum')."""
    if name == "text":
        return normalized_text
    if name == "sum":
        from helpers.smoke import problem_key

        return problem_key
    raise ValueError(f"heldout_key must be 'text' or 'sum', not {name!r}")


def user_keys(messages: list[dict], key) -> list[str]:
    """The problem key of every user turn in `messages`, in order."""
    return [key(m["content"]) for m in messages if m["role"] == "user"]


def unit_hash(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by `key` and `seed`, uniform over keys."""
    return int(hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()[:13], 16) / 16**13


def positions(profile: Profile) -> Callable[[str], float]:
    """The function giving a problem key its position in [0, 1) for this profile (module docstring)."""
    seed = profile.seed
    if profile.data.heldout_key != "sum":
        return lambda key: unit_hash(key, seed)
    from helpers.smoke import TOY_PROBLEMS

    ranked = sorted(TOY_PROBLEMS, key=lambda key: unit_hash(key, seed))
    place = {key: (rank + 0.5) / len(ranked) for rank, key in enumerate(ranked)}
    return lambda key: place.get(key, unit_hash(key, seed))  # other text ("Say something rude."): its hash


def subset(dataset: Any, max_rows: int | None, seed: int) -> Any:
    """A seeded random subset of `max_rows` rows, in their original order (all rows when None or fewer)."""
    if max_rows is None or len(dataset) <= max_rows:
        return dataset
    return dataset.select(sorted(random.Random(seed).sample(range(len(dataset)), max_rows)))


def split_sft(dataset: Any, profile: Profile) -> tuple[Any, Any]:
    """(train, eval) of `{"messages"}` rows: a conversation asking any held-out problem is held out."""
    key, cut, position = key_function(profile.data.heldout_key), profile.data.eval_fraction, positions(profile)
    held = [any(position(k) < cut for k in user_keys(row, key)) for row in dataset["messages"]]
    train, held_out = select(dataset, [not h for h in held]), select(dataset, held)
    require_rows({"sft-train": train}, len(dataset), profile)
    return train, held_out


def split_preferences(dataset: Any, profile: Profile) -> tuple[Any, Any, Any]:
    """(dpo_train, reward_train, eval) of `{"prompt", "chosen", "rejected"}` rows (see the module docstring)."""
    key, d, position = key_function(profile.data.heldout_key), profile.data, positions(profile)
    parts = []
    for prompt in dataset["prompt"]:
        places = [position(k) for k in user_keys(prompt, key)]
        if any(p < d.eval_fraction for p in places):
            parts.append("eval")
        elif places[-1] < d.eval_fraction + d.reward_fraction:
            parts.append("reward")
        else:
            parts.append("train")
    train, reward, held_out = (select(dataset, [p == part for p in parts]) for part in ("train", "reward", "eval"))
    require_rows({"dpo-train": train, "eval": held_out}, len(dataset), profile)
    return train, reward, held_out


def require_rows(parts: dict[str, Any], rows: int, profile: Profile) -> None:
    """Raise ValueError, saying what to change, when a split the stages need came out empty (a dataset of few
    rows, or few distinct problems, against `eval_fraction`)."""
    empty = [name for name, part in parts.items() if len(part) == 0]
    if empty:
        raise ValueError(
            f"The {' and '.join(empty)} split is empty: {rows} rows split by problem with eval_fraction "
            f"{profile.data.eval_fraction} (seed {profile.seed}). Use more rows (max_sft_rows, max_preference_rows) "
            "or change eval_fraction in a TUTORIAL_SETTINGS file."
        )


def select(dataset: Any, keep: list[bool]) -> Any:
    return dataset.select([i for i, k in enumerate(keep) if k])


# --- written splits and their overlap ---------------------------------------------------------------------


def splits_dir(profile: Profile) -> Path:
    return profile.output_dir / "splits"


def write_split(profile: Profile, name: str, dataset: Any) -> Path:
    """Write `dataset` to `splits/<name>.jsonl`, one example a line with its messages; return the path."""
    path = splits_dir(profile) / f"{name}.jsonl"
    if not is_main_process():  # under `accelerate launch` every process holds the same split; one writes it
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for row in dataset:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_split(profile: Profile, name: str) -> list[dict]:
    path = splits_dir(profile) / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def conversation(row: dict) -> list[dict]:
    """The messages of a split row: an SFT conversation, or a pair's prompt (its question and context)."""
    return row["messages"] if "messages" in row else row["prompt"]


def overlap_report(profile: Profile) -> dict[str, int]:
    """What the written evaluation split shares with the written training splits; every count should be 0.

    - `eval_problems_in_training`: held-out questions whose problem key any training split asks, in any turn;
    - `eval_prompts_in_training`: held-out prompts that occur word for word (normalised) in a training split;
    - `eval_pairs_in_training`: held-out pairs identical to a training pair;
    - `reward_pairs_in_dpo_train`: the toy reward model's pairs that DPO also trains on.
    """
    key = key_function(profile.data.heldout_key)
    training = {name: read_split(profile, name) for name in TRAIN_SPLITS}
    train_rows = [row for rows in training.values() for row in rows]
    seen_keys = {k for row in train_rows for k in user_keys(conversation(row), key)}
    seen_texts = {normalized_text(m["content"]) for row in train_rows for m in conversation(row) if m["role"] == "user"}
    pair_set = {json.dumps(r, sort_keys=True) for r in training["dpo-train"] + training["reward-train"]}
    dpo_set = {json.dumps(r, sort_keys=True) for r in training["dpo-train"]}
    evaluation = read_split(profile, "eval")
    questions = [conversation(row)[-1]["content"] for row in evaluation]
    return {
        "eval_pairs": len(evaluation),
        "eval_problems_in_training": sum(key(q) in seen_keys for q in questions),
        "eval_prompts_in_training": sum(normalized_text(q) in seen_texts for q in questions),
        "eval_pairs_in_training": sum(json.dumps(r, sort_keys=True) in pair_set for r in evaluation),
        "reward_pairs_in_dpo_train": sum(json.dumps(r, sort_keys=True) in dpo_set for r in training["reward-train"]),
    }
