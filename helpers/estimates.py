"""Expected time and peak GPU memory of a stage on this GPU, printed before it starts. Training: rows × mean tokens
of the loaded data ÷ the token rate measured on an H200 (`benchmarks/results/`) × this GPU's datasheet slowdown.
Sampling: `helpers.sampling`'s decode step measured on the H200 (`h200-sampling.json`). No estimate on a CPU.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median
from typing import Any

from helpers.config import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "benchmarks" / "results"
REWARD_TOKENS_PER_S = 64 * 764 / 1.47  # an 8B bf16 reward model: 64 answers of 764 tokens in 1.47 s (REFERENCE §3)
# What one decode step of `helpers.sampling`'s merged copy reads: Llama-3.1-8B's linear layers and lm_head in bf16.
DECODE_READ_GB = 15.0
REWARD_MODEL_GIB = 15e9 / 2**30  # GRM-Llama3.1-8B in bf16, about 15 GB (REFERENCE §5)
PATHS = ("project_sft", "project_dpo")  # the benchmark's paths that run the project's own SFT and DPO


@dataclass(frozen=True)
class GPU:
    """A GPU class by its datasheet: dense bf16 TFLOP/s and memory bandwidth in TB/s (`note`: what was assumed)."""

    name: str
    bf16_tflops: float
    memory_tb_s: float
    note: str = ""

    def slowdown(self) -> float:
        """How many times longer a training step takes than on the H200 (the larger datasheet ratio)."""
        return max(H200.bf16_tflops / self.bf16_tflops, H200.memory_tb_s / self.memory_tb_s)


H200 = GPU("H200", 989, 4.8)
A100_40GB = GPU("A100 40 GB", 312, 1.555)  # the launchable's a2-highgpu-1g
GPUS = (  # (pattern in torch's device name, least memory in GiB, class): the first match wins
    (r"H200", 0, H200),
    (r"H100", 0, GPU("H100", 989, 3.35)),
    (r"A100", 60, GPU("A100 80 GB", 312, 2.0)),
    (r"A100", 0, A100_40GB),
    (r"\bL4\b", 0, GPU("L4", 121, 0.3)),
)


def classify(device_name: str, memory_gib: float) -> GPU:
    """The datasheet class of a GPU; one not in `GPUS` is taken for an A100 40 GB, and its note says so."""
    found = (gpu for pattern, least, gpu in GPUS if re.search(pattern, device_name) and memory_gib >= least)
    return next(found, replace(A100_40GB, note=f"unknown GPU {device_name!r}: assumed as fast as an A100 40 GB"))


def this_gpu() -> GPU | None:
    """`classify` of CUDA device 0; None on a CPU."""
    import torch

    props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return classify(props.name, props.total_memory / 2**30) if props else None


@dataclass(frozen=True)
class Rates:
    """Medians over the H200 `runs` of `PATHS` (DPO's tokens: the prompt twice, both answers); peaks: the largest."""

    sft_tokens_per_s: float
    dpo_tokens_per_s: float
    dpo_tokens_per_pair: float
    sft_peak_gib: float
    dpo_peak_gib: float
    runs: tuple[str, ...]


def measured_rates(results: Path = RESULTS) -> Rates:
    """The training rates of the H200 benchmark runs in `results` (see `Rates`)."""
    runs = {}  # file name: its successful runs of PATHS (on one H200)
    for file in sorted(results.glob("*.json")):
        run = json.loads(file.read_text())
        one_h200 = "H200" in str((run.get("gpu") or {}).get("name")) and run.get("gpus", 1) == 1
        if one_h200 and (paths := run.get("paths")):
            runs[file.name] = {p: paths[p] for p in PATHS if paths.get(p, {}).get("status") == "ok"}
    sft, dpo = ([paths[p] for paths in runs.values() if p in paths] for p in PATHS)
    if not (sft and dpo):
        raise FileNotFoundError(f"No H200 run of project_sft and project_dpo in {results}")
    return Rates(
        median(p["tokens_per_s"] for p in sft),
        median(p["tokens_per_s"] for p in dpo),
        median(p["real_tokens"] / p["pairs"] for p in dpo),
        max(p["peak_allocated_gib"] for p in sft),
        max(p["peak_allocated_gib"] for p in dpo),
        tuple(name for name, paths in runs.items() if paths),
    )


@dataclass(frozen=True)
class Estimate:
    """A stage's expected time and peak memory on one GPU (`gpu` None: a CPU, no estimate)."""

    stage: str
    gpu: GPU | None
    seconds: float = 0.0
    peak_gib: float = 0.0
    basis: str = ""
    peak_note: str = ""  # how the peak was found, where it is not this stage's benchmark measurement

    def __str__(self) -> str:
        if self.gpu is None:
            return f"{self.stage}: no estimate on CPU (smoke)"
        how, minutes = "; ".join(filter(None, [self.basis, self.gpu.note])), self.seconds / 60
        peak = f"peak {self.peak_gib:.1f} GiB" + (f" ({self.peak_note})" if self.peak_note else "")
        return f"{self.stage}: about {minutes:.0f} min, {peak} on {self.gpu.name} ({how})"


def training(stage: str, rows: float, mean_tokens: float, gpu: GPU | None, rates: Rates | None = None) -> Estimate:
    """SFT or DPO: `rows` (DPO: pairs; epochs included) × `mean_tokens` ÷ the measured rate × the GPU's slowdown."""
    if gpu is None:
        return Estimate(stage, None)
    r = rates or measured_rates()
    rate, peak = {"sft": (r.sft_tokens_per_s, r.sft_peak_gib), "dpo": (r.dpo_tokens_per_s, r.dpo_peak_gib)}[stage]
    basis = f"{rows:,.0f} rows × {mean_tokens:,.0f} tokens ÷ {rate:,.0f} tokens/s on an H200 × {gpu.slowdown():.2f}"
    return Estimate(stage, gpu, rows * mean_tokens / rate * gpu.slowdown(), peak, basis)


def generation_rates(path: str = "sampler_merged", results: Path = RESULTS) -> dict[int, float]:
    """New tokens/s by batch size of a sampling `path` measured on the H200 (`h200-sampling.json`): by default
    `helpers.sampling`'s `merged` mode, what evaluation and RL sample with on a GPU with room for the copy;
    `evaluate_generate` is transformers' `generate` on the 4-bit model, what greedy answers and the chat use."""
    run = json.loads((results / "h200-sampling.json").read_text())
    return {r["batch"]: r["new_tokens_per_s"] for r in run["records"] if r["path"] == path}


def generation_s(answers: int, new_tokens: int, batch: int, gpu: GPU, rates: dict[int, float] | None = None) -> float:
    """Sampling in batches (each to the cap); a step: the next measured batch size's (a decode step costs about the
    same for any batch up to it: REFERENCE §3), or one read of the weights on a GPU with less bandwidth."""
    rates = rates or generation_rates()
    size = min((b for b in rates if b >= min(batch, answers)), default=max(rates))
    step_s = max(size / rates[size], DECODE_READ_GB / (gpu.memory_tb_s * 1000))
    return -(-answers // batch) * new_tokens * step_s


def measured_rl_peak_gib(results: Path = RESULTS) -> float | None:
    """Notebook 06's peak GPU memory in the H200 main job (`h200-main-job.json`, the 8B shapes), if it ran there."""
    path = results / "h200-main-job.json"
    run = json.loads(path.read_text()) if path.exists() else {}
    return (run.get("eta_check", {}).get("rlhf") or {}).get("peak_memory_gib")


def rl(steps: int, answers: int, prompt_tokens: float, new_tokens: int, gpu: GPU | None, rates=None) -> Estimate:
    """Online RL: `answers` a step, sampled in one batch, scored by the reward model and trained on (policy and
    reference forwards: DPO's cost a token). Peak: the one measured in the H200 main job (the sampler's merged copy
    included), else DPO's measured one plus the bf16 reward model."""
    if gpu is None:
        return Estimate("rl", None)
    r = rates or measured_rates()
    train_s = answers * (prompt_tokens + new_tokens) * (1 / r.dpo_tokens_per_s + 1 / REWARD_TOKENS_PER_S)
    step_s = generation_s(answers, new_tokens, answers, gpu) + train_s * gpu.slowdown()
    basis = f"{steps} steps × {answers} answers of {new_tokens} tokens, {step_s:.0f} s a step"
    measured = measured_rl_peak_gib()
    peak_note = "as on an H200, with the sampler's 13 GiB merged copy, kept only where there is room"
    peak = measured or r.dpo_peak_gib + REWARD_MODEL_GIB
    return Estimate("rl", gpu, steps * step_s, peak, basis, peak_note if measured else "assumed")


def before_training(trainer: Any, stage: str, gpu: GPU | None = None) -> Estimate:
    """`training` of a built SFT or DPO trainer's tokenized rows × epochs (or `max_steps` batches) on `gpu`/this GPU;
    `rl` of an RL trainer's steps, batches and prompts (their mean length in tokens, from up to 256 of them).
    On a CPU there is no estimate, and the rows are not read."""
    gpu = gpu or this_gpu()
    if gpu is None:
        return Estimate(stage, None)
    d, a = trainer.train_dataset, trainer.args
    if stage == "rl":
        tokenizer, prompts = trainer.processing_class, d["prompt"][:256]
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
        prompt_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) / len(texts)
        answers = a.per_device_train_batch_size * a.gradient_accumulation_steps
        return rl(a.max_steps, answers, prompt_tokens, a.max_completion_length, gpu)
    names = ("prompt_ids", "prompt_ids", "chosen_ids", "rejected_ids") if stage == "dpo" else ("input_ids",)
    lengths = [sum(map(len, row)) for row in zip(*(d[n] for n in names), strict=True)]
    rows = a.max_steps * a.per_device_train_batch_size * a.gradient_accumulation_steps
    rows = rows if a.max_steps > 0 else len(lengths) * a.num_train_epochs
    return training(stage, rows, sum(lengths) / len(lengths), gpu)
