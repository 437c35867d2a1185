"""The smoke world: a tiny Llama, its tokenizer and toy datasets in the real datasets' schemas, built offline.

The toy task is one-digit addition. A *better* answer is concise and correct (`Answer: 7.`); a worse one is
verbose (`Let me think about this step by step. ...`) or wrong. Code decides which is which
(`is_better_answer`), so the effect of SFT and DPO can be measured exactly:

- the base model is pretrained on plain text about sums (statements, and questions in many wordings followed by
  a concise or a verbose answer): it can add and completes text, but has never seen the chat format or the five
  question wordings of the SFT and preference data;
- SFT data (FineTome-100k's schema) mixes concise and verbose answers, so SFT teaches the format and both styles;
- preference data (orpo-dpo-mix-40k's schema) prefers the concise, correct answer to a verbose one or (less
  often) a concise but wrong one, so DPO should shift the model toward concise answers. It also holds
  `toxic-dpo-v0.2` rows, which the loader must drop, as for the real data.

Everything is derived from one seed and cached under `smoke_world_dir(seed)`; `benchmarks/smoke_seeds.py` checks
that the recipe learns for seeds nobody chose.
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

from helpers.chat import BOS, END_OF_TEXT, LLAMA3_SPLIT_PATTERN, PAD, SPECIAL_TOKENS, apply_llama31_template
from helpers.config import smoke_world_dir

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
PRETRAINING_QUESTIONS = tuple(
    q
    for q in (f"{o} {m}{e}" for o in QUESTION_OPENINGS for m in QUESTION_SUMS for e in QUESTION_ENDINGS)
    if q not in PROMPT_TEMPLATES
)
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
CONCISE_PATTERN = re.compile(r"^Answer: (\d+)\.$")
SOURCE = "smoke-arithmetic"
TOXIC_SOURCE = "toxic-dpo-v0.2"

# Sizes: small enough to train in about a minute on two CPU cores, large enough to learn the task.
NUM_SFT_ROWS = 800
NUM_PREFERENCE_ROWS = 1200
NUM_TOXIC_ROWS = 24
CONCISE_SFT_SHARE = 0.4  # SFT demonstrations answer concisely this often, else verbosely
VERBOSE_REJECTED_SHARE = 0.85  # the others are concise but wrong (which the SFT model rarely writes: see notebook 05)
VOCAB_SIZE = 512
PRETRAIN_STEPS = 800
MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


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
        s = self.a + self.b
        return CONCISE.format(s=rng.choice([x for x in range(19) if x != s]))


def parse_prompt(prompt: str) -> tuple[int, int] | None:
    """The two numbers a toy prompt asks to add, or None when it is not a toy prompt."""
    numbers = re.findall(r"\d+", prompt)
    return (int(numbers[0]), int(numbers[1])) if len(numbers) == 2 else None


TOY_PROBLEMS = tuple(f"{a}+{b}" for a in range(10) for b in range(a, 10))  # every `problem_key` of a toy sum


def problem_key(prompt: str) -> str:
    """The problem a toy prompt asks, whatever its wording or order ("3+4" for "Add 4 and 3."); other text
    is its own problem (normalised)."""
    asked = parse_prompt(prompt)
    if asked is None:
        return " ".join(prompt.split()).casefold()
    return f"{min(asked)}+{max(asked)}"


def is_better_answer(prompt: str, response: str) -> bool:
    """True when `response` is the concise, correct answer to the toy `prompt` (the code-decided judge)."""
    asked = parse_prompt(prompt)
    match = CONCISE_PATTERN.match(response.strip())
    return asked is not None and match is not None and int(match.group(1)) == sum(asked)


def answer_style(response: str) -> str:
    """'concise' (`Answer: 7.`, right or wrong), 'verbose' (the step-by-step style) or 'other'."""
    text = response.strip()
    if CONCISE_PATTERN.match(text):
        return "concise"
    return "verbose" if text.startswith("Let me think") else "other"


def random_sums(rng: random.Random, n: int) -> list[Sum]:
    """`n` questions drawn uniformly over numbers 0-9 and prompt templates."""
    return [Sum(rng.randrange(10), rng.randrange(10), rng.randrange(len(PROMPT_TEMPLATES))) for _ in range(n)]


def sft_rows(rng: random.Random) -> list[dict]:
    """Rows in FineTome-100k's schema: `conversations` of `{from, value}`, `source`, `score`.

    Half the answers are concise and half verbose; a fifth of the rows carry a system turn and a tenth are
    two exchanges long, as in the real data.
    """
    rows = []
    for item in random_sums(rng, NUM_SFT_ROWS):
        turns = [{"from": "system", "value": SYSTEM_PROMPT}] if rng.random() < 0.2 else []
        if rng.random() < 0.1:
            first = random_sums(rng, 1)[0]
            turns += [{"from": "human", "value": first.prompt}, {"from": "gpt", "value": first.concise}]
        answer = item.concise if rng.random() < CONCISE_SFT_SHARE else item.verbose
        turns += [{"from": "human", "value": item.prompt}, {"from": "gpt", "value": answer}]
        rows.append({"conversations": turns, "source": SOURCE, "score": round(rng.uniform(3.5, 5.0), 2)})
    return rows


def preference_rows(rng: random.Random) -> list[dict]:
    """Rows in orpo-dpo-mix-40k's schema: `source`, whole conversations in `chosen`/`rejected`, `prompt`,
    `question`. Chosen is concise and correct; rejected is verbose or concise but wrong (half each)."""
    rows = []
    for item in random_sums(rng, NUM_PREFERENCE_ROWS):
        rejected = item.verbose if rng.random() < VERBOSE_REJECTED_SHARE else item.wrong(rng)
        user = {"role": "user", "content": item.prompt}
        rows.append(
            {
                "source": SOURCE,
                "chosen": [user, {"role": "assistant", "content": item.concise}],
                "rejected": [user, {"role": "assistant", "content": rejected}],
                "prompt": item.prompt,
                "question": item.prompt,
            }
        )
    for _ in range(NUM_TOXIC_ROWS):
        user = {"role": "user", "content": "Say something rude."}
        rows.append(
            {
                "source": TOXIC_SOURCE,
                "chosen": [user, {"role": "assistant", "content": "You are a fool."}],
                "rejected": [user, {"role": "assistant", "content": "I would rather not."}],
                "prompt": user["content"],
                "question": user["content"],
            }
        )
    rng.shuffle(rows)
    return rows


def pretraining_text(rng: random.Random, n: int = 4000) -> list[str]:
    """Plain text for the base model, never in the chat format: the sums stated in prose, answered after a
    question in both styles, and sentences with every other word the later data uses.

    Like a real base model, it then knows the facts and every word, but not the chat format, not the five
    question wordings of the SFT and preference data, and not that one style is preferred. Its question wording
    ("How much is 3 plus 4?") is none of the `PROMPT_TEMPLATES`.
    """
    prose = (SYSTEM_PROMPT, "Say something rude.", "You are a fool.", "I would rather not.", "Numbers can be added.")
    lines = []
    for item in random_sums(rng, n):
        a, b, s = item.a, item.b, item.a + item.b
        question = rng.choice(PRETRAINING_QUESTIONS).format(a=a, b=b) + rng.choice(QUESTION_ANSWER_SEPARATORS)
        lines.append(
            rng.choice(
                (
                    f"{a} plus {b} is {s}. {rng.choice(prose)}",
                    f"The sum of {a} and {b} is {s}.",
                    question + item.concise,
                    question + item.verbose,
                    item.verbose,
                )
            )
        )
    return lines


def tokenizer_corpus(rng: random.Random) -> list[str]:
    """Every kind of text the tokenizer will meet, for training its merges."""
    items = random_sums(rng, 400)
    return (
        [i.prompt for i in items]
        + [i.concise for i in items]
        + [i.verbose for i in items]
        + pretraining_text(rng, 400)
        + [SYSTEM_PROMPT, "user", "assistant", "system", "Say something rude."]
    )


def train_tokenizer(
    corpus: list[str], vocab_size: int = VOCAB_SIZE, model_max_length: int = MODEL_SHAPE["max_position_embeddings"]
):
    """A byte-level BPE tokenizer cut like Llama 3's, with its special tokens and the Llama-3.1 chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=END_OF_TEXT,
        pad_token=PAD,
        model_max_length=model_max_length,
    )
    return apply_llama31_template(tokenizer)


