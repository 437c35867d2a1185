"""The training recipe on the page: each stage's settings next to the other profile's, with the reason for each,
and the numbers they imply (effective batch, optimizer steps, warm-up, tokens a step, the LoRA scale).

Notebooks 03, 04 and 06 show these tables before training; the values are read from `helpers.config`, so the page
cannot drift from what runs.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from helpers.config import PROFILE_BUILDERS, Profile

# Why each setting has its value: TRL/peft field name -> reason. One sentence each; the values are in config.py.
WHY = {
    "r": "the rank of each adapter: 16 is the common QLoRA choice, enough for style and format",
    "alpha": "with rsLoRA the update is scaled by α/√r (below), so α = r gives a scale of √r",
    "dropout": "0: short runs on large data do not overfit, and Unsloth's fast path needs it",
    "use_rslora": "keeps the update's size independent of r, so a rank change needs no new learning rate",
    "target_modules": "all seven projections: attention and MLP (QLoRA's finding: all layers beat attention only)",
    "trainable_tokens": "input rows of chat tokens the base never saw, trained (smoke: its tiny model needs them)",
    "modules_to_save": "no full copies: the 8B model's embeddings alone would be 2 GB of trainable weights",
    "learning_rate": "GPU: QLoRA's usual SFT rate, and a far smaller DPO rate (the policy stays near its reference); "
    "smoke: larger, for a tiny model in a few hundred steps",
    "num_train_epochs": "one pass over real data; more over the small smoke data so the tiny model learns",
    "max_steps": "-1: the epochs decide (set it to stop early)",
    "per_device_train_batch_size": "the largest batch measured fastest on the H200 that fits a 24 GB GPU",
    "gradient_accumulation_steps": "batches summed before an optimizer step (the effective batch below)",
    "max_length": "longer rows are dropped, never cut: a cut answer teaches the model to stop mid-sentence",
    "packing": "GPU: several conversations a row, no padding; smoke: one a row, so the loss mask is easy to check",
    "optim": "8-bit AdamW on a GPU (a quarter of the optimizer memory); plain AdamW on a CPU",
    "lr_scheduler_type": "linear decay to 0: the last steps make small changes",
    "warmup_steps": "a share (< 1) or a number of steps with a rising learning rate: Adam's statistics settle first",
    "weight_decay": "a small pull of the adapters towards 0",
    "beta": "how far the policy may move from the reference before the loss stops rewarding more (notebook 01)",
    "loss_type": "RPO: DPO's sigmoid loss plus the NLL of the chosen answer, which keeps chosen answers likely",
    "loss_weights": "None: both terms weigh 1",
    "group_by_length": "pairs of similar length batched together: far less padding, the same expected gradient",
    "precompute_ref_log_probs": "score the reference once first: pays over 3 epochs on a CPU; on an H200 (221 pairs) "
    "only from about the sixth epoch (benchmarks/README.md)",
    "logging_steps": "how often the loss, rewards and memory are logged",
    "save_steps": "how often a checkpoint is written (a run resumes from the last complete one)",
}


# Where a field means something else in one stage's settings.
WHY_IN = {
    "rl": {
        "start_from": "the model RL trains and its KL reference: SFT, as InstructGPT's pipeline (06 says why)",
        "beta": "weight of the KL to the start model in the reward: the leash against reward hacking",
        "learning_rate": "small: every step follows the policy's own samples, and a large step compounds",
        "num_train_epochs": "unused: max_steps decides how long RL runs",
        "max_steps": "RL runs for a number of sampled batches, not epochs over a dataset",
        "num_generations": "answers sampled per prompt: RLOO's baseline for one is the mean of the others",
        "per_device_train_batch_size": "answers a batch (prompts × num_generations)",
        "max_completion_length": "answers are cut here; a cut answer gets the reward of what it wrote",
        "temperature": "1.0: sample from the policy itself, as the RL objective assumes",
        "lr_scheduler_type": "constant: no fixed end to decay towards",
        "weight_decay": "0, written out: Unsloth's RL trainers would set 0.001",
        "eval_steps": "how often the held-out prompts are answered and judged (06's curves)",
    },
}


def other_profile(profile: Profile) -> Profile:
    """The profile to compare with: the GPU default (`quick`) for the smoke profile, `smoke` for the others."""
    name = "quick" if profile.name == "smoke" else "smoke"
    return PROFILE_BUILDERS[name](profile.seed)


def settings_table(profile: Profile, section: str) -> str:
    """A markdown table of `profile.<section>` (e.g. "sft", "dpo", "lora"): field, this value, the other
    profile's value, why."""
    other = other_profile(profile)
    mine, theirs = getattr(profile, section), getattr(other, section)
    lines = [f"| `{section}` field | {profile.name} | {other.name} | why |", "|---|---|---|---|"]
    why = WHY | WHY_IN.get(section, {})
    for f in fields(mine):
        a, b = getattr(mine, f.name), getattr(theirs, f.name)
        mark = "" if a == b else " ◀"
        lines.append(f"| `{f.name}` | {show(a)}{mark} | {show(b)} | {why.get(f.name, '')} |")
    return "\n".join(lines)


def show(value: Any) -> str:
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) or "–"
    return f"{value:g}" if isinstance(value, float) else str(value)


def lora_scale(profile: Profile) -> float:
    """The factor LoRA's update B·A is multiplied by: α/√r with rsLoRA, α/r without."""
    s = profile.lora
    return s.alpha / math.sqrt(s.r) if s.use_rslora else s.alpha / s.r


def derived_numbers(profile: Profile, stage: str, rows: int, mean_tokens: float, world_size: int = 1) -> dict:
    """What the settings imply for `rows` training rows of `mean_tokens` tokens each (pairs, for DPO)."""
    s = getattr(profile, stage)
    effective = s.per_device_train_batch_size * s.gradient_accumulation_steps * world_size
    batches = math.ceil(rows / (s.per_device_train_batch_size * world_size))
    per_epoch = max(1, batches // s.gradient_accumulation_steps)
    steps = s.max_steps if s.max_steps > 0 else math.ceil(per_epoch * s.num_train_epochs)
    warmup = math.ceil(s.warmup_steps * steps) if s.warmup_steps < 1 else int(s.warmup_steps)
    return {
        "rows (pairs for DPO) an optimizer step": effective,
        "optimizer steps": steps,
        "warm-up steps": warmup,
        "tokens an optimizer step (mean)": round(effective * mean_tokens),
        "LoRA scale": lora_scale(profile),
    }


def describe_derived(numbers: dict, profile: Profile) -> str:
    """The derived numbers as lines, with what the LoRA scale means for the learning rate."""
    lines = [f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v:,}" for k, v in numbers.items()]
    s = profile.lora
    plain = s.alpha / s.r
    lines.append(
        f"LoRA's update is scaled by {'α/√r' if s.use_rslora else 'α/r'} = {numbers['LoRA scale']:g} "
        f"(plain LoRA's α/r would be {plain:g}): for Adam, whose steps are about the learning rate in size, the "
        f"same learning rate moves the weights {numbers['LoRA scale'] / plain:g}× as far as with plain LoRA."
    )
    return "\n".join(lines)
