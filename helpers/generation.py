"""Answers and their log-probabilities: `generate`, the one generation function (`helpers.sampler.Sampler` on a GPU,
3,980 new tokens/s at batch 64 on an H100 against 509 for Unsloth's `generate`, benchmarks/README.md; transformers'
`generate` on a CPU, where the sampler does not pay), `score_answers`, the one scorer of given answers, and a streaming
chat. A token is *decisive* when the model chose it by at least `DECISIVE_MARGIN` nats over the runner-up: faithful
copies of a model make the same choice there, where rounding cannot flip it (notebook 07 compares copies there).
"""

import contextlib
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from helpers import machine
from helpers.settings import EOT
from llama_sampler import Generations, Sampler, decode, render_prompt, stop_token_ids

DECISIVE_MARGIN = 1.0  # nats between the greedy token and the runner-up
LOGIT_CHUNK = 2048  # positions scored at once: fp32 logits over Llama 3's 128k tokens are 9.8 GB for 64 × 300 tokens
_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one sampler a model: its graphs and copy


def sampler_for(model: Any, tokenizer: Any) -> Sampler:
    """The model's `Sampler`, made once (capturing its CUDA graphs and its merged copy costs seconds)."""
    if model not in _SAMPLERS:
        _SAMPLERS[model] = Sampler(model, tokenizer, free_bytes=machine.gpu_free_bytes)  # within the cap
    return _SAMPLERS[model]


def forget(model: Any) -> None:
    """Drop the model's `Sampler`, which holds the model: without this, `del model` frees none of its memory."""
    _SAMPLERS.pop(model, None)


