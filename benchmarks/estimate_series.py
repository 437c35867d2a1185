"""Expected time of the whole notebook series (01 to 07) on one GPU, for the `quick` and `full` profiles; and the
measured constants every estimate rests on (`helpers.machine.MEASURED`). benchmarks/README.md says what each rests on.

    python benchmarks/estimate_series.py                    # results/quick-profile-estimate.json, the README tables
    python benchmarks/estimate_series.py --print            # only print them, and each notebook's expected time
    python benchmarks/estimate_series.py --write-constants  # rewrite MEASURED in helpers/machine.py from results/

`--write-constants` is the only way `MEASURED` changes, each number's file named under `sources`: the training rates
(medians of `project_sft`, `project_dpo` in the runs report.py shows); the sampler's rates by batch (`generation.json`'s
`use` records, else `h200-sampling.json`'s `sampler_merged`); the RL step (`rl-step-capped.json`, else
`rl-step-uncapped.json`), whose reward scoring gives the reward model's rate; the peaks (`capped-NN_*.json` of
notebooks 03, 04 and 06, else the training runs' and the H200 main job's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_training import environment  # this script's folder is first on sys.path
from report import RUNS, replace_between
from shapes import DPO_PROMPT

from helpers import machine
from helpers.machine import A100_40GB, DECODE_READ_GB, GPU, GPUS, H200, classify, generation_s, training_s
from helpers.rl import HACKING_STEPS_SHARE
from helpers.settings import PROJECT_ROOT, Profile, full_profile, quick_profile

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"
OUT = RESULTS / "quick-profile-estimate.json"
MACHINE = PROJECT_ROOT / "helpers" / "machine.py"
START, END = "<!-- estimate:start -->", "<!-- estimate:end -->"
BLOCK = ("# --- measured (written by benchmarks/estimate_series.py --write-constants) ---", "# --- end of measured ---")
MAIN_JOB = "h200-main-job.json"  # notebooks 01 and 02's times, RL's peak before capped runs
# The reward model's rate until an RL step is measured (an 8B bf16 reward model; the GPU profiles' 3B one is faster).
REWARD_BEFORE = "an H200 run before results/ existed (an 8B bf16 reward model)"
# Whole datasets: FineTome-100k; orpo-dpo-mix-40k less its 541 toxic-dpo rows (`helpers.data.TOXIC_SOURCES`).
FULL_ROWS = {"sft": 100_000, "preference": 44_245 - 541}
BENCHMARK_PROMPTS = {"ifeval": 541, "ifbench": 294}  # google/IFEval's rows; IFBench's bundled test prompts
# Downloads in GB by notebook: unsloth/Meta-Llama-3.1-8B-bnb-4bit, GRM-Llama3.2-3B in bf16 (05's Needs line), the
# 16-bit checkpoint 07 merges into to measure the other merge base. Datasets are small.
DOWNLOAD_GB = {"02": ("the 4-bit base", 5.7), "05": ("the reward model", 6.4), "07": ("16-bit Llama-3.1-8B", 16.0)}
DOWNLOAD_MB_S = 100  # an assumption; a cloud machine often gets more from the Hub
# Notebook 07's file work on the H200: merge 3 s, save 20 s and read the GGUF back 67 s as its author timed them; the
# Q8_0 GGUF's writing cell took 95 s in the capped main job (results/h200-main-job.json, 2026-11-30).
NOTEBOOK_07_FILES_S = 3 + 20 + 95 + 67
# Notebook 07: the reference, the adapter through plain peft, the merges into both bases and the GGUF each answer
# the held-out prompts greedily and score the reference's answers; then 3 chat turns and one answer of the merged model.
NOTEBOOK_07_VERSIONS, NOTEBOOK_07_SINGLE_ANSWERS = 5, 4
GREEDY_BATCH = 64  # `generation.generate`'s default batch
STAGE_NOTEBOOKS = {"sft": "03", "dpo": "04", "rl": "06"}


# --- the measured constants ---------------------------------------------------------------------------------


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def card(path: Path) -> str:
    """The name of the GPU a result file was measured on (the reports of every benchmark script name it)."""
    gpu = read(path).get("gpu") or read(path)["run"]["gpu"]
    return gpu["name"] if isinstance(gpu, dict) else gpu


def training_runs(results: Path) -> dict[str, dict]:
    """The successful `project_sft`/`project_dpo` runs of each single-GPU training report report.py shows."""
    runs = {}
    for file in (f for pattern in RUNS for f in sorted(results.glob(pattern))):
        paths = read(file).get("paths", {})
        if found := {p: paths[p] for p in ("project_sft", "project_dpo") if paths.get(p, {}).get("status") == "ok"}:
            runs[file.name] = found
    return runs


def constants(results: Path = RESULTS) -> dict:
    """`helpers.machine.MEASURED` as the result files in `results` give it (see the module docstring)."""
    runs, m, sources, peaks = training_runs(results), {}, {}, {}
    cards = {card(results / name) for name in runs}
    if len(cards) != 1:
        raise SystemExit(f"training rates must come from one GPU; {results} has runs on {cards or 'none'}")
    m["gpu"] = cards.pop()
    for stage in ("sft", "dpo"):
        found = {f: r[f"project_{stage}"] for f, r in runs.items() if f"project_{stage}" in r}
        m[f"{stage}_tokens_per_s"] = round(statistics.median(r["tokens_per_s"] for r in found.values()), 1)
        peaks[stage] = max(r["peak_allocated_gib"] for r in found.values())
        sources[f"{stage}_tokens_per_s"] = sources[f"peak_gib/{stage}"] = ", ".join(found)
    peaks["rl"], sources["peak_gib/rl"] = read(results / MAIN_JOB)["eta_check"]["rlhf"]["peak_memory_gib"], MAIN_JOB
    generation = results / "generation.json"  # bench_sampling.py's `use` records: what `generate` and the chat get
    records = [r for r in read(generation)["records"] if "use" in r] if generation.exists() else []
    if not records:
        generation = results / "h200-sampling.json"
        records = [r for r in read(generation)["records"] if r["path"] == "sampler_merged"]
    ok = sorted((r for r in records if r.get("status") == "ok"), key=lambda r: r["batch"])
    m["sampler_new_tokens_per_s"] = {r["batch"]: r["new_tokens_per_s"] for r in ok}
    sources["sampler_new_tokens_per_s"] = generation.name
    steps = [results / f for f in ("rl-step-capped.json", "rl-step-uncapped.json") if (results / f).exists()]
    step = read(steps[0]) if steps else None
    if step:  # the reward model reads each answer with its prompt (random weights: every answer runs to the cap)
        tokens = step["answers_a_step"] * (DPO_PROMPT.mean + step["max_completion_length"])
        m["reward_tokens_per_s"] = round(tokens / step["seconds"]["reward_scoring"], 1)
        sources["reward_tokens_per_s"] = sources["rl_step"] = steps[0].name
    else:
        m["reward_tokens_per_s"], sources["reward_tokens_per_s"] = (
            machine.MEASURED["reward_tokens_per_s"],
            REWARD_BEFORE,
        )
    for stage, notebook in STAGE_NOTEBOOKS.items():
        for file in sorted(results.glob(f"capped-{notebook}_*.json")):
            if read(file).get("status") == "passed" and read(file).get("peak_allocated_gib"):
                peaks[stage], sources[f"peak_gib/{stage}"] = read(file)["peak_allocated_gib"], file.name
    m["peak_gib"] = {s: round(peaks[s], 2) for s in ("sft", "dpo", "rl")}
    kept = ("gpu", "sampler", "memory_cap_gib", "answers_a_step", "max_completion_length")
    m["rl_step"] = step and {k: step[k] for k in kept} | {
        "seconds_per_step": round(step["seconds_per_step"], 3),
        "seconds": {k: round(v, 3) for k, v in step["seconds"].items()},
    }
    return m | {"sources": dict(sorted(sources.items()))}


def literal(value, indent: int = 0, used: int | None = None) -> str:
    """`value` as Python source in ruff's format: a dict inline where it fits in 120 characters after the `used`
    ones of its line (None: never), else one item a line with a trailing comma."""
    if not isinstance(value, dict):
        return json.dumps(value) if isinstance(value, str) else repr(value)
    inline = "{" + ", ".join(f"{literal(k)}: {literal(v, 0, -(10**9))}" for k, v in value.items()) + "}"
    if used is not None and used + len(inline) + 1 <= 120:
        return inline
    pad = " " * (indent + 4)
    items = [f"{pad}{literal(k)}: {literal(v, indent + 4, len(pad) + len(literal(k)) + 2)}," for k, v in value.items()]
    return "{\n" + "\n".join(items) + "\n" + " " * indent + "}"


def constants_block(measured: dict) -> str:
    return "MEASURED = " + literal(measured)


def write_constants(measured: dict, path: Path = MACHINE) -> bool:
    """Rewrite the block between `BLOCK`'s markers in `path`; True when it changed."""
    text = path.read_text()
    head, rest = text.split(BLOCK[0] + "\n", 1)
    tail = rest.split(BLOCK[1], 1)[1]
    new = f"{head}{BLOCK[0]}\n{constants_block(measured)}\n{BLOCK[1]}{tail}"
    path.write_text(new)
    return new != text


