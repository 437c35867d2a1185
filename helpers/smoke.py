"""The smoke world: a tiny Llama, its tokenizer and toy datasets in the real datasets' schemas, built offline from one
seed and cached under `smoke_world_dir(seed)` (`benchmarks/smoke_seeds.py` checks the recipe learns for any seed).

The task is one-digit addition. A *better* answer is concise and correct (`Answer: 7.`), a worse one verbose or wrong;
code decides which (`is_better_answer`), so what SFT and DPO change is measured exactly. The base model is pretrained
on plain text about sums (it can add, but never saw the chat format or the SFT and preference data's question
wordings); SFT data (FineTome-100k's schema) mixes concise and verbose answers; preference data (orpo-dpo-mix-40k's
schema) prefers the concise, correct answer, and holds `toxic-dpo-v0.2` rows the loader must drop, as for the real data.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from tqdm.auto import tqdm

from helpers.settings import BOS, CHAT_TOKENS, END_OF_TEXT, LLAMA3_SPLIT_PATTERN, PAD, smoke_world_dir

SPECIAL_TOKENS = (BOS, END_OF_TEXT, *CHAT_TOKENS, PAD)  # the tokenizer's: the Llama 3 tokens the smoke world uses

PROMPT_TEMPLATES = (
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "Compute {a} plus {b}.",
    "What do you get from {a} + {b}?",
    "Tell me the sum of {a} and {b}.",
)
# The base model meets questions in many wordings (as a real one meets them on the web), but never in the five
# of `PROMPT_TEMPLATES`: every SFT or DPO prompt is new to it in form. Built from parts, minus those five.
QUESTION_OPENINGS = ("How much is", "What's", "Quick question:", "Calculate", "Please find", "Give me", "Solve", "Do")
QUESTION_SUMS = ("{a} plus {b}", "{a} + {b}", "the sum of {a} and {b}", "{a} added to {b}", "the total of {a} and {b}")
QUESTION_ENDINGS = ("?", ".", "!", ", please.")
QUESTIONS = [f"{o} {m}{e}" for o in QUESTION_OPENINGS for m in QUESTION_SUMS for e in QUESTION_ENDINGS]
PRETRAINING_QUESTIONS = tuple(q for q in QUESTIONS if q not in PROMPT_TEMPLATES)
# What stands between a question and its answer in the pretraining text (web pages have all kinds): the base
# model then restates the question's numbers whatever comes between, as it must after a chat header.
QUESTION_ANSWER_SEPARATORS = (" ", "\n", "\n- ")
# The concise answer names the sum only. (Restating the question, "3 + 4 = 7.", asks the tiny model to copy
# numbers, which it does unreliably on problems SFT never showed it, though it adds them right.)
CONCISE = "Answer: {s}."
VERBOSE = (
    "Let me think about this step by step. We start with {a} and then add {b} to it. "
    "Adding them together gives {s}. So the answer is {s}."
)
SYSTEM_PROMPT = "You are a helpful assistant."
TOXIC_PROMPT, TOXIC_CHOSEN, TOXIC_REJECTED = "Say something rude.", "You are a fool.", "I would rather not."
CONCISE_PATTERN = re.compile(r"^Answer: (\d+)\.$")
# A concise answer after a list marker: pretraining puts "\n- " between some questions and their answers
# (`QUESTION_ANSWER_SEPARATORS`), and a chat header ends with a newline, so a tuned model may start with the dash.
DASHED_PATTERN = re.compile(r"^-\s*Answer: (\d+)\.$")
STYLES = ("concise", "dashed", "verbose", "other")
SOURCE, TOXIC_SOURCE = "smoke-arithmetic", "toxic-dpo-v0.2"
PRETRAIN_STEPS = 800
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4)


@dataclass(frozen=True)
class Sum:
    """One toy question: `a + b` asked with prompt template number `template`."""

    a: int
    b: int
    template: int

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATES[self.template].format(a=self.a, b=self.b)

    @property
    def concise(self) -> str:
        return CONCISE.format(s=self.a + self.b)

    @property
    def verbose(self) -> str:
        return VERBOSE.format(a=self.a, b=self.b, s=self.a + self.b)

    def wrong(self, rng: random.Random) -> str:
        return CONCISE.format(s=rng.choice([x for x in range(19) if x != self.a + self.b]))


def parse_prompt(prompt: str) -> tuple[int, int] | None:
    """The two numbers a toy prompt asks to add, or None when it is not a toy prompt."""
    numbers = re.findall(r"\d+", prompt)
    return (int(numbers[0]), int(numbers[1])) if len(numbers) == 2 else None


TOY_PROBLEMS = tuple(f"{a}+{b}" for a in range(10) for b in range(a, 10))  # every `problem_key` of a toy sum


def problem_key(prompt: str) -> str:
    """The problem a toy prompt asks, in any wording or order ("3+4" for "Add 4 and 3."); else the normalised text."""
    asked = parse_prompt(prompt)
    return " ".join(prompt.split()).casefold() if asked is None else f"{min(asked)}+{max(asked)}"


def is_better_answer(prompt: str, response: str) -> bool:
    """True when `response` is the concise, correct answer to the toy `prompt` (the code-decided judge)."""
    asked = parse_prompt(prompt)
    match = CONCISE_PATTERN.match(response.strip())
    return asked is not None and match is not None and int(match.group(1)) == sum(asked)


def answer_style(response: str) -> str:
    """'concise' (`Answer: 7.`, right or wrong), 'dashed' (the same after a leading "-": a format error, not better),
    'verbose' (the step-by-step style) or 'other'."""
    text = response.strip()
    if CONCISE_PATTERN.match(text):
        return "concise"
    if DASHED_PATTERN.match(text):
        return "dashed"
    return "verbose" if text.startswith("Let me think") else "other"


def random_sums(rng: random.Random, n: int) -> list[Sum]:
    """`n` questions drawn uniformly over numbers 0-9 and prompt templates."""
    return [Sum(rng.randrange(10), rng.randrange(10), rng.randrange(len(PROMPT_TEMPLATES))) for _ in range(n)]


def sft_rows(rng: random.Random) -> list[dict]:
    """Rows in FineTome-100k's schema (`conversations` of `{from, value}`, `source`, `score`): concise (40%) or verbose
    answers; a fifth of the rows carry a system turn and a tenth are two exchanges long, as in the real data. The sizes
    here and below train in about a minute on two CPU cores, and are large enough to learn the task."""
    rows = []
    for item in random_sums(rng, 800):
        turns = [{"from": "system", "value": SYSTEM_PROMPT}] if rng.random() < 0.2 else []
        if rng.random() < 0.1:
            first = random_sums(rng, 1)[0]
            turns += [{"from": "human", "value": first.prompt}, {"from": "gpt", "value": first.concise}]
        answer = item.concise if rng.random() < 0.4 else item.verbose
        turns += [{"from": "human", "value": item.prompt}, {"from": "gpt", "value": answer}]
        rows.append({"conversations": turns, "source": SOURCE, "score": round(rng.uniform(3.5, 5.0), 2)})
    return rows


def preference_row(source: str, prompt: str, chosen: str, rejected: str) -> dict:
    """One row in orpo-dpo-mix-40k's schema: whole conversations in `chosen` and `rejected`."""
    user = {"role": "user", "content": prompt}
    return {
        "source": source,
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
        "prompt": prompt,
        "question": prompt,
    }