def use_adapter(model: Any, adapter: str | None):
    """TRL's context that makes `adapter` the active one (None: adapters off); nothing for a plain model."""
    from trl.trainer.utils import use_adapter as trl_use_adapter

    return trl_use_adapter(model, adapter) if hasattr(model, "peft_config") else contextlib.nullcontext()


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict]],
    max_new_tokens: int,
    sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    adapter: str | None = "default",
    batch_size: int = 64,
) -> Generations:
    """Answers to chat `prompts`, greedy or sampled (seeded), from `adapter` (None: adapters off, or a plain model):
    through the model's `Sampler` on a GPU, transformers' `generate` on a CPU, in batches of `batch_size`."""
    adapter = adapter if hasattr(model, "peft_config") else None
    if next(model.parameters()).is_cuda:
        sampler = sampler_for(model, tokenizer)
        sampler.refresh()  # the adapter may have trained since the last call (a merged copy would be stale)
        return sampler.generate(
            prompts, max_new_tokens, sample, temperature=temperature, seed=seed, adapter=adapter, batch_size=batch_size
        )
    torch.manual_seed(seed)
    rows, stops = [], dict(eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    # None: not the model's generation_config defaults, which would sample otherwise than the sampler does
    sampling = dict(do_sample=sample, temperature=temperature if sample else None, top_p=None, top_k=None)
    with use_adapter(model, adapter):
        for start in range(0, len(prompts), batch_size):
            chunk = [render_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
            # left padding: generation continues from each row's right end
            enc = tokenizer.pad({"input_ids": chunk}, padding_side="left", return_tensors="pt").to(model.device)
            out = model.generate(**enc, **sampling, **stops, max_new_tokens=max_new_tokens)
            rows += out[:, enc["input_ids"].shape[1] :].tolist()
    return decode(tokenizer, rows)


def stream(model: Any, tokenizer: Any, messages: list, show: Callable[[str], None], max_new_tokens: int = 256) -> str:
    """Answer the conversation greedily through the model's `Sampler`, calling `show` with each new piece of text as it
    is decoded; return the answer. (A piece can end inside a multi-byte character: it is shown once complete.)"""
    ids, shown, stops = [], "", set(stop_token_ids(tokenizer))

    def on_token(token: int) -> None:
        nonlocal shown
        if token not in stops:
            ids.append(token)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):
                show(text[len(shown) :])
                shown = text

    adapter = "default" if hasattr(model, "peft_config") else None
    prompt, sampler = render_prompt(tokenizer, messages), sampler_for(model, tokenizer)
    sampler.refresh()
    sampler.generate_ids([prompt], max_new_tokens, False, adapter=adapter, stream=on_token)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


class Chat:
    """A multi-turn conversation: `say()` sends a user turn, prints the answer as it streams, and keeps both."""

    def __init__(self, model: Any, tokenizer: Any, system: str | None = None, max_new_tokens: int = 256):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def say(self, text: str, echo: bool = True) -> str:
        """Send `text` as the next user turn; return the answer (printed piece by piece when `echo`)."""
        self.messages.append({"role": "user", "content": text})
        show = (lambda piece: print(piece, end="", flush=True)) if echo else (lambda piece: None)
        show(f"user: {text}\nassistant: ")
        reply = stream(self.model, self.tokenizer, self.messages, show, self.max_new_tokens)
        show("\n")
        self.messages.append({"role": "assistant", "content": reply})
        return reply


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """Token ids of an assistant answer as the chat template writes it: the text, then `<|eot_id|>`."""
    return tokenizer(answer.strip() + EOT, add_special_tokens=False)["input_ids"]


@dataclass
class AnswerScores:
    """Given answers token by token: `ids` (the text, then `<|eot_id|>`), their `logps`, the model's own likeliest token
    (`top`) and its lead over the runner-up (`margins`, nats). `merge_stops`: stopping is one choice (summed)."""

    ids: list[torch.Tensor]
    logps: list[torch.Tensor]
    top: list[torch.Tensor]
    margins: list[torch.Tensor]

    def totals(self) -> torch.Tensor:
        """log π(answer | prompt): each answer's summed token log-probabilities."""
        return torch.stack([logp.sum() for logp in self.logps])

    def decisive(self) -> list[bool]:
        """Per answer: is every one of its tokens the model's choice by at least `DECISIVE_MARGIN`?"""
        return [
            bool((t == i).all() and m.min() >= DECISIVE_MARGIN)
            for i, t, m in zip(self.ids, self.top, self.margins, strict=True)
        ]

    def decisive_tokens(self) -> torch.Tensor:
        """Over all answers' tokens: the model chose this token, by at least `DECISIVE_MARGIN`."""
        ids, top, margins = torch.cat(self.ids), torch.cat(self.top), torch.cat(self.margins)
        return (top == ids) & (margins >= DECISIVE_MARGIN)


@torch.no_grad()
def score_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict]],
    answers: Sequence[str],
    adapter: str | None = "default",
    merge_stops: bool = False,
    batch_size: int = 16,
) -> AnswerScores:
    """Read `answers` to `prompts` through `adapter` of `model` (see `AnswerScores`), in right-padded batches."""
    device, stops = next(model.parameters()).device, stop_token_ids(tokenizer)
    scores, head = AnswerScores([], [], [], []), model.get_output_embeddings()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with use_adapter(model, adapter):
        for start in range(0, len(prompts), batch_size):
            rows = [
                (render_prompt(tokenizer, p), answer_ids(tokenizer, a))
                for p, a in zip(prompts[start : start + batch_size], answers[start : start + batch_size], strict=True)
            ]
            enc = tokenizer.pad({"input_ids": [p + a for p, a in rows]}, padding_side="right", return_tensors="pt")
            hidden = base.model(**enc.to(device)).last_hidden_state
            for i, (p, a) in enumerate(rows):  # the positions that predict the answer's tokens
                states = hidden[i, len(p) - 1 : len(p) + len(a) - 1]
                logps = torch.cat([head(c).float().log_softmax(-1) for c in states.split(LOGIT_CHUNK)]).cpu()
                if merge_stops:  # ending is one choice, whichever stop token ends it
                    logps[:, stops[0]] = logps[:, stops].logsumexp(-1)
                    logps[:, stops[1:]] = -math.inf
                top2, target = logps.topk(2, dim=-1), torch.tensor(a)
                scores.ids.append(target)
                scores.logps.append(logps.gather(-1, target[:, None]).squeeze(-1))
                scores.top.append(top2.indices[:, 0])
                scores.margins.append(top2.values[:, 0] - top2.values[:, 1])
    return scores


