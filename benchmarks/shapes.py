"""The shapes world: random weights with Llama-3.1-8B's exact shapes, a tokenizer and realistic synthetic data.

No hub is needed, so the full profile's code path (Unsloth, 4-bit, 8B shapes, 2048-token sequences) can be run
and timed on any GPU. The weights are random: the numbers it gives are speed and memory, never quality.

What padding and packing cost depends on how lengths are spread, so the data copies the real datasets'
*length distributions*, not their text. Lengths are in tokens, drawn from lognormal distributions (chat data is
right-skewed: many short questions, a long tail of long answers):

| turn | median | sigma | mean | why |
|---|---|---|---|---|
| SFT user turn | 100 | 0.9 | 150 | FineTome-100k: short instructions, some pasted documents |
| SFT assistant turn | 270 | 0.75 | 360 | FineTome-100k answers: a few paragraphs, some long |
| DPO prompt | 120 | 0.9 | 180 | orpo-dpo-mix-40k prompts |
| DPO chosen / rejected answer | 220 | 0.75 | 290 | drawn independently: a pair's two answers differ in length |

A sigma of 0.9 puts the 10th and 90th percentiles 10x apart, 0.75 about 7x: the spread that makes shuffled
batches mostly padding. 10% of the rows carry a system turn and 15% of SFT rows a second exchange, as in the real
sets. Text is made of whole-word tokens of a byte-level BPE vocabulary trained here, so a turn of n words is
about n tokens.

    python benchmarks/shapes.py --out .cache/shapes-world            # data + tokenizer (CPU, seconds)
    python benchmarks/shapes.py --out /tmp/shapes-world --model      # also the 8B-shaped model (GPU, under a minute)
    python benchmarks/shapes.py --out /tmp/shapes-world --model --reward-model   # and a reward-model stand-in

The folder then holds `finetome-shapes.jsonl`, `orpo-dpo-mix-shapes.jsonl`, `tokenizer/`, `stats.json` and
(with `--model`) `model-bnb-4bit/`: the 8B-shaped model saved in 4-bit NF4, as `unsloth/Meta-Llama-3.1-8B-bnb-4bit`
is, so loading it takes seconds (and with `--reward-model`, `reward-model-bf16/`, 16 GB). `shapes_profile(world)`
is the full profile pointed at that folder; for the notebooks, a `TUTORIAL_SETTINGS` file does the same:

    python benchmarks/shapes.py --out /tmp/shapes-world --settings /tmp/settings.json --max-rows 1000 --max-steps 10

Benchmark-only (it moved here from `helpers/shapes.py`); it uses `helpers` as the notebooks do: the 8B sizes are
notebook 01's `helpers.theory.LLAMA_31_8B`, the tokenizer trainer and `write_jsonl` those of `helpers.smoke`.
The reward-model stand-in has the shapes of the GPU profiles' reward model, `Ray2333/GRM-Llama3.2-3B-rewardmodel-ft`
(Llama-3.2-3B with a one-output head), in bf16.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from helpers import smoke
from helpers.settings import Profile, full_profile
from helpers.theory import LLAMA_31_8B, ModelShapes

TOKENIZER_VOCAB = 8192
# The rest of Llama-3.1-8B's config.json (meta-llama/Llama-3.1-8B): what `ModelShapes` does not hold, because
# it changes no parameter count.
LLAMA_31_8B_SETTINGS: dict[str, Any] = dict(
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
)
# The same code path on a CPU in seconds: small layers, the tokenizer's vocabulary.
TINY = replace(
    LLAMA_31_8B,
    vocab_size=TOKENIZER_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
# Llama-3.2-3B's (meta-llama/Llama-3.2-3B config.json): the GRM-Llama3.2-3B reward model's body.
LLAMA_32_3B = ModelShapes(
    hidden_size=3072,
    num_hidden_layers=28,
    intermediate_size=8192,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    tie_word_embeddings=True,
)
LLAMA_32_3B_SETTINGS = LLAMA_31_8B_SETTINGS | {"rope_scaling": LLAMA_31_8B_SETTINGS["rope_scaling"] | {"factor": 32.0}}
# name: (sizes, other `LlamaConfig` settings)
SHAPES: dict[str, tuple[ModelShapes, dict[str, Any]]] = {
    "llama-3.1-8b": (LLAMA_31_8B, LLAMA_31_8B_SETTINGS),
    "llama-3.2-3b": (LLAMA_32_3B, LLAMA_32_3B_SETTINGS),
    "tiny": (TINY, {**LLAMA_31_8B_SETTINGS, "max_position_embeddings": 4096}),
}

SOURCE = "shapes-synthetic"
SYSTEM_PROMPT_TOKENS = 20
SFT_FILE = "finetome-shapes.jsonl"
PREFERENCE_FILE = "orpo-dpo-mix-shapes.jsonl"
MODEL_DIR = "model-bnb-4bit"
REWARD_DIR = "reward-model-3b-bf16"
ORIGINAL_DIR = "model-bf16-original"


@dataclass(frozen=True)
class LogNormal:
    """A length in tokens: lognormal with this median and sigma (of log length), clipped to [low, high]."""

    median: float
    sigma: float
    low: int = 4
    high: int = 4000

    def sample(self, rng: random.Random) -> int:
        return int(min(self.high, max(self.low, round(rng.lognormvariate(math.log(self.median), self.sigma)))))

    @property
    def mean(self) -> float:
        return self.median * math.exp(self.sigma**2 / 2)


SFT_USER = LogNormal(100, 0.9)
SFT_ASSISTANT = LogNormal(270, 0.75)
DPO_PROMPT = LogNormal(120, 0.9)
DPO_ANSWER = LogNormal(220, 0.75)
SYSTEM_SHARE = 0.10
SECOND_EXCHANGE_SHARE = 0.15


# --- tokenizer and text ---------------------------------------------------------------------------------


def pseudo_words(rng: random.Random, n: int = 6000) -> list[str]:
    """`n` distinct pronounceable lowercase words of 1 to 4 syllables."""
    onsets = ["b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z"]
    vowels, codas = ["a", "e", "i", "o", "u"], ["", "n", "r", "s", "t"]
    words: set[str] = set()
    while len(words) < n:
        words.add(
            "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.randint(1, 4)))
        )
    return sorted(words)


def train_tokenizer(seed: int = 0, vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE tokenizer (Llama-3 special tokens, Llama-3.1 chat template) trained on pseudo-words.

    Its vocabulary is much smaller than the model's 128,256 rows: ids past it are simply never used, which
    changes nothing in the cost of a step (the output layer still has all 128,256 rows).
    """
    rng = random.Random(seed)
    words = pseudo_words(rng)
    # Zipf-like frequencies, so common words become single tokens.
    weights = [1 / (rank + 1) ** 0.8 for rank in range(len(words))]
    corpus = [" ".join(rng.choices(words, weights, k=64)) for _ in range(4000)]
    from helpers.model import apply_chat_template

    return apply_chat_template(smoke.train_tokenizer(corpus, vocab_size=vocab_size, model_max_length=131072))


