"""Measure a policy: generations, DPO's implicit rewards on held-out pairs, and code-judged answer quality.

Models are compared as adapters on one 4-bit base (`None` = adapters off = the base model), so base, SFT and
DPO cost the memory of one model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

import helpers.backend  # noqa: F401  (Unsloth, when selected, patches trl first)
from helpers.chat import EOT, stop_token_ids

from trl.trainer.utils import use_adapter  # isort: skip  (after helpers.backend)


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def render_prompt(tokenizer: Any, prompt: list[dict]) -> list[int]:
    """Token ids of a prompt rendered with the chat template, ending with the assistant header."""
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_ids(tokenizer: Any, answer: list[dict]) -> list[int]:
    """Token ids of an assistant answer as the chat template writes it: the text, then `<|eot_id|>`."""
    return tokenizer(answer[-1]["content"].strip() + EOT, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def sequence_logps(
    model: Any, tokenizer: Any, prompts: Sequence[list[dict]], answers: Sequence[list[dict]], batch_size: int = 16
) -> torch.Tensor:
    """Sum of log π(answer token | everything before it) over each answer's tokens: log π(y|x)."""
    totals = []
    for start in range(0, len(prompts), batch_size):
        rows = [
            (render_prompt(tokenizer, p), completion_ids(tokenizer, a))
            for p, a in zip(prompts[start : start + batch_size], answers[start : start + batch_size], strict=True)
        ]
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        attention = torch.zeros_like(ids)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        for i, (p, c) in enumerate(rows):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            attention[i, : len(p) + len(c)] = 1
            scored[i, len(p) : len(p) + len(c)] = True
        device = model_device(model)
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits[:, :-1].float()
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
        totals.append((token_logps * scored[:, 1:].to(device)).sum(-1).cpu())
    return torch.cat(totals)


def implicit_rewards(
    model: Any, tokenizer: Any, pairs: Any, beta: float, policy: str | None, reference: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards r = β (log π(y|x) − log π_ref(y|x)) for chosen and rejected answers.

    Args:
        pairs: rows with `prompt`, `chosen`, `rejected` message lists.
        policy, reference: adapter names on `model` (None = adapters off, the base model).
    """
    prompts = list(pairs["prompt"])
    logps = {}
    for name in (policy, reference):
        with use_adapter(model, name):
            logps[name] = [sequence_logps(model, tokenizer, prompts, list(pairs[k])) for k in ("chosen", "rejected")]
    return tuple(beta * (logps[policy][i] - logps[reference][i]) for i in range(2))


def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Share of pairs whose chosen answer gets the strictly higher implicit reward (TRL's `rewards/accuracies`)."""
    return (chosen_rewards > rejected_rewards).float().mean().item()


@dataclass
class Generations:
    """Answers to a list of prompts: the texts, their length in tokens, and whether each ended by itself."""

    texts: list[str]
    num_tokens: list[int]
    stopped: list[bool]  # True: the model ended the turn (<|eot_id|>); False: cut at max_new_tokens

    def stopped_share(self) -> float:
        return sum(self.stopped) / len(self.stopped)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict]],
    max_new_tokens: int,
    sample: bool,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    adapter: str | None = "default",
    desc: str = "generating",
) -> Generations:
    """Answers to chat `prompts`, greedy or sampled (seeded), with the given adapter (None = base model)."""
    torch.manual_seed(seed)
    with use_adapter(model, adapter):
        return generate_as_is(model, tokenizer, prompts, max_new_tokens, sample, temperature, batch_size, desc)


@torch.no_grad()
def generate_as_is(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict]],
    max_new_tokens: int,
    sample: bool,
    temperature: float = 1.0,
    batch_size: int = 16,
    desc: str | None = "generating",
) -> Generations:
    """`generate` from any causal LM as it stands (plain, merged, or a `PeftModel` with its active adapter), no
    adapter chosen and no seed set. `desc=None` shows no progress bar."""
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    stops = stop_token_ids(tokenizer)
    texts, num_tokens, stopped = [], [], []
    for start in tqdm(
        range(0, len(prompts), batch_size),
        desc=desc,
        leave=False,
        disable=desc is None or len(prompts) <= batch_size,
        mininterval=10,  # a few lines in an executed notebook, not one per batch
    ):
        rows = [
            tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in prompts[start : start + batch_size]
        ]
        enc = tokenizer(rows, add_special_tokens=False, padding=True, return_tensors="pt").to(model_device(model))
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=None,
            top_k=None,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), None)
            answer = row if end is None else row[:end]
            texts.append(tokenizer.decode(answer, skip_special_tokens=True).strip())
            num_tokens.append(len(answer))
            stopped.append(end is not None)
    tokenizer.padding_side = "right"
    return Generations(texts, num_tokens, stopped)


def bootstrap_interval(values: Sequence[float], samples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple:
    """A percentile bootstrap confidence interval for the mean of `values` (resampled with replacement)."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    tail = (1 - level) / 2
    return means[int(tail * samples)], means[min(samples - 1, int((1 - tail) * samples))]


def judge_responses(
    prompts: Sequence[list[dict]], responses: Sequence[str], judge: Callable[[str, str], bool]
) -> float:
    """Share of responses the code `judge(prompt_text, response)` calls better."""
    verdicts = [judge(p[-1]["content"], r) for p, r in zip(prompts, responses, strict=True)]
    return sum(verdicts) / len(verdicts)
