"""Reward models: score answers with a sequence classifier, and compare two models by their win rate.

A reward model reads a whole conversation (prompt and answer, in its own chat template) and returns one number,
`logits[0][0]`: higher means a better answer. The full profile uses `Ray2333/GRM_Llama3.1_8B_rewardmodel-ft`
(an 8B Llama with a scalar head, about 15 GB in bf16). The smoke profile has no such model, so it trains a tiny
one with TRL's `RewardTrainer` on the toy preference pairs (the Bradley-Terry loss of notebook 01:
-log σ(r(chosen) - r(rejected))), starting from the smoke base model's weights. Both are scored by `score`.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import helpers.backend  # noqa: F401  (Unsloth, when selected, patches transformers and trl first)
from helpers.chat import END_OF_TEXT, EOT, PAD
from helpers.checkpoints import KEY_FILE, is_current, key_text, save_atomically
from helpers.config import Profile

__all__ = [
    "ensure_reward_model",
    "load_reward_model",
    "pair_accuracy",
    "score",
    "summarize",
    "toy_reward_model_dir",
    "toy_tokenizer",
    "train_toy_reward_model",
    "win_rate",
]


def toy_reward_model_dir(profile: Profile) -> Path:
    """Where the smoke profile's toy reward model is saved."""
    return profile.output_dir / "reward-model"


def toy_tokenizer(profile: Profile) -> Any:
    """The smoke base model's tokenizer with the Llama-3.1 chat template: the toy reward model's tokenizer."""
    from transformers import AutoTokenizer

    from helpers.chat import apply_llama31_template

    return apply_llama31_template(AutoTokenizer.from_pretrained(profile.model_id))


def ensure_reward_model(profile: Profile, train_pairs: Any = None) -> tuple[Any, Any]:
    """The profile's reward model, in eval mode: the published one, or (smoke) the toy one, trained first on
    `train_pairs` (the `reward-train` split, which DPO never sees) unless one with the same stage key is saved."""
    if profile.reward_model_id is None and not is_current(toy_reward_model_dir(profile), profile, "reward"):
        if train_pairs is None:
            raise ValueError("No toy reward model for these settings: pass its training pairs to train one.")
        return train_toy_reward_model(profile, train_pairs)
    return load_reward_model(profile)


def train_toy_reward_model(profile: Profile, train_pairs: Any, max_steps: int = -1) -> tuple[Any, Any]:
    """Train a tiny reward model with TRL's `RewardTrainer`; save it to `toy_reward_model_dir(profile)`.

    The model is a `LlamaForSequenceClassification` (`num_labels=1`) holding the smoke base model's weights and
    a fresh scalar head, so it starts out knowing the toy sums; the whole model trains, on the CPU.

    Args:
        profile: the smoke profile (its base model and tokenizer are used).
        train_pairs: preference rows `{"prompt", "chosen", "rejected"}` (message lists): training pairs only,
            never the held-out ones the reward model will judge.
        max_steps: stop after this many optimizer steps (-1: the epochs of `profile.reward`).

    Returns:
        The trained model (in eval mode) and its tokenizer.
    """
    from transformers import LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    if profile.reward_model_id is not None:
        raise ValueError(
            f"Profile {profile.name!r} judges with {profile.reward_model_id}; the toy reward model is "
            "for the smoke profile's tiny base."
        )
    tokenizer = toy_tokenizer(profile)
    torch.manual_seed(profile.seed)  # the scalar head starts random: seed it
    model = LlamaForSequenceClassification.from_pretrained(profile.model_id, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    checkpoints = profile.output_dir / "reward-model-checkpoints"
    config = RewardConfig(
        output_dir=str(checkpoints),
        seed=profile.seed,
        max_steps=max_steps,
        lr_scheduler_type="linear",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,  # RewardConfig's default is True; a tiny fp32 model needs no mixed precision
        dataloader_num_workers=0,
        learning_rate=profile.reward.learning_rate,
        num_train_epochs=profile.reward.num_train_epochs,
        per_device_train_batch_size=profile.reward.per_device_train_batch_size,
        max_length=profile.reward.max_length,
    )
    trainer = RewardTrainer(model=model, args=config, train_dataset=train_pairs, processing_class=tokenizer)
    trainer.train()
    shutil.rmtree(checkpoints, ignore_errors=True)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / KEY_FILE).write_text(key_text(profile, "reward"))

    save_atomically(toy_reward_model_dir(profile), write)
    return model.eval(), tokenizer