def single_token_words(tokenizer) -> list[str]:
    """Words that are exactly one token when preceded by a space (so n words written make n tokens)."""
    words = []
    for token in tokenizer.get_vocab():
        word = token[1:]
        candidate = token.startswith("Ġ") and len(word) >= 2 and word.isalpha() and word.islower()
        if candidate and len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1:
            words.append(word)
    if len(words) < 100:
        raise RuntimeError(f"only {len(words)} single-token words: train the tokenizer on more text")
    return sorted(words)


def text(rng: random.Random, words: list[str], n_tokens: int) -> str:
    """About `n_tokens` tokens of text (the first word may take two or three)."""
    return " ".join(rng.choices(words, k=n_tokens))


# --- datasets in the real schemas -----------------------------------------------------------------------


def sft_rows(rng: random.Random, words: list[str], n: int) -> list[dict]:
    """Rows in mlabonne/FineTome-100k's schema: `conversations` of `{from, value}`, `source`, `score`."""
    rows = []
    for _ in range(n):
        turns = []
        if rng.random() < SYSTEM_SHARE:
            turns.append({"from": "system", "value": text(rng, words, SYSTEM_PROMPT_TOKENS)})
        for _ in range(2 if rng.random() < SECOND_EXCHANGE_SHARE else 1):
            turns.append({"from": "human", "value": text(rng, words, SFT_USER.sample(rng))})
            turns.append({"from": "gpt", "value": text(rng, words, SFT_ASSISTANT.sample(rng))})
        rows.append({"conversations": turns, "source": SOURCE, "score": round(rng.uniform(3.5, 5.0), 2)})
    return rows


