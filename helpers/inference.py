"""Use any causal LM, plain, merged or with an adapter: greedy answers, a token-by-token comparison of two models,
and a streaming multi-turn chat.

Comparing two versions of one model (4-bit + adapter against merged 16-bit, or against a GGUF file) by their
greedy answers alone is brittle: where the reference hesitates between two tokens, a change of 0.01 in
log-probability flips the answer. So the comparison reads every answer token through both models. A token is
*decisive* when the reference chose it by at least `DECISIVE_MARGIN` nats over the runner-up, a prompt when all
its answer's tokens are: a faithful copy of the model makes the same choice there. Generation ends on any stop token
(`<|eot_id|>` or `<|end_of_text|>`), so ending is one choice: `stop_logits` adds their probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from threading import Thread
from typing import Any

import torch

from helpers.chat import EOT, stop_token_ids
from helpers.evaluate import generate_as_is

DECISIVE_MARGIN = 1.0  # nats between the greedy token and the runner-up, at every token of an answer


GREEDY_BATCH = 32  # prompts a `generate` call: a decode step costs about the same up to 64 (benchmarks/README.md)


def greedy_answers(
    model: Any, tokenizer: Any, prompts: Sequence[list[dict]], max_new_tokens: int, batch_size: int = GREEDY_BATCH
) -> list[str]:
    """Greedy answers of any causal LM (plain, merged or `PeftModel` with its active adapter) to chat `prompts`."""
    side = tokenizer.padding_side
    answers = generate_as_is(model, tokenizer, prompts, max_new_tokens, sample=False, batch_size=batch_size, desc=None)
    tokenizer.padding_side = side
    return answers.texts


@dataclass
class AnswerScores:
    """A model's view of given answers, token by token (teacher-forced): `ids` are each answer's tokens (its text,
    then `<|eot_id|>`), `logps` their log-probabilities, `top` the model's own most likely token at each position,
    and `margins` how far that token leads the runner-up (nats). Stopping counts as `<|eot_id|>` (`stop_logits`)."""

    ids: list[torch.Tensor]
    logps: list[torch.Tensor]
    top: list[torch.Tensor]
    margins: list[torch.Tensor]

    def decisive(self) -> list[bool]:
        """Per answer: is every one of its tokens the model's choice by at least `DECISIVE_MARGIN`?"""
        return [bool((t == i).all() and m.min() >= DECISIVE_MARGIN) for i, t, m in zip(*self._rows(), strict=True)]

    def decisive_tokens(self) -> torch.Tensor:
        """Over all answers' tokens: the model chose this token, by at least `DECISIVE_MARGIN`."""
        ids, top, margins = (torch.cat(x) for x in self._rows())
        return (top == ids) & (margins >= DECISIVE_MARGIN)

    def _rows(self):
        return self.ids, self.top, self.margins


def stop_logits(logits: torch.Tensor, stops: Sequence[int]) -> torch.Tensor:
    """`logits` with the stop tokens merged into the first one (log-sum-exp) and the others at -inf.

    Generation ends on any of them, so they are one choice. On a base model they can tie exactly:
    `fix_untrained_token_rows` gives `<|eot_id|>` the output row of `<|end_of_text|>`, and no stage trains it.
    """
    merged = logits.clone()
    merged[..., stops[0]] = logits[..., list(stops)].logsumexp(-1)
    merged[..., list(stops[1:])] = float("-inf")
    return merged


@torch.no_grad()
def score_answers(model: Any, tokenizer: Any, prompts: Sequence[list[dict]], answers: Sequence[str]) -> AnswerScores:
    """Read `answers` to `prompts` through `model`, one forward pass each (see `AnswerScores`)."""
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer)
    scores = AnswerScores([], [], [], [])
    for prompt, answer in zip(prompts, answers, strict=True):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        p = tokenizer(text, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer.strip() + EOT, add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([p + a], device=device)).logits[0, len(p) - 1 : -1]
        logps = torch.log_softmax(stop_logits(logits.float(), stops), dim=-1).cpu()
        top2 = logps.topk(2, dim=-1)
        scores.ids.append(torch.tensor(a))
        scores.logps.append(logps.gather(-1, torch.tensor(a)[:, None]).squeeze(-1))
        scores.top.append(top2.indices[:, 0])
        scores.margins.append(top2.values[:, 0] - top2.values[:, 1])
    return scores