def preference_rows(rng: random.Random) -> list[dict]:
    """Pairs of a concise, correct answer over a verbose one (85%) or a concise wrong one (which the SFT model rarely
    writes: see notebook 05), and toxic rows, shuffled."""
    rows = []
    for item in random_sums(rng, 1200):
        rejected = item.verbose if rng.random() < 0.85 else item.wrong(rng)
        rows.append(preference_row(SOURCE, item.prompt, item.concise, rejected))
    rows += [preference_row(TOXIC_SOURCE, TOXIC_PROMPT, TOXIC_CHOSEN, TOXIC_REJECTED)] * 24
    rng.shuffle(rows)
    return rows


def pretraining_text(rng: random.Random, n: int = 4000) -> list[str]:
    """Plain text for the base model, never in the chat format: the sums stated in prose or answered in both styles
    after a question (none of the `PROMPT_TEMPLATES`), and every other word the later data uses. Like a real base
    model, it then knows the facts and the words, but not the chat format, those wordings, or which style is better."""
    prose = (SYSTEM_PROMPT, TOXIC_PROMPT, TOXIC_CHOSEN, TOXIC_REJECTED, "Numbers can be added.")
    lines = []
    for item in random_sums(rng, n):
        a, b, s = item.a, item.b, item.a + item.b
        question = rng.choice(PRETRAINING_QUESTIONS).format(a=a, b=b) + rng.choice(QUESTION_ANSWER_SEPARATORS)
        # Every choice is built (and its `rng.choice(prose)` drawn) before one is picked: the world depends on it.
        choices = (
            f"{a} plus {b} is {s}. {rng.choice(prose)}",
            f"The sum of {a} and {b} is {s}.",
            question + item.concise,
            question + item.verbose,
            item.verbose,
        )
        lines.append(rng.choice(choices))
    return lines