def preference_rows(rng: random.Random, words: list[str], n: int) -> list[dict]:
    """Rows in mlabonne/orpo-dpo-mix-40k's schema: whole conversations in `chosen`/`rejected`, plus `prompt`,
    `question` and `source`."""
    rows = []
    for _ in range(n):
        prompt = []
        if rng.random() < SYSTEM_SHARE:
            prompt.append({"role": "system", "content": text(rng, words, SYSTEM_PROMPT_TOKENS)})
        question = text(rng, words, DPO_PROMPT.sample(rng))
        prompt.append({"role": "user", "content": question})
        chosen = {"role": "assistant", "content": text(rng, words, DPO_ANSWER.sample(rng))}
        rejected = {"role": "assistant", "content": text(rng, words, DPO_ANSWER.sample(rng))}
        rows.append(
            {
                "source": SOURCE,
                "chosen": prompt + [chosen],
                "rejected": prompt + [rejected],
                "prompt": question,
                "question": question,
            }
        )
    return rows


def length_stats(lengths: list[int], max_length: int) -> dict:
    """Median, mean, percentiles and the share over `max_length` of token lengths."""
    ordered = sorted(lengths)

    def pct(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {
        "rows": len(ordered),
        "median": statistics.median(ordered),
        "mean": round(statistics.fmean(ordered), 1),
        "p10": pct(0.10),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "max": ordered[-1],
        f"share_over_{max_length}": round(sum(n > max_length for n in ordered) / len(ordered), 4),
    }


def measure_world(world: Path, tokenizer, max_rows: int = 600) -> dict:
    """Token lengths of the written datasets, rendered with the chat template (as the loader will see them)."""
    from helpers.data import example_length, load_dataset

    sft, pref = (load_dataset(str(world / f), k)[0] for f, k in ((SFT_FILE, "sft"), (PREFERENCE_FILE, "preference")))
    sft, pref = (d.select(range(min(max_rows, len(d)))) for d in (sft, pref))
    return {
        "sft_example_tokens": length_stats([example_length(ex, tokenizer) for ex in sft], 2048),
        "dpo_pair_tokens_prompt_plus_longer_answer": length_stats([example_length(ex, tokenizer) for ex in pref], 1024),
    }


# --- the model ------------------------------------------------------------------------------------------


def model_config(tokenizer, shape: str = "llama-3.1-8b"):
    """A `LlamaConfig` with the shape's sizes and settings and the tokenizer's special token ids."""
    from transformers import LlamaConfig

    sizes, settings = SHAPES[shape]
    return LlamaConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **asdict(sizes),
        **settings,
    )