def compare_logps(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> dict[str, Any]:
    """Δ = candidate − reference per answer token: `max_abs`, `mean_abs`, `mean`, and every Δ (`deltas`)."""
    deltas = torch.cat([c - r for r, c in zip(reference, candidate, strict=True)])
    return {
        "max_abs": deltas.abs().max().item(),
        "mean_abs": deltas.abs().mean().item(),
        "mean": deltas.mean().item(),
        "tokens": deltas.numel(),
        "deltas": deltas.tolist(),
    }


def same_share(a: Sequence[str], b: Sequence[str], where: Sequence[bool] | None = None) -> float:
    """Share of positions (those where `where` is true, default all) at which two lists of answers are identical."""
    pairs = [(x, y) for x, y, w in zip(a, b, where or [True] * len(a), strict=True) if w]
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else float("nan")


def compare_models(
    candidate: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict]],
    answers: Sequence[str],
    reference: AnswerScores,
    max_new_tokens: int,
) -> dict[str, Any]:
    """How far `candidate` is from the reference model whose greedy `answers` scored `reference`:

    `compare_logps` of the answers' tokens; `same_greedy`: share of prompts where the candidate's own greedy answer is
    the same, and `same_greedy_decisive` on the reference's decisive prompts (`decisive_prompts` of them);
    `same_choice_decisive`: share of the reference's decisive tokens where the candidate chooses the same token.
    """
    own = greedy_answers(candidate, tokenizer, prompts, max_new_tokens)
    scores = score_answers(candidate, tokenizer, prompts, answers)
    decisive, tokens = reference.decisive(), reference.decisive_tokens()
    same_choice = (torch.cat(scores.top) == torch.cat(reference.ids))[tokens]
    return compare_logps(reference.logps, scores.logps) | {
        "same_greedy": same_share(answers, own),
        "same_greedy_decisive": same_share(answers, own, decisive),
        "decisive_prompts": sum(decisive),
        "same_choice_decisive": same_choice.float().mean().item(),
        "decisive_tokens": int(tokens.sum()),
        "answers": own,
    }


def agrees_where_decisive(comparison: dict[str, Any]) -> bool:
    """A `compare_models` result shows a faithful copy: the same choice at every decisive token, and the same
    greedy answer to every decisive prompt."""
    choice, greedy = comparison["same_choice_decisive"], comparison["same_greedy_decisive"]  # NaN: none decisive
    return (math.isnan(choice) or choice == 1.0) and (math.isnan(greedy) or greedy == 1.0)


def describe(name: str, comparison: dict[str, Any]) -> str:
    """One line reading a `compare_models` result."""
    c = comparison
    decisive = f", {c['same_greedy_decisive']:.0%} of the decisive ones" if c["decisive_prompts"] else ""
    return (
        f"{name}: same greedy answer on {c['same_greedy']:.0%} of the prompts{decisive}; same choice at "
        f"{c['same_choice_decisive']:.0%} of the decisive tokens; |Δ log-prob| max {c['max_abs']:.4f}, "
        f"mean {c['mean_abs']:.5f} over {c['tokens']} tokens"
    )


def plot_deltas(deltas: Mapping[str, Sequence[float]]):
    """Histogram of |Δ log-probability| per answer token, one series per model (log axis: Δ spans decades)."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 3.5))
    values = {name: np.abs(np.asarray(v)) + 1e-9 for name, v in deltas.items()}
    edges = np.logspace(-9, np.log10(max(v.max() for v in values.values())) + 0.1, 40)
    for name, v in values.items():
        ax.hist(v, bins=edges, alpha=0.6, label=name)
    ax.set(xscale="log", ylabel="answer tokens")
    ax.set_xlabel("|Δ log-probability| against the 4-bit model + adapter (exact zeros drawn at 1e-9)")
    ax.legend()
    fig.tight_layout()
    return fig


def stream_reply(model: Any, tokenizer: Any, messages: list[dict], max_new_tokens: int = 256) -> Iterator[str]:
    """Yield the assistant's next answer piece by piece as `generate()` produces it (greedy, until a stop token)."""
    from transformers import TextIteratorStreamer

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
    )
    thread = Thread(target=model.generate, kwargs=kwargs)  # generate() fills the streamer; we read it here
    thread.start()
    yield from streamer
    thread.join()


class Chat:
    """A multi-turn conversation: `say()` sends a user turn, prints the answer as it streams, and keeps both."""

    def __init__(self, model: Any, tokenizer: Any, system: str | None = None, max_new_tokens: int = 256):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def say(self, text: str, echo: bool = True) -> str:
        """Send `text` as the next user turn; return the answer (printed piece by piece when `echo`)."""
        self.messages.append({"role": "user", "content": text})
        if echo:
            print(f"user: {text}\nassistant: ", end="", flush=True)
        pieces = []
        for piece in stream_reply(self.model, self.tokenizer, self.messages, self.max_new_tokens):
            pieces.append(piece)
            if echo:
                print(piece, end="", flush=True)
        if echo:
            print()
        reply = "".join(pieces).strip()
        self.messages.append({"role": "assistant", "content": reply})
        return reply