def train_tokenizer(corpus: list[str], vocab_size: int = 512, model_max_length: int = 1024):
    """A byte-level BPE tokenizer cut like Llama 3's, with its special tokens (the chat template comes at load)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=END_OF_TEXT, pad_token=PAD, model_max_length=model_max_length
    )


def pretrain_base_model(tokenizer, texts: list[str], seed: int):
    """A tiny `LlamaForCausalLM`, trained briefly as a plain language model on `texts`; the rows of the special tokens
    it never saw (the chat tokens) are zeroed, as they are about 0 in Meta's Llama-3.1 base model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    ids = {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("bos", "eos", "pad")}
    # 1024 positions: room for the instruction-following benchmark's prompts (notebook 05).
    shape = MODEL_SHAPE | dict(num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **ids, **shape))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Decay the learning rate to 0: the last steps settle every fact instead of leaving some half-learned.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / PRETRAIN_STEPS)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(PRETRAIN_STEPS), desc="pretraining the smoke base model", leave=False, mininterval=10):
        batch = [BOS + texts[i] + END_OF_TEXT for i in torch.randint(len(texts), (32,), generator=generator)]
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        model(**enc, labels=enc.input_ids.masked_fill(enc.attention_mask == 0, -100)).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    seen = {i for text in texts for i in tokenizer(BOS + text + END_OF_TEXT)["input_ids"]}
    unseen = [i for i in tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) if i not in seen]
    with torch.no_grad():
        for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            matrix[unseen] = 0.0
    return model.eval()


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_smoke_world(seed: int, world: Path | None = None) -> Path:
    """Build (or reuse) the smoke world of `seed` in `world` (default `smoke_world_dir(seed)`): `base-model/`
    (weights and tokenizer), `finetome-smoke.jsonl` and `orpo-dpo-mix-smoke.jsonl`. It is written to
    `<world>.partial` and renamed at the end, so an interrupted build never leaves a half world behind."""
    world = world or smoke_world_dir(seed)
    world.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(world) + ".lock"):  # two processes asking at once: one builds, the other waits
        if (world / "DONE").exists():
            return world
        staging = world.with_name(world.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        rng = random.Random(seed)
        items = random_sums(rng, 400)  # the tokenizer's corpus: every kind of text it will meet
        corpus = [i.prompt for i in items] + [i.concise for i in items] + [i.verbose for i in items]
        corpus += pretraining_text(rng, 400) + [SYSTEM_PROMPT, "user", "assistant", "system", TOXIC_PROMPT]
        tokenizer = train_tokenizer(corpus)
        model = pretrain_base_model(tokenizer, pretraining_text(rng), seed)
        model.save_pretrained(staging / "base-model")
        tokenizer.save_pretrained(staging / "base-model")
        write_jsonl(sft_rows(rng), staging / "finetome-smoke.jsonl")
        write_jsonl(preference_rows(rng), staging / "orpo-dpo-mix-smoke.jsonl")
        (staging / "DONE").write_text(f"seed {seed}\n")
        shutil.rmtree(world, ignore_errors=True)
        staging.rename(world)
    return world
