"""Expected time of the whole notebook series (01 to 07) on one GPU, for the `quick` and `full` profiles.

    python benchmarks/estimate_series.py            # writes results/quick-profile-estimate.json and the README tables
    python benchmarks/estimate_series.py --print    # only prints them

Every stage is `helpers.estimates` arithmetic on the measured H200 rates (`results/h200-run*.json`), the data the
benchmarks timed (synthetic, with the lengths of `shapes.py`: the real datasets cannot be read on the GPU machine)
and the profile's own settings: rows = the seeded subset of `helpers.splits.subset` (all rows for `full`), less the
held-out share (`eval_fraction`) and the rows over `max_length` (the share the benchmark data had). What no
benchmark measured is an assumption, named in the table: notebook start-up (02's time in the H200 main job), the
download speed, what notebook 06 samples, and notebook 07's file work (the times its Needs line reports).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_training import environment  # this script's folder is first on sys.path
from report import replace_between
from shapes import DPO_PROMPT

from helpers.config import Profile, full_profile, quick_profile
from helpers.estimates import (
    A100_40GB,
    GPU,
    GPUS,
    H200,
    RESULTS,
    REWARD_TOKENS_PER_S,
    generation_rates,
    generation_s,
    measured_rates,
    rl,
    training,
)
from helpers.inference import GREEDY_BATCH

README = Path(__file__).resolve().parent / "README.md"
OUT = RESULTS / "quick-profile-estimate.json"
START, END = "<!-- estimate:start -->", "<!-- estimate:end -->"
# Whole datasets (REFERENCE §5): FineTome-100k; orpo-dpo-mix-40k less its 541 toxic-dpo rows.
FULL_ROWS = {"sft": 100_000, "preference": 44_245 - 541}
# Downloads in GB by notebook: unsloth/Meta-Llama-3.1-8B-bnb-4bit, GRM-Llama3.1-8B in bf16, the 16-bit checkpoint
# 07 merges into to measure the other merge base (REFERENCE §5, the notebooks' Needs lines). Datasets are small.
DOWNLOAD_GB = {"02": ("the 4-bit base", 5.7), "05": ("the reward model", 15.0), "07": ("16-bit Llama-3.1-8B", 16.0)}
DOWNLOAD_MB_S = 100  # an assumption; a cloud machine often gets more from the Hub
# Notebook 07's file work on the H200: merge 3 s, save 20 s and read the GGUF back 67 s as its author timed them; the
# Q8_0 GGUF's writing cell took 95 s in the capped main job (results/h200-main-job.json, 2026-11-30).
NOTEBOOK_07_FILES_S = 3 + 20 + 95 + 67
# Notebook 07 makes every version of the model answer the held-out prompts greedily and scores the reference's
# answers with it: the 4-bit model with the adapter, the same through plain peft, merged into each base, the GGUF.
NOTEBOOK_07_VERSIONS = 5
CHAT_TURNS = 3  # notebook 07's streaming chat, one answer at a time
HACKING_STEPS_SHARE = 1 / 3  # notebook 06's reward-hacking run: this share of the RL steps (`helpers.rlhf`)
GENERATE = "evaluate_generate"  # transformers' `generate`: greedy answers (`helpers.inference`) and 07's chat
EVAL_BATCH = 16  # `comparison.sample_and_judge` and `inference.greedy_answers` sample 16 prompts a batch


@dataclass
class Row:
    notebook: str
    what: str
    rows: float | None
    tokens: float | None
    rate: str
    seconds: float


def main_job_seconds() -> dict[str, float]:
    """Seconds each notebook took in the H200 main job (first to last cell; the model read from local disk)."""
    run = json.loads((RESULTS / "h200-main-job.json").read_text())
    return {name[:2]: nb["seconds"] for name, nb in run["notebooks"].items()}


def sampling_row(
    notebook: str, what: str, answers: int, new_tokens: int, batch: int, gpu: GPU, path: str = "sampler_merged"
) -> Row:
    """Sampling `answers` answers of `new_tokens` tokens, `batch` at a time (every batch runs to the cap), at the
    measured decode step of `path` (`helpers.estimates.generation_rates`)."""
    seconds = generation_s(answers, new_tokens, batch, gpu, generation_rates(path))
    rate = f"{answers * new_tokens / seconds:,.0f} new tokens/s (batch {min(batch, answers)}, {path})"
    return Row(notebook, what, answers, new_tokens, rate, seconds)


def h200_rate(tokens_per_s: float, gpu: GPU) -> str:
    """How a rate measured on the H200 is used on `gpu`."""
    return f"{tokens_per_s:,.0f} tokens/s on an H200, × {gpu.slowdown():.2f}"


def scoring_row(notebook: str, what: str, answers: int, tokens: float, gpu: GPU) -> Row:
    """An 8B bf16 model reading `answers` rows of `tokens` tokens (forward only), at the reward model's rate."""
    seconds = answers * tokens / REWARD_TOKENS_PER_S * gpu.slowdown()
    return Row(notebook, what, answers, tokens, h200_rate(REWARD_TOKENS_PER_S, gpu), seconds)


