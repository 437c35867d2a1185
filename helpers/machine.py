"""This machine, and what a stage will cost on it: memory readings, the checks before anything heavy (GPU, bf16,
token, memory), a stage's expected time and peak memory, and `prepare`, which every notebook calls first. The rates
and peaks were measured on the lent H100/H200 with random weights of Llama-3.1-8B's shapes (`benchmarks/`, whose
`estimate_series.py --write-constants` writes them below); other GPUs are scaled by datasheet ratios."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch

from helpers.settings import Profile

GIB = 1024**3
GATED_MODELS = ("meta-llama/*",)  # hub ids (shell patterns) whose weights need an accepted licence and a token
TOKEN_URL = "https://huggingface.co/settings/tokens"

# --- measured (written by benchmarks/estimate_series.py --write-constants) ---
MEASURED = {
    "gpu": "NVIDIA H200",
    "sft_tokens_per_s": 11113.2,
    "dpo_tokens_per_s": 6070.3,
    "sampler_new_tokens_per_s": {32: 2654.4, 64: 4053.0},
    "reward_tokens_per_s": 33261.2,
    "peak_gib": {"sft": 8.67, "dpo": 14.04, "rl": 52.67},
    "rl_step": None,
    "sources": {
        "dpo_tokens_per_s": "h200-run1.json, h200-run2-dpo.json, h200-run3-dpo-b32.json, h200-dpo-repeats.json",
        "peak_gib/dpo": "h200-run1.json, h200-run2-dpo.json, h200-run3-dpo-b32.json, h200-dpo-repeats.json",
        "peak_gib/rl": "h200-main-job.json",
        "peak_gib/sft": "h200-run1.json",
        "reward_tokens_per_s": "an H200 run before results/ existed (an 8B bf16 reward model)",
        "sampler_new_tokens_per_s": "generation.json",
        "sft_tokens_per_s": "h200-run1.json",
    },
}
# --- end of measured ---


def memory_snapshot() -> dict[str, float]:
    """Memory in GiB: the process's resident memory and, on a GPU, allocated, reserved, peak and capacity (capped)."""
    snapshot = {"cpu_rss_gib": psutil.Process(os.getpid()).memory_info().rss / GIB}
    if torch.cuda.is_available():
        snapshot |= {
            "gpu_allocated_gib": torch.cuda.memory_allocated() / GIB,
            "gpu_reserved_gib": torch.cuda.memory_reserved() / GIB,
            "gpu_peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "gpu_total_gib": gpu_capacity_bytes() / GIB,
        }
    return snapshot


def format_memory(snapshot: dict[str, float]) -> str:
    return " | ".join(f"{k.removesuffix('_gib')} {v:.2f} GiB" for k, v in snapshot.items())


def gpu_capacity_bytes(device: int = 0) -> int:
    """What PyTorch may hold on the GPU: its memory times the per-process cap (1.0 when none is set)."""
    total = torch.cuda.get_device_properties(device).total_memory
    return int(total * torch.cuda.get_per_process_memory_fraction(device))


def gpu_free_bytes(device: int = 0) -> int:
    """Memory a new tensor can still get: what the allocator holds unused, plus what it may still take from the card
    within its cap (`torch.cuda.mem_get_info` alone ignores a cap: a run capped to 40 GB would size itself as 80)."""
    physical_free, _ = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    return reserved - allocated + max(0, min(physical_free, gpu_capacity_bytes(device) - reserved))


@dataclass(frozen=True)
class GPU:
    """A GPU class by its datasheet: dense bf16 TFLOP/s and memory bandwidth in TB/s (`note`: what was assumed)."""

    name: str
    bf16_tflops: float
    memory_tb_s: float
    note: str = ""

    def slowdown(self, than: GPU | None = None) -> float:
        """How many times longer a training step takes than on `than` (default: where the rates were measured)."""
        ref = than or MEASURED_ON
        return max(ref.bf16_tflops / self.bf16_tflops, ref.memory_tb_s / self.memory_tb_s)