# --- the series -------------------------------------------------------------------------------------------


@dataclass
class Row:
    notebook: str
    what: str
    rows: float | None
    tokens: float | None
    rate: str
    seconds: float


def data_tokens(results: Path = RESULTS) -> dict[str, float]:
    """What the benchmark data holds (the last training run's world): tokens of an SFT example and of a DPO pair as
    TRL batches it (prompt twice, both answers; the median over the DPO runs), and the shares over `max_length`."""
    runs = training_runs(results)
    world = read(results / list(runs)[-1])["world"]
    pairs = [r["project_dpo"]["real_tokens"] / r["project_dpo"]["pairs"] for r in runs.values() if "project_dpo" in r]
    return {
        "sft_example": world["sft_example_tokens"]["mean"],
        "sft_share_over_2048": world["sft_example_tokens"]["share_over_2048"],
        "dpo_pair": statistics.median(pairs),
        "dpo_share_over_1024": world["dpo_pair_tokens_prompt_plus_longer_answer"]["share_over_1024"],
    }


def measured_on(results: Path = RESULTS) -> str:
    """The GPU classes behind the estimate, e.g. "H200" or "H100/H200": those of every source file and the main job."""
    m = machine.MEASURED
    texts = m["sources"].values() if isinstance(m["sources"], dict) else [m["sources"]]  # a str before the dict
    files = {f.strip() for text in texts for f in text.split(",") if f.strip().endswith(".json")}
    names = {card(results / f) for f in files | {MAIN_JOB}} | {m["gpu"]}
    return "/".join(sorted({classify(name, 0).name for name in names}))