def load_reward_model(profile: Profile) -> tuple[Any, Any]:
    """The profile's reward model and tokenizer, in eval mode.

    Full profile: `profile.reward_model_id` in bf16 on the GPU (its own chat template; `HF_TOKEN` from the
    environment for the hub). Smoke profile: the toy model `train_toy_reward_model` saved.

    Raises:
        FileNotFoundError: smoke profile, and no toy reward model has been trained yet.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from helpers.model import device, hub_token

    if profile.reward_model_id is None:
        folder = toy_reward_model_dir(profile)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"No toy reward model in {folder}: train it with train_toy_reward_model first.")
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
        return model.eval(), AutoTokenizer.from_pretrained(folder)
    token = hub_token(profile.reward_model_id)
    tokenizer = AutoTokenizer.from_pretrained(profile.reward_model_id, token=token)
    model = AutoModelForSequenceClassification.from_pretrained(
        profile.reward_model_id, dtype=torch.bfloat16, device_map={"": device()}, token=token
    )
    use_neutral_padding(model, tokenizer)
    return model.eval(), tokenizer


def use_neutral_padding(model: Any, tokenizer: Any) -> str:
    """Pad with a token that never ends a conversation; return it.

    The head scores the last token that is not padding. With `<|eot_id|>` or end-of-text as the padding token,
    the `<|eot_id|>` that closes the answer counts as padding, and the score moves to the token before it (as
    trained, the reward model read the closing token). Llama 3's `<|finetune_right_pad_id|>` is neutral.

    Raises:
        ValueError: the padding token is an end token and the vocabulary has no neutral one.
    """
    ends = {tokenizer.eos_token, EOT, END_OF_TEXT}
    if tokenizer.pad_token is None or tokenizer.pad_token in ends:
        if PAD not in tokenizer.get_vocab():
            raise ValueError(f"The reward model pads with {tokenizer.pad_token!r}, an end token, and has no {PAD}.")
        tokenizer.pad_token = PAD
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer.pad_token


@torch.no_grad()
def score(
    model: Any, tokenizer: Any, prompts: Sequence[list[dict] | str], responses: Sequence[str], batch_size: int = 16
) -> list[float]:
    """The reward of each response to its prompt: `logits[0][0]` of the conversation in the model's chat template.

    Conversations are tokenized exactly as `RewardTrainer` tokenizes its pairs (the tokenizer's own template) and
    scored in right-padded batches; the classification head reads the last token that is not padding, as it
    does for a batch of one.

    Args:
        prompts: chat prompts (message lists ending with the user's turn), or plain user texts.
        responses: one answer per prompt.
        batch_size: conversations per forward pass (1 when the model has no padding token).

    Returns:
        One float per (prompt, response), in order.
    """
    if len(prompts) != len(responses):
        raise ValueError(
            f"score needs one response per prompt (got {len(prompts)} prompts, {len(responses)} responses)."
        )
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages = messages + [{"role": "assistant", "content": response}]
        rows.append(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    rewards = []
    step = batch_size if pad_id is not None else 1
    for start in range(0, len(rows), step):
        batch = rows[start : start + step]
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), pad_id if pad_id is not None else 0)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(batch):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, 1)
        rewards += logits[:, 0].float().tolist()
    return rewards


def pair_scores(model: Any, tokenizer: Any, pairs: Sequence[dict]) -> tuple[list[float], list[float]]:
    """Reward-model scores of the chosen and of the rejected answer of each preference pair.

    Args:
        pairs: rows with `prompt`, `chosen`, `rejected` message lists (the answer is the last message).
    """
    prompts = [p["prompt"] for p in pairs]
    chosen = score(model, tokenizer, prompts, [p["chosen"][-1]["content"] for p in pairs])
    rejected = score(model, tokenizer, prompts, [p["rejected"][-1]["content"] for p in pairs])
    return chosen, rejected


def pair_accuracy(model: Any, tokenizer: Any, pairs: Sequence[dict]) -> float:
    """Share of preference pairs whose chosen answer the reward model scores strictly higher than the rejected."""
    chosen, rejected = pair_scores(model, tokenizer, pairs)
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


def judge_report(model: Any, tokenizer: Any, pairs: Sequence[dict], by_style: bool) -> dict:
    """How good the judge is on held-out pairs: its accuracy, and with `by_style` (the smoke task) its accuracy
    by the kind of rejected answer ('verbose', or 'concise' = concise but wrong), where its blind spots show."""
    chosen, rejected = pair_scores(model, tokenizer, pairs)
    right = [c > r for c, r in zip(chosen, rejected, strict=True)]
    report = {"accuracy": sum(right) / len(right), "pairs": len(right)}
    if by_style:
        from helpers.smoke import answer_style

        kinds = [answer_style(p["rejected"][-1]["content"]) for p in pairs]
        report["accuracy_by_rejected_style"] = {
            kind: sum(r for r, k in zip(right, kinds, strict=True) if k == kind) / kinds.count(kind)
            for kind in sorted(set(kinds))
        }
    return report


def wins(a_scores: Sequence[float], b_scores: Sequence[float]) -> list[float]:
    """Answer by answer: 1 where `a` scores higher than `b`, 0.5 for a tie, 0 where it scores lower."""
    if len(a_scores) != len(b_scores) or not a_scores:
        raise ValueError(f"wins needs two equally long, non-empty lists (got {len(a_scores)} and {len(b_scores)}).")
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(a_scores, b_scores, strict=True)]


def win_rate(a_scores: Sequence[float], b_scores: Sequence[float]) -> float:
    """Share of paired answers where `a` scores higher than `b` (a tie counts half)."""
    result = wins(a_scores, b_scores)
    return sum(result) / len(result)


def summarize(scores: dict[str, Sequence[float]], baseline: str = "sft") -> dict[str, dict[str, float]]:
    """Per model: the mean reward-model score and the win rate against `baseline`, answer by answer.

    Args:
        scores: model name -> scores of its answers, all models answering the same prompts in the same order.

    Returns:
        `{name: {"reward_model_score_mean": ..., f"win_rate_vs_{baseline}": ...}}`.
    """
    return {
        name: {
            "reward_model_score_mean": sum(values) / len(values),
            f"win_rate_vs_{baseline}": win_rate(values, scores[baseline]),
        }
        for name, values in scores.items()
    }