H200, H100 = GPU("H200", 989, 4.8), GPU("H100", 989, 3.35)
A100_40GB = GPU("A100 40 GB", 312, 1.555)  # the launchable's a2-highgpu-1g
GPUS = (  # (pattern in torch's device name, least memory in GiB, class): the first match wins
    (r"H200", 0, H200),
    (r"H100", 0, H100),
    (r"A100", 60, GPU("A100 80 GB", 312, 2.0)),
    (r"A100", 0, A100_40GB),
    (r"\bL4\b", 0, GPU("L4", 121, 0.3)),
)
MEASURED_ON = next(gpu for pattern, _, gpu in GPUS if re.search(pattern, MEASURED["gpu"]))
DECODE_READ_GB = 15.0  # one decode step of the sampler's merged copy reads the bf16 linear layers and lm_head


def classify(device_name: str, memory_gib: float) -> GPU:
    """The datasheet class of a GPU; one not in `GPUS` is taken for an A100 40 GB, and its note says so."""
    found = (gpu for pattern, least, gpu in GPUS if re.search(pattern, device_name) and memory_gib >= least)
    return next(found, replace(A100_40GB, note=f"unknown GPU {device_name!r}: assumed as fast as an A100 40 GB"))


@dataclass(frozen=True)
class Estimate:
    """A stage's expected time and peak memory on one GPU (`gpu` None: a CPU, no estimate)."""

    stage: str
    gpu: GPU | None
    seconds: float = 0.0
    peak_gib: float = 0.0
    basis: str = ""

    def __str__(self) -> str:
        if self.gpu is None:
            return f"{self.stage}: no estimate on CPU (smoke)"
        on = f"{self.gpu.name} ({'; '.join(filter(None, [self.basis, self.gpu.note]))})"
        return f"{self.stage}: about {self.seconds / 60:.0f} min, peak {self.peak_gib:.1f} GiB on {on}"


def training_s(stage: str, rows: float, mean_tokens: float, gpu: GPU) -> tuple[float, str]:
    """SFT or DPO: `rows` (DPO: pairs) × `mean_tokens` ÷ the measured rate × the GPU's slowdown, and how."""
    rate = MEASURED[f"{stage}_tokens_per_s"]
    basis = f"{rows:,.0f} rows × {mean_tokens:,.0f} tokens ÷ {rate:,.0f} tokens/s on {MEASURED_ON.name} × "
    return rows * mean_tokens / rate * gpu.slowdown(), basis + f"{gpu.slowdown():.2f}"


def generation_s(answers: int, new_tokens: int, batch: int, gpu: GPU) -> float:
    """Sampling in batches, each to the cap: a decode step costs about the same for any batch up to the measured one
    (the weights are read once a step), or one read of the weights on a GPU with less bandwidth."""
    rates = MEASURED["sampler_new_tokens_per_s"]
    size = min((b for b in rates if b >= min(batch, answers)), default=max(rates))
    step_s = max(size / rates[size], DECODE_READ_GB / (gpu.memory_tb_s * 1000))
    return -(-answers // batch) * new_tokens * step_s


def estimate(trainer: Any, stage: str, gpu: GPU | None = None) -> Estimate:
    """The expected time and peak memory of a built trainer of `stage` on `gpu` (default: this one; none on a CPU):
    its tokenized rows × epochs (or `max_steps` batches); for RL, its steps of sampling, scoring and training."""
    if gpu is None and torch.cuda.is_available():
        gpu = classify(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory / GIB)
    if gpu is None:
        return Estimate(stage, None)
    d, a = trainer.train_dataset, trainer.args
    batch = a.per_device_train_batch_size * a.gradient_accumulation_steps
    if stage == "rl":
        tokenizer, prompts = trainer.processing_class, d["prompt"][:256]
        chat = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, return_dict=True)["input_ids"] for p in prompts
        ]
        tokens = sum(map(len, chat)) / len(prompts) + a.max_completion_length
        train = batch * tokens * (1 / MEASURED["dpo_tokens_per_s"] + 1 / MEASURED["reward_tokens_per_s"])
        step_s = generation_s(batch, a.max_completion_length, batch, gpu) + train * gpu.slowdown()
        basis = f"{a.max_steps} steps × {batch} answers of {a.max_completion_length} tokens, {step_s:.0f} s a step"
        return Estimate(stage, gpu, a.max_steps * step_s, MEASURED["peak_gib"]["rl"], basis)
    names = ("prompt_ids", "prompt_ids", "chosen_ids", "rejected_ids") if stage == "dpo" else ("input_ids",)
    lengths = [sum(map(len, row)) for row in zip(*(d[n] for n in names), strict=True)]
    rows = a.max_steps * batch if a.max_steps > 0 else len(lengths) * a.num_train_epochs
    seconds, basis = training_s(stage, rows, sum(lengths) / len(lengths), gpu)
    return Estimate(stage, gpu, seconds, MEASURED["peak_gib"][stage], basis)