def build_model(world: Path, tokenizer, shape: str = "llama-3.1-8b", seed: int = 0, keep_bf16: bool = False) -> dict:
    """Random bf16 weights made on the GPU (CPU for `tiny`), saved, reloaded in 4-bit NF4 and saved again.

    `world / MODEL_DIR` holds the 4-bit model and the tokenizer. The bf16 copy is deleted, or with `keep_bf16` kept
    as `world / ORIGINAL_DIR`: the 16-bit weights the 4-bit ones were made from (notebook 07 merges into them to
    compare). Returns timings in seconds.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from helpers.settings import quantization_config

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    bf16_dir, q_dir = world / "model-bf16", world / MODEL_DIR
    timings = {}
    start = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(model_config(tokenizer, shape), dtype=torch.bfloat16)
    model.save_pretrained(bf16_dir, max_shard_size="5GB")
    tokenizer.save_pretrained(bf16_dir)
    timings["make_and_save_bf16_s"] = round(time.perf_counter() - start, 1)
    timings["parameters"] = sum(p.numel() for p in model.parameters())
    del model
    if on_gpu:
        torch.cuda.empty_cache()
    if not on_gpu:  # bitsandbytes 4-bit saving needs CUDA; the tiny CPU model stays bf16
        shutil.rmtree(q_dir, ignore_errors=True)
        bf16_dir.rename(q_dir)
        return timings
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        bf16_dir, quantization_config=quantization_config(), dtype=torch.bfloat16, device_map={"": 0}
    )
    model.save_pretrained(q_dir)
    tokenizer.save_pretrained(q_dir)
    timings["quantize_and_save_4bit_s"] = round(time.perf_counter() - start, 1)
    del model
    torch.cuda.empty_cache()
    if keep_bf16:
        shutil.rmtree(world / ORIGINAL_DIR, ignore_errors=True)
        bf16_dir.rename(world / ORIGINAL_DIR)
    else:
        shutil.rmtree(bf16_dir)
    return timings


def build_reward_model(world: Path, tokenizer, seed: int = 1) -> dict:
    """Random bf16 weights of the reward model's shapes (`LlamaForSequenceClassification`, one output), on the GPU,
    saved with the tokenizer to `world / REWARD_DIR`. Returns its parameters and the seconds it took."""
    import torch
    from transformers import LlamaForSequenceClassification

    start = time.perf_counter()
    torch.manual_seed(seed)
    config = model_config(tokenizer, "llama-3.2-3b")
    config.num_labels = 1
    with torch.device("cuda"):
        scorer = LlamaForSequenceClassification._from_config(config, dtype=torch.bfloat16)
    scorer.save_pretrained(world / REWARD_DIR, max_shard_size="5GB")
    tokenizer.save_pretrained(world / REWARD_DIR)
    parameters = sum(p.numel() for p in scorer.parameters())
    del scorer
    torch.cuda.empty_cache()
    return {"parameters": parameters, "seconds": round(time.perf_counter() - start, 1)}


# --- the world and its profile ----------------------------------------------------------------------------


def build_world(
    world: Path,
    sft_rows_n: int = 4000,
    preference_rows_n: int = 4000,
    seed: int = 0,
    shape: str | None = None,
    reward_model: bool = False,
) -> dict:
    """Write the tokenizer and datasets (and, when `shape` is given, the model and with `reward_model` the reward
    stand-in) to `world`; return the stats."""
    world = Path(world)
    world.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(seed)
    tokenizer.save_pretrained(world / "tokenizer")
    words = single_token_words(tokenizer)
    rng = random.Random(seed)
    smoke.write_jsonl(sft_rows(rng, words, sft_rows_n), world / SFT_FILE)
    smoke.write_jsonl(preference_rows(rng, words, preference_rows_n), world / PREFERENCE_FILE)
    stats = {
        "seed": seed,
        "distributions_tokens": {
            "sft_user": asdict(SFT_USER),
            "sft_assistant": asdict(SFT_ASSISTANT),
            "dpo_prompt": asdict(DPO_PROMPT),
            "dpo_answer": asdict(DPO_ANSWER),
            "system_share": SYSTEM_SHARE,
            "second_exchange_share": SECOND_EXCHANGE_SHARE,
        },
        "tokenizer_vocab": len(tokenizer),
        "single_token_words": len(words),
        **measure_world(world, tokenizer),
    }
    if shape is not None:
        stats["model"] = {"shape": shape, **build_model(world, tokenizer, shape, seed, keep_bf16=reward_model)}
    if reward_model:
        stats["reward_model"] = {"shape": "llama-3.2-3b", **build_reward_model(world, tokenizer)}
    (world / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def shapes_settings(world: Path) -> dict:
    """The settings that point a profile at the shapes world (its model, data and reward-model stand-in), in the
    form of a `TUTORIAL_SETTINGS` file."""
    world = Path(world).resolve()
    reward = str(world / REWARD_DIR) if (world / REWARD_DIR).is_dir() else None
    original = str(world / ORIGINAL_DIR) if (world / ORIGINAL_DIR).is_dir() else None
    return {
        "model_id": str(world / MODEL_DIR),
        "reward_model_id": reward,
        "original_model_id": original,  # the bf16 weights the 4-bit model was quantized from
        "random_weights": True,
        "data": {"sft_dataset": str(world / SFT_FILE), "preference_dataset": str(world / PREFERENCE_FILE)},
    }


def shapes_profile(world: Path, seed: int = 42, backend: str = "unsloth", base: Profile | None = None) -> Profile:
    """The full profile (or `base`) run on the shapes world: same settings, local model and data."""
    from helpers.settings import override

    return override(base or full_profile(seed, backend), shapes_settings(world), f"shapes world {world}")


def capped_settings(world: Path, max_rows: int, max_steps: int, max_new_tokens: int | None = None) -> dict:
    """`shapes_settings` plus at most `max_rows` rows of each dataset and `max_steps` optimizer steps a stage (and,
    if given, `max_new_tokens` an answer in evaluation and export): a run of the notebooks that checks the code
    path on the 8B shapes in minutes. With random weights some answers of every batch run to the cap."""
    settings = shapes_settings(world)
    settings["data"] |= {"max_sft_rows": max_rows, "max_preference_rows": max_rows}
    logging_steps = max(1, max_steps // 2)  # two logs a stage: the second one's step time is past the compiling
    settings |= {stage: {"max_steps": max_steps, "logging_steps": logging_steps} for stage in ("sft", "dpo", "rl")}
    settings["sft"]["eval_steps"] = settings["rl"]["eval_steps"] = max_steps  # one held-out reading, at the end
    # 16 held-out prompts, and 32 of the benchmark's bundled prompts (no hub there: IFBench, not IFEval).
    settings["eval"] = {"num_prompts": 16, "benchmark": "ifbench", "benchmark_prompts": 32}
    if max_new_tokens is not None:
        settings["eval"] |= {"max_new_tokens": max_new_tokens, "benchmark_max_new_tokens": max_new_tokens}
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/shapes.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write the world to")
    parser.add_argument("--model", action="store_true", help="also build the model (a GPU for the 8B shape)")
    parser.add_argument(
        "--reward-model", action="store_true", help="with --model: keep the bf16 weights, and build the reward model"
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--sft-rows", type=int, default=4000)
    parser.add_argument("--preference-rows", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--settings",
        type=Path,
        metavar="FILE",
        help="instead of building: write a TUTORIAL_SETTINGS file that points a profile at the world in --out, "
        "capped by --max-rows and --max-steps",
    )
    parser.add_argument("--max-rows", type=int, default=1000, help="with --settings: rows of each dataset")
    parser.add_argument("--max-steps", type=int, default=10, help="with --settings: optimizer steps a stage")
    parser.add_argument("--max-new-tokens", type=int, help="with --settings: tokens an answer in evaluation and export")
    args = parser.parse_args(argv)
    if args.settings:
        if not (args.out / MODEL_DIR / "config.json").exists():
            parser.error(f"{args.out} holds no model: build the world with --model first")
        settings = capped_settings(args.out, args.max_rows, args.max_steps, args.max_new_tokens)
        args.settings.write_text(json.dumps(settings, indent=1) + "\n")
        print(f"wrote {args.settings}")
        return 0
    shape = args.shape if args.model else None
    stats = build_world(args.out, args.sft_rows, args.preference_rows, args.seed, shape, args.reward_model)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
