"""What an RL run maximises: a `Proxy` is TRL's `reward_funcs` plus the same score for held-out answers. Two of
them: the reward model (`reward_model_proxy`, the RL stage of notebook 06) and the answer's length
(`LENGTH_PROXY`, the deliberately flawed proxy of its reward-hacking run).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from helpers import evaluate, reward

__all__ = ["LENGTH_PROXY", "Proxy", "length_reward", "reward_model_proxy"]


@dataclass(frozen=True)
class Proxy:
    """What a run maximises: TRL's `reward_funcs` (a reward model or a function), and the same score computed for
    held-out answers (`score(prompts, generations)`, one float per answer)."""

    name: str
    reward_funcs: Any
    reward_processing_classes: Any
    score: Callable[[Sequence[list[dict]], evaluate.Generations], list[float]]


def reward_model_proxy(model: Any, tokenizer: Any) -> Proxy:
    """The reward model as the proxy: TRL applies its chat template and reads `logits[:, 0]`, as `reward.score`."""
    return Proxy(
        "reward-model score",
        model,
        tokenizer,
        lambda prompts, gens: reward.score(model, tokenizer, prompts, gens.texts),
    )


def length_reward(completion_ids: list[list[int]], **kwargs) -> list[float]:
    """The flawed proxy of the hacking run: an answer's length in tokens (its end token included).

    The longer answer always wins, as it does for a reward model that learned "longer looks better" from its
    raters' labels (Singhal et al. 2023, https://arxiv.org/abs/2310.03716), taken to the limit.
    """
    return [float(len(ids)) for ids in completion_ids]


LENGTH_PROXY = Proxy(
    "answer length (tokens)",
    length_reward,
    None,
    lambda prompts, gens: [float(n + s) for n, s in zip(gens.num_tokens, gens.stopped, strict=True)],
)