class PreflightError(RuntimeError):
    """The profile cannot run here; the message says what to change."""


def check_environment(profile: Profile, env: Mapping[str, str] = os.environ) -> None:
    """Stop early, with the fix in the message (one paragraph per problem, all at once), when `profile` cannot run
    here: a GPU profile without a CUDA GPU, a GPU without bf16, a gated model without `HF_TOKEN` (never printed)."""
    on_gpu, problems = torch.cuda.is_available(), []
    if not on_gpu and profile.name != "smoke":
        problems.append(
            f"The {profile.name} profile trains Llama-3.1-8B and needs a CUDA GPU with bf16 (A10G, L4, A100, H100 or "
            "newer); torch sees none. Here run TUTORIAL_PROFILE=smoke (a tiny local model, minutes on a CPU)."
        )
    if on_gpu and not torch.cuda.is_bf16_supported(including_emulation=False):  # without it, a T4 says yes too
        problems.append(
            f"{torch.cuda.get_device_name(0)} has no native bf16 (compute capability 8.0 or newer: A10G, L4, A100, "
            "H100), which this recipe computes in. fp16 is not offered: its range ends at 65504, so it needs loss "
            "scaling and other settings, and an overflow shows up as a NaN loss hours in. Use an Ampere or newer GPU."
        )
    token = env.get("HF_TOKEN", "").strip()
    problems += [
        f"{m} is gated and HF_TOKEN is not set. Create a read token at {TOKEN_URL}, accept the license on "
        f"https://huggingface.co/{m} with the same account, and set HF_TOKEN where Python or Jupyter starts."
        for m in (profile.model_id, profile.reward_model_id)
        if not token and m and not Path(m).exists() and any(fnmatch.fnmatch(m, p) for p in GATED_MODELS)
    ]
    if problems:
        raise PreflightError("\n\n".join(problems))


def require_memory(stage: str, needed_gib: float, free_gib: float | None = None) -> None:
    """Stop before `stage` builds its models, naming what to change, when its expected peak exceeds the GPU memory
    left (default `gpu_free_bytes()`; a CPU: no check), instead of failing mid-cell with a CUDA traceback."""
    if free_gib is None and not torch.cuda.is_available():
        return
    free_gib = gpu_free_bytes() / GIB if free_gib is None else free_gib
    if needed_gib <= free_gib:
        return
    advice = (
        "set reward_model_4bit to true, or lower rl.per_device_train_batch_size or rl.max_completion_length"
        if stage == "rl"
        else f"lower {stage}.per_device_train_batch_size (raise gradient_accumulation_steps to keep the batch) or "
        f"{stage}.max_length"
    )
    raise PreflightError(
        f"{stage}: expected peak {needed_gib:.1f} GiB, but this GPU has {free_gib:.1f} GiB free (within the "
        f"allocator's cap). Free memory (restart the kernel: earlier cells hold models) or {advice}, in a "
        "TUTORIAL_SETTINGS file."
    )


def prepare(profile: Profile) -> None:
    """Say what this run uses, stop early if it cannot run here, make its outputs folder, build the smoke world; turn
    off the progress bars of model loads and data maps (an 8B model prints one per load), not training's."""
    print(profile.describe())
    check_environment(profile)
    try:
        profile.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PreflightError(f"TUTORIAL_OUTPUTS: cannot create {profile.output_dir} ({e.strerror}).") from None
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    if profile.name == "smoke":
        from helpers.smoke import build_smoke_world

        # The smoke model's matrices are tiny: a second thread costs more in synchronisation than it saves (a toy
        # reward model trained in 4.7 s on one thread, 53 s on two, on a 2-core machine).
        torch.set_num_threads(1)
        build_smoke_world(profile.seed, world=Path(profile.model_id).parent)