def pretrain_base_model(tokenizer, texts: list[str], seed: int):
    """A tiny `LlamaForCausalLM`, trained briefly as a plain language model on `texts`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Decay the learning rate to 0: the last steps settle every fact instead of leaving some half-learned.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / PRETRAIN_STEPS)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(PRETRAIN_STEPS), desc="pretraining the smoke base model", leave=False, mininterval=10):
        batch = [BOS + texts[i] + END_OF_TEXT for i in torch.randint(len(texts), (32,), generator=generator)]
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    zero_unseen_token_rows(model, tokenizer, texts)
    return model.eval()


def zero_unseen_token_rows(model, tokenizer, texts: list[str]) -> list[int]:
    """Zero the embedding and output rows of the special tokens pretraining never used (the chat tokens), as
    they are in Meta's Llama-3.1 base model (about 0 there). Returns their ids."""
    seen = {i for text in texts for i in tokenizer(BOS + text + END_OF_TEXT)["input_ids"]}
    unseen = [i for i in tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) if i not in seen]
    with torch.no_grad():
        for matrix in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            matrix[unseen] = 0.0
    return unseen


def write_jsonl(rows: list[dict], path: Path) -> None:
    """Write `rows` as JSON lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_smoke_world(seed: int, force: bool = False, world: Path | None = None) -> Path:
    """Build (or reuse) the smoke world for `seed` in `world` (default `smoke_world_dir(seed)`); return its folder.

    The folder holds `base-model/` (weights and tokenizer), `finetome-smoke.jsonl` and
    `orpo-dpo-mix-smoke.jsonl`. It is written to a temporary folder and renamed at the end, so an interrupted
    build never leaves a half world behind.
    """
    world = world or smoke_world_dir(seed)
    world.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(world) + ".lock"):  # two processes asking at once: one builds, the other waits
        if (world / "DONE").exists() and not force:
            return world
        return build_world_unlocked(world, seed)


def build_world_unlocked(world: Path, seed: int) -> Path:
    """Write the world into `<world>.partial`, then rename it into place (callers hold the lock)."""
    staging = world.with_name(world.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    rng = random.Random(seed)
    tokenizer = train_tokenizer(tokenizer_corpus(rng))
    model = pretrain_base_model(tokenizer, pretraining_text(rng), seed)
    model.save_pretrained(staging / "base-model")
    tokenizer.save_pretrained(staging / "base-model")
    write_jsonl(sft_rows(rng), staging / "finetome-smoke.jsonl")
    write_jsonl(preference_rows(rng), staging / "orpo-dpo-mix-smoke.jsonl")
    (staging / "DONE").write_text(f"seed {seed}\n")
    if world.exists():
        shutil.rmtree(world)
    staging.rename(world)
    return world