def duration(minutes: float) -> str:
    """How the README and the notebooks write an estimated time."""
    return "under a minute" if minutes < 1 else f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def sentence(results: dict, notebook: str) -> str:
    """The expected-time sentence of a notebook's first markdown cell."""
    quick, full = (duration(results["profiles"][p]["minutes_by_notebook"][notebook]) for p in ("quick", "full"))
    return (
        f"Expected on one {results['estimated_for']['name']} (estimated from {results['measured_on']} measurements, "
        f"`benchmarks/README.md`): `quick` (the default on a GPU) about {quick}, `full` about {full}."
    )


def rate(tokens_per_s: float, gpu: GPU) -> str:
    return f"{tokens_per_s:,.0f} tokens/s on an {machine.MEASURED_ON.name}, × {gpu.slowdown():.2f}"


def sampling_row(notebook: str, what: str, answers: int, new_tokens: int, batch: int, gpu: GPU) -> Row:
    """`answers` answers of `new_tokens` tokens, `batch` at a time, every batch to the cap, through the sampler."""
    seconds = generation_s(answers, new_tokens, batch, gpu)
    shown = f"{answers * new_tokens / seconds:,.0f} new tokens/s (batch {min(batch, answers)}, sampler)"
    return Row(notebook, what, answers, new_tokens, shown, seconds)


def forward_row(notebook: str, what: str, rows: float, tokens: float, gpu: GPU) -> Row:
    """A model reading `rows` rows of `tokens` tokens, forward only, at the reward model's measured rate."""
    reward = machine.MEASURED["reward_tokens_per_s"]
    return Row(notebook, what, rows, tokens, rate(reward, gpu), rows * tokens / reward * gpu.slowdown())


def rl_step_s(answers: int, new_tokens: int, gpu: GPU) -> tuple[float, str]:
    """One RL step: the measured one (`MEASURED["rl_step"]`), its sampling as `generation_s` scales it and the rest by
    the datasheet; or, unmeasured, sampling plus a DPO-rate update and a reward-model read of every answer."""
    m, split = machine.MEASURED, machine.MEASURED["rl_step"]
    if split is None:
        train = answers * (DPO_PROMPT.mean + new_tokens) * (1 / m["dpo_tokens_per_s"] + 1 / m["reward_tokens_per_s"])
        seconds = generation_s(answers, new_tokens, answers, gpu) + train * gpu.slowdown()
        return seconds, "sampling + training (rates above)"
    on = classify(split["gpu"], 0)
    floor = split["max_completion_length"] * DECODE_READ_GB / (gpu.memory_tb_s * 1000)  # one read of the weights a step
    sampling = max(split["seconds"]["sampling"], floor)
    rest = (split["seconds_per_step"] - split["seconds"]["sampling"]) * gpu.slowdown(on)
    scale = answers * new_tokens / (split["answers_a_step"] * split["max_completion_length"])
    return scale * (sampling + rest), f"{split['seconds_per_step']:.1f} s a step measured on {on.name}"