def series(profile: Profile, gpu: GPU) -> list[Row]:
    """Every timed piece of notebooks 01 to 07 for `profile` on `gpu`."""
    rates = measured_rates()
    world = json.loads((RESULTS / rates.runs[-1]).read_text())["world"]
    sft_tokens = world["sft_example_tokens"]
    pair_kept = 1 - world["dpo_pair_tokens_prompt_plus_longer_answer"]["share_over_1024"]
    d, e, s = profile.data, profile.eval, profile.rl
    sft_rows = min(d.max_sft_rows or FULL_ROWS["sft"], FULL_ROWS["sft"]) * (1 - d.eval_fraction)
    sft_rows *= (1 - sft_tokens["share_over_2048"]) * profile.sft.num_train_epochs
    pairs = min(d.max_preference_rows or FULL_ROWS["preference"], FULL_ROWS["preference"]) * pair_kept
    train_pairs, eval_pairs = pairs * (1 - d.eval_fraction), pairs * d.eval_fraction
    prompts = min(e.num_prompts, int(eval_pairs))  # the held-out prompts every model answers
    answers = prompts * e.samples_per_prompt
    answer_tokens = DPO_PROMPT.mean + e.max_new_tokens
    sft = training("sft", sft_rows, sft_tokens["mean"], gpu, rates)
    dpo = training("dpo", train_pairs * profile.dpo.num_train_epochs, rates.dpo_tokens_per_pair, gpu, rates)
    dpo_eval = training("dpo", 3 * eval_pairs, rates.dpo_tokens_per_pair, gpu, rates)
    batch = s.per_device_train_batch_size * s.gradient_accumulation_steps
    policy = rl(s.max_steps, batch, DPO_PROMPT.mean, s.max_completion_length, gpu, rates)
    hacking_steps = max(1, round(s.max_steps * HACKING_STEPS_SHARE))
    hacking = rl(hacking_steps, batch, DPO_PROMPT.mean, s.max_completion_length, gpu, rates)
    hacking_every = max(1, min(s.eval_steps, hacking_steps // 4))
    started = main_job_seconds()
    start = "start-up: kernel, imports, the 4-bit model from disk (as 02 in the H200 main job)"
    rows = [
        Row(notebook, start, None, None, "measured", started["02"]) for notebook in ("02", "03", "04", "05", "06", "07")
    ]
    rows += [
        Row("01", "theory (CPU only): its time in the H200 main job", None, None, "measured", started["01"]),
        Row(
            "03",
            "SFT: training rows (packed)",
            sft_rows,
            sft_tokens["mean"],
            h200_rate(rates.sft_tokens_per_s, gpu),
            sft.seconds,
        ),
        Row(
            "04",
            "DPO: training pairs",
            train_pairs,
            rates.dpo_tokens_per_pair,
            h200_rate(rates.dpo_tokens_per_s, gpu),
            dpo.seconds,
        ),
        Row(
            "04",
            "DPO: held-out pairs, 3 passes (step-0 rewards, evaluate before and after)",
            3 * eval_pairs,
            rates.dpo_tokens_per_pair,
            h200_rate(rates.dpo_tokens_per_s, gpu),
            dpo_eval.seconds,
        ),
        sampling_row("05", "sampled answers of base, SFT and DPO", 3 * answers, e.max_new_tokens, EVAL_BATCH, gpu),
        sampling_row("05", "one greedy answer each of base, SFT and DPO", 3, e.max_new_tokens, 1, gpu, GENERATE),
        scoring_row("05", "the reward model scores the sampled answers", 3 * answers, answer_tokens, gpu),
        Row("06", f"RL: {policy.basis}", s.max_steps, None, "sampling + training", policy.seconds),
        sampling_row(
            "06",
            f"RL: held-out answers at the start, every {s.eval_steps} steps and the last (one batch each)",
            evaluations(s.max_steps, s.eval_steps) * answers,
            e.max_new_tokens,
            answers,
            gpu,
        ),
        Row("06", f"reward hacking: {hacking.basis}", hacking_steps, None, "sampling + training", hacking.seconds),
        sampling_row(
            "06",
            f"reward hacking: held-out answers at the start and every {hacking_every} step(s)",
            evaluations(hacking_steps, hacking_every) * answers,
            e.max_new_tokens,
            answers,
            gpu,
        ),
        sampling_row(
            "07",
            f"greedy answers to the held-out prompts, by {NOTEBOOK_07_VERSIONS} versions of the model",
            NOTEBOOK_07_VERSIONS * prompts,
            e.max_new_tokens,
            GREEDY_BATCH,
            gpu,
            GENERATE,
        ),
        sampling_row("07", "streaming chat", CHAT_TURNS, e.max_new_tokens, 1, gpu, GENERATE),
        scoring_row(
            "07",
            f"{NOTEBOOK_07_VERSIONS} versions of the model score the reference's answers",
            NOTEBOOK_07_VERSIONS * prompts,
            answer_tokens,
            gpu,
        ),
        Row("07", "merge, save, write and read back the GGUF", None, None, "07's H200 times", NOTEBOOK_07_FILES_S),
    ]
    for notebook, (name, gb) in DOWNLOAD_GB.items():
        rate = f"{DOWNLOAD_MB_S} MB/s (assumed)"
        rows.append(Row(notebook, f"download of {name}", gb, None, rate, gb * 1000 / DOWNLOAD_MB_S))
    return sorted(rows, key=lambda r: r.notebook)  # stable: start-up first, download last in each notebook


def evaluations(steps: int, every: int) -> int:
    """Held-out readings of an RL run (`rl_heldout.HeldOutCurve`): at the start, every `every` steps, at the last."""
    return 1 + steps // every + (steps % every != 0)


def by_notebook(rows: list[dict]) -> dict[str, float]:
    """Minutes each notebook takes."""
    minutes: dict[str, float] = {}
    for r in rows:
        minutes[r["notebook"]] = minutes.get(r["notebook"], 0) + r["seconds"] / 60
    return {notebook: round(m, 1) for notebook, m in minutes.items()}


def table(rows: list[Row]) -> list[str]:
    """A Markdown table of the rows, with the total."""

    def number(x: float | None) -> str:
        return "" if x is None else f"{x:,.1f}" if x < 100 and x != round(x) else f"{x:,.0f}"

    lines = ["| notebook | stage | rows, GB | tokens each | rate | minutes |", "|---|---|---:|---:|---|---:|"]
    lines += [
        f"| {r.notebook} | {r.what} | {number(r.rows)} | {number(r.tokens)} | {r.rate} | {r.seconds / 60:.1f} |"
        for r in rows
    ]
    lines.append(f"| | **whole series** | | | | **{sum(r.seconds for r in rows) / 60:.0f}** |")
    return lines


def render(results: dict) -> str:
    """The Markdown of `estimate`'s results: one table per profile, then `quick` on the other GPU classes."""
    out = []
    for name, profile in results["profiles"].items():
        d = profile["settings"]
        out += [
            f"#### `{name}` on an {results['estimated_for']['name']}: {profile['total_minutes']:.0f} min",
            "",
            f"Rows: {d['max_sft_rows'] or 'all'} SFT, {d['max_preference_rows'] or 'all'} preference "
            f"(`eval_fraction` {d['eval_fraction']}); RL {d['rl_steps']} steps, evaluation every {d['eval_steps']}.",
            "",
            *table([Row(**r) for r in profile["rows"]]),
            "",
        ]
    totals = ", ".join(f"{g}: {m:.0f} min" for g, m in results["quick_minutes_by_gpu"].items())
    return "\n".join([*out, f"`quick` elsewhere (same arithmetic): {totals}."])


def estimate(gpu: GPU = A100_40GB) -> dict:
    """Both profiles' series on `gpu`, with what they rest on; and `quick`'s total on the other GPU classes."""
    rates = measured_rates()
    rl_peak = rl(1, 1, 1, 1, gpu).peak_gib
    results = {**environment(), "estimated_for": asdict(gpu), "slowdown_vs_h200": round(gpu.slowdown(), 3)}
    results |= {"rates": asdict(rates), "generation_tokens_per_s": generation_rates(), "profiles": {}}
    for build in (quick_profile, full_profile):
        profile = build()
        rows = series(profile, gpu)
        results["profiles"][profile.name] = {
            "settings": asdict(profile.data) | {"rl_steps": profile.rl.max_steps, "eval_steps": profile.rl.eval_steps},
            "total_minutes": round(sum(r.seconds for r in rows) / 60, 2),
            "peak_gib": {"sft": rates.sft_peak_gib, "dpo": rates.dpo_peak_gib, "rl": round(rl_peak, 1)},
            "minutes_by_notebook": by_notebook([asdict(r) for r in rows]),
            "rows": [asdict(r) for r in rows],
        }
    others = [H200, *(g for _, _, g in GPUS if g not in (H200, gpu))]
    results["quick_minutes_by_gpu"] = {
        g.name: round(sum(r.seconds for r in series(quick_profile(), g)) / 60, 1) for g in others
    }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="print the tables; write nothing")
    args = parser.parse_args(argv)
    results = estimate()
    text = render(results)
    print(text)
    if not args.print:
        OUT.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
        README.write_text(replace_between(README.read_text(), START, END, text))
        print(f"wrote {OUT} and the tables in {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