def log_ratios(model: Any, tokenizer: Any, prompts: list, answers: list[str], policy: str, reference: str | None):
    """Per answer, log π_policy(y|x) − log π_reference(y|x) (adapters on one model; None: adapters off). Its mean
    over answers the policy sampled estimates KL(π_policy ‖ π_reference) per answer, in nats."""
    logps = [score_answers(model, tokenizer, prompts, answers, adapter).totals() for adapter in (policy, reference)]
    return logps[0] - logps[1]


def implicit_reward_accuracy(model: Any, tokenizer: Any, pairs: Any, policy: str, reference: str | None) -> float:
    """Share of preference pairs whose chosen answer gets the strictly higher implicit reward β log π/π_ref (TRL's
    `rewards/accuracies`; the sign does not depend on β)."""
    prompts = list(pairs["prompt"])
    chosen, rejected = ([row[-1]["content"] for row in pairs[k]] for k in ("chosen", "rejected"))
    margin = log_ratios(model, tokenizer, prompts, chosen, policy, reference)
    margin -= log_ratios(model, tokenizer, prompts, rejected, policy, reference)
    return (margin > 0).float().mean().item()


def compare_models(
    candidate: Any, tokenizer: Any, prompts: list, answers: list[str], reference: AnswerScores, max_new_tokens: int
) -> dict[str, Any]:
    """How far `candidate` (a plain model or one adapter) is from the reference whose greedy `answers` scored
    `reference` (`merge_stops`): Δ log-prob of every answer token, the share of prompts (and of decisive ones) where its
    greedy answer is the same, and of decisive tokens where its choice is. Its sampler is dropped after (`forget`)."""
    own = generate(candidate, tokenizer, prompts, max_new_tokens).texts
    forget(candidate)
    scores = score_answers(candidate, tokenizer, prompts, answers, merge_stops=True)
    decisive, tokens = reference.decisive(), reference.decisive_tokens()
    deltas = torch.cat([c - r for r, c in zip(reference.logps, scores.logps, strict=True)])
    same = torch.tensor([x == y for x, y in zip(answers, own, strict=True)], dtype=torch.float64)
    return {  # a share over no prompts or tokens is NaN
        "max_abs": deltas.abs().max().item(),
        "mean_abs": deltas.abs().mean().item(),
        "tokens": deltas.numel(),
        "deltas": deltas.tolist(),
        "same_greedy": same.mean().item(),
        "same_greedy_decisive": same[torch.tensor(decisive, dtype=torch.bool)].mean().item(),
        "decisive_prompts": sum(decisive),
        "same_choice_decisive": (torch.cat(scores.top) == torch.cat(reference.ids))[tokens].float().mean().item(),
        "answers": own,
    }


def agrees_where_decisive(c: dict[str, Any]) -> bool:
    """A `compare_models` result `c` shows a faithful copy: the same choice at every decisive token and the same greedy
    answer to every decisive prompt (NaN: there were none)."""
    return all(math.isnan(v) or v == 1.0 for v in (c["same_choice_decisive"], c["same_greedy_decisive"]))


def describe(name: str, c: dict[str, Any]) -> str:
    """One line reading a `compare_models` result `c`."""
    decisive = f", {c['same_greedy_decisive']:.0%} of the decisive ones" if c["decisive_prompts"] else ""
    return (
        f"{name}: same greedy answer on {c['same_greedy']:.0%} of the prompts{decisive}; same choice at "
        f"{c['same_choice_decisive']:.0%} of the decisive tokens; |Δ log-prob| max {c['max_abs']:.4f}, "
        f"mean {c['mean_abs']:.5f} over {c['tokens']} tokens"
    )