def evaluations(steps: float, every: int, at_start: bool = True) -> int:
    """Held-out readings of a run: (at the start,) every `every` steps, and at the last step."""
    return at_start + int(steps // every) + (steps % every != 0)


def series(profile: Profile, gpu: GPU, results: Path = RESULTS) -> list[Row]:
    """Every timed piece of notebooks 01 to 07 for `profile` on `gpu`."""
    m, t = machine.MEASURED, data_tokens(results)
    d, e, s, sft = profile.data, profile.eval, profile.rl, profile.sft
    sft_rows = min(d.max_sft_rows or FULL_ROWS["sft"], FULL_ROWS["sft"]) * (1 - t["sft_share_over_2048"])
    sft_train, sft_eval = sft_rows * (1 - d.eval_fraction) * sft.num_train_epochs, sft_rows * d.eval_fraction
    packed = sft.max_length / t["sft_example"] if sft.packing else 1  # examples a row
    sft_steps = sft_train / (sft.per_device_train_batch_size * sft.gradient_accumulation_steps * packed)
    sft_evals = evaluations(sft_steps, sft.eval_steps, at_start=False)
    pairs = min(d.max_preference_rows or FULL_ROWS["preference"], FULL_ROWS["preference"])
    pairs *= 1 - t["dpo_share_over_1024"]
    train_pairs, eval_pairs = pairs * (1 - d.eval_fraction) * profile.dpo.num_train_epochs, pairs * d.eval_fraction
    prompts = min(e.num_prompts, int(eval_pairs))  # the held-out prompts every model answers
    answers, answer_tokens = prompts * e.samples_per_prompt, DPO_PROMPT.mean + e.max_new_tokens
    bench_prompts, new = e.benchmark_prompts or BENCHMARK_PROMPTS[e.benchmark], e.max_new_tokens
    batch = s.per_device_train_batch_size * s.gradient_accumulation_steps
    step_s, step_basis = rl_step_s(batch, s.max_completion_length, gpu)
    hacking_steps = max(1, round(s.max_steps * HACKING_STEPS_SHARE))
    hacking_every = max(1, min(s.eval_steps, hacking_steps // 4))
    main_job = {n[:2]: nb["seconds"] for n, nb in read(results / MAIN_JOB)["notebooks"].items()}
    start = "start-up: kernel, imports, the 4-bit model from disk (as 02 in the H200 main job)"

    def trained(notebook: str, stage: str, what: str, rows: float, tokens: float) -> Row:
        seconds = training_s(stage, rows, tokens, gpu)[0]  # the arithmetic the notebooks print before training
        return Row(notebook, what, rows, tokens, rate(m[f"{stage}_tokens_per_s"], gpu), seconds)

    rows = [Row(n, start, None, None, "measured", main_job["02"]) for n in ("02", "03", "04", "05", "06", "07")]
    rows += [
        Row("01", "theory (CPU only): its time in the H200 main job", None, None, "measured", main_job["01"]),
        trained("03", "sft", "SFT: training rows (packed)", sft_train, t["sft_example"]),
        forward_row(
            "03",
            f"SFT: held-out loss every {sft.eval_steps} steps ({sft_evals} times)",
            sft_evals * sft_eval,
            t["sft_example"],
            gpu,
        ),  # fmt: skip
        sampling_row("03", "greedy answers to 4 held-out prompts", 4, new, GREEDY_BATCH, gpu),
        trained("04", "dpo", "DPO: training pairs", train_pairs, t["dpo_pair"]),
        trained("04", "dpo", "DPO: held-out pairs, TRL's evaluation before and after", 2 * eval_pairs, t["dpo_pair"]),
        sampling_row("04", "greedy answers of SFT and DPO to 4 held-out prompts", 8, new, 4, gpu),
        sampling_row("05", "sampled answers of base, SFT and DPO", 3 * answers, new, GREEDY_BATCH, gpu),
        sampling_row("05", "one greedy answer each of base, SFT and DPO", 3, new, 1, gpu),
        forward_row(
            "05",
            "the reward model reads the sampled answers and the held-out pairs",
            3 * answers + 2 * prompts,
            answer_tokens,
            gpu,
        ),  # fmt: skip
        sampling_row(
            "05",
            f"benchmark: base, SFT and DPO answer {bench_prompts} {e.benchmark} prompts greedily",
            3 * bench_prompts,
            e.benchmark_max_new_tokens,
            GREEDY_BATCH,
            gpu,
        ),  # fmt: skip
        Row(
            "06",
            f"RL: {s.max_steps} steps × {batch} answers of {s.max_completion_length} tokens",
            s.max_steps,
            None,
            step_basis,
            s.max_steps * step_s,
        ),  # fmt: skip
        sampling_row(
            "06",
            f"RL: held-out answers at the start, every {s.eval_steps} steps and the last (one batch each)",
            evaluations(s.max_steps, s.eval_steps) * answers,
            new,
            answers,
            gpu,
        ),  # fmt: skip
        Row(
            "06",
            f"reward hacking: {hacking_steps} steps, the same",
            hacking_steps,
            None,
            step_basis,
            hacking_steps * step_s,
        ),  # fmt: skip
        sampling_row(
            "06",
            f"reward hacking: held-out answers at the start and every {hacking_every} step(s)",
            evaluations(hacking_steps, hacking_every) * answers,
            new,
            answers,
            gpu,
        ),  # fmt: skip
        sampling_row(
            "07",
            f"greedy answers to the held-out prompts, by {NOTEBOOK_07_VERSIONS} versions of the model",
            NOTEBOOK_07_VERSIONS * prompts,
            new,
            GREEDY_BATCH,
            gpu,
        ),  # fmt: skip
        sampling_row("07", "3 chat turns and one answer of the merged model", NOTEBOOK_07_SINGLE_ANSWERS, new, 1, gpu),
        forward_row(
            "07",
            f"{NOTEBOOK_07_VERSIONS} versions of the model score the reference's answers",
            NOTEBOOK_07_VERSIONS * prompts,
            answer_tokens,
            gpu,
        ),  # fmt: skip
        Row("07", "merge, save, write and read back the GGUF", None, None, "07's H200 times", NOTEBOOK_07_FILES_S),
    ]
    for notebook, (name, gb) in DOWNLOAD_GB.items():
        seconds = gb * 1000 / DOWNLOAD_MB_S
        rows.append(Row(notebook, f"download of {name}", gb, None, f"{DOWNLOAD_MB_S} MB/s (assumed)", seconds))
    return sorted(rows, key=lambda r: r.notebook)  # stable: start-up first, download last in each notebook


def by_notebook(rows: list[Row]) -> dict[str, float]:
    """Minutes each notebook takes."""
    minutes: dict[str, float] = {}
    for r in rows:
        minutes[r.notebook] = minutes.get(r.notebook, 0) + r.seconds / 60
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


def estimate(gpu: GPU = A100_40GB, results: Path = RESULTS) -> dict:
    """Both profiles' series on `gpu`, with what they rest on; and `quick`'s total on the other GPU classes."""
    report = {**environment(), "estimated_for": asdict(gpu), "measured_on": measured_on(results)}
    report |= {"slowdown": round(gpu.slowdown(), 3), "measured": machine.MEASURED, "data_tokens": data_tokens(results)}
    report["profiles"] = {}
    for build in (quick_profile, full_profile):
        profile = build()
        rows = series(profile, gpu, results)
        report["profiles"][profile.name] = {
            "settings": asdict(profile.data) | {"rl_steps": profile.rl.max_steps, "eval_steps": profile.rl.eval_steps},
            "total_minutes": round(sum(r.seconds for r in rows) / 60, 2),
            "peak_gib": machine.MEASURED["peak_gib"],
            "minutes_by_notebook": by_notebook(rows),
            "rows": [asdict(r) for r in rows],
        }
    others = [H200, *(g for _, _, g in GPUS if g not in (H200, gpu))]
    report["quick_minutes_by_gpu"] = {
        g.name: round(sum(r.seconds for r in series(quick_profile(), g, results)) / 60, 1) for g in others
    }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="print the tables and sentences; write nothing")
    parser.add_argument("--write-constants", action="store_true", help="rewrite MEASURED in helpers/machine.py")
    args = parser.parse_args(argv)
    if args.write_constants:
        changed = write_constants(constants())
        print(f"{MACHINE}: {'rewritten; now run this script again' if changed else 'unchanged'}")
        return 0
    results = estimate()
    print(render(results))
    for notebook in sorted(results["profiles"]["quick"]["minutes_by_notebook"])[1:]:  # 01 needs no GPU: no sentence
        print(f"{notebook}: {sentence(results, notebook)}")
    if not args.print:
        OUT.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
        README.write_text(replace_between(README.read_text(), START, END, render(results)))
        print(f"wrote {OUT} and the tables in {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
