"""The training stages in the steps a notebook shows them: build (model, data, trainer) → inspect → train and
save → record. Notebooks call these steps between their explanations; `run_sft`/`run_dpo` chain them for the
tests and for stages that must exist before a later one (`ensure_adapter`).

Each stage reads what the previous one saved under `outputs/<profile>/`, writes its data splits to
`outputs/<profile>/splits/`, and adds its numbers to `metrics.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from helpers import data, estimates, plots, splits, train
from helpers.checkpoints import is_current, save_adapter
from helpers.config import Profile
from helpers.distributed import barrier, is_main_process
from helpers.metrics import update_metrics
from helpers.model import count_parameters, load_for_training
from helpers.preflight import check_environment
from helpers.tracking import finish_run, start_run


def prepare(profile: Profile) -> None:
    """Say what this run uses, stop early if it cannot run here; in the smoke profile build the local world.
    Turns off the progress bars of model loads and data maps (an 8B model prints one per load); training and
    sampling keep theirs."""
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    print(profile.describe())
    check_environment(profile)
    profile.output_dir.mkdir(parents=True, exist_ok=True)
    if profile.name == "smoke":
        import torch

        from helpers.smoke import build_smoke_world

        # The smoke model's matrices are tiny: a second thread costs more in synchronisation than it saves
        # (a toy reward model trained in 4.7 s on one thread, 53 s on two, on a 2-core machine).
        torch.set_num_threads(1)
        build_smoke_world(profile.seed, world=Path(profile.model_id).parent)


# --- data ---------------------------------------------------------------------------------------------------


@dataclass
class Data:
    """The splits of one dataset (`train`, `eval`, and for preferences `reward`) with what loading reported."""

    train: Any
    eval: Any
    report: data.LoadReport
    length_reports: list[str]
    reward: Any = None

    def summary(self) -> str:
        return "\n".join([self.report.summary(), *self.length_reports])


def sft_data(profile: Profile, tokenizer: Any) -> Data:
    """The SFT conversations: checked, subset, split by problem, training rows filtered to `max_length`."""
    dataset, report = data.load_sft_dataset(profile.data.sft_dataset)
    dataset = splits.subset(dataset, profile.data.max_sft_rows, profile.seed)
    train_set, eval_set = splits.split_sft(dataset, profile)
    train_set, length_report = data.filter_by_length(train_set, tokenizer, profile.sft.max_length, "SFT train")
    splits.write_split(profile, "sft-train", train_set)
    splits.write_split(profile, "sft-eval", eval_set)
    return Data(train_set, eval_set, report, [length_report])


def preference_data(profile: Profile, tokenizer: Any) -> Data:
    """The preference pairs: checked, subset, split by problem (DPO, reward model, held out), length-filtered."""
    dataset, report = data.load_preference_dataset(profile.data.preference_dataset)
    dataset = splits.subset(dataset, profile.data.max_preference_rows, profile.seed)
    parts = dict(zip(("dpo-train", "reward-train", "eval"), splits.split_preferences(dataset, profile), strict=True))
    length_reports = []
    for name, part in parts.items():
        if len(part):
            parts[name], line = data.filter_by_length(part, tokenizer, profile.dpo.max_length, name)
            length_reports.append(line)
        splits.write_split(profile, name, parts[name])
    return Data(parts["dpo-train"], parts["eval"], report, length_reports, reward=parts["reward-train"])


# --- a training stage ---------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One training stage as a notebook walks through it."""

    profile: Profile
    name: str  # "sft", "dpo" or "rl"
    model: Any
    tokenizer: Any
    data: Data
    trainer: Any
    wandb_run: Any = None
    notes: dict = field(default_factory=dict)  # numbers measured on the way (step-0 rewards, evaluations)

    @property
    def adapter_dir(self):
        return self.profile.output_dir / f"{self.name}-adapter"


def build_sft(profile: Profile) -> Stage:
    """The 4-bit base with fresh LoRA adapters, the SFT data and TRL's `SFTTrainer` (loss on assistant tokens)."""
    model, tokenizer = load_for_training(profile, profile.sft.max_length)
    sft = sft_data(profile, tokenizer)
    trainer = train.make_sft_trainer(profile, model, tokenizer, sft.train)
    return Stage(profile, "sft", trainer.model, tokenizer, sft, trainer)


def build_dpo(profile: Profile) -> Stage:
    """The SFT model (trained first when missing), the preference pairs and TRL's `DPOTrainer`, whose frozen
    `"ref"` adapter is a copy of the SFT adapter: the reference is the SFT model."""
    ensure_adapter(profile, "sft")
    model, tokenizer = load_for_training(profile, profile.dpo.max_length, adapter_dir=profile.sft_adapter_dir)
    pairs = preference_data(profile, tokenizer)
    trainer = train.make_dpo_trainer(profile, model, tokenizer, pairs.train, pairs.eval)
    return Stage(profile, "dpo", trainer.model, tokenizer, pairs, trainer)


def open_run(stage: Stage) -> None:
    """Open the stage's W&B run (offline unless WANDB_API_KEY is set), once."""
    if stage.wandb_run is None:
        stage.wandb_run = start_run(stage.profile, stage.name)


def measure_dpo_start(stage: Stage) -> dict:
    """Before the first step: the implicit rewards of the held-out pairs (exactly 0: policy = reference) and
    `trainer.evaluate()` (logged to W&B as step 0). Kept in `stage.notes["start"]` and returned."""
    from helpers.evaluate import implicit_rewards

    open_run(stage)
    chosen, rejected = implicit_rewards(
        stage.model, stage.tokenizer, stage.data.eval, stage.profile.dpo.beta, policy="default", reference="ref"
    )
    start = {"step0_reward_abs_max": max(chosen.abs().max().item(), rejected.abs().max().item())}
    start |= stage.trainer.evaluate(metric_key_prefix="eval")
    stage.notes["start"] = start
    return start


def train_and_save(stage: Stage, resume: bool = True) -> None:
    """Train (resuming from the last checkpoint of the same stage key) and save the adapter atomically."""
    open_run(stage)
    train.run_training(stage.trainer, stage.profile, stage.name, resume=resume)
    # Under `accelerate launch` every process holds the same trained adapter: one saves it, and the others wait
    # until it is complete (the next stage, in every process, loads it).
    if is_main_process():
        save_adapter(stage.trainer.model, stage.tokenizer, stage.adapter_dir, stage.profile, stage.name)
    barrier()


def record_sft(stage: Stage) -> dict:
    """Save the loss plot, close the W&B run; record under `sft` and return the first/last loss, steps, sizes."""
    history = train.log_history(stage.trainer)
    if is_main_process():  # under `accelerate launch` one process draws (metrics.json is guarded likewise)
        plots.save(plots.plot_training(history, "SFT"), stage.profile.output_dir / "sft-training.png")
    loss = losses(history)
    result = {
        "loss_first": loss[0],
        "loss_last": loss[-1],
        "steps": stage.trainer.state.global_step,
        "train_rows": len(stage.data.train),
        "trainable_parameters": count_parameters(stage.model)["trainable"],
    } | stage_cost(stage)
    finish_run(stage.wandb_run)
    update_metrics(stage.profile, sft=result)
    return result


def record_dpo(stage: Stage) -> dict:
    """Evaluate the held-out pairs after training, save the plots, close the W&B run; record under `dpo`."""
    start = stage.notes.get("start") or measure_dpo_start(stage)
    after = stage.trainer.evaluate(metric_key_prefix="eval")
    history = train.log_history(stage.trainer)
    out = stage.profile.output_dir
    if is_main_process():  # under `accelerate launch` one process draws (metrics.json is guarded likewise)
        plots.save(plots.plot_dpo_loss(history, step0_loss=start["eval_loss"]), out / "dpo-training.png")
        plots.save(plots.plot_rewards(history), out / "dpo-rewards.png")
        plots.save(plots.plot_memory(history), out / "dpo-memory.png")
    result = {
        "reward_accuracy_before": start["eval_rewards/accuracies"],
        "reward_accuracy_after": after["eval_rewards/accuracies"],
        "reward_margin_after": after["eval_rewards/margins"],
        "step0_reward_abs_max": start["step0_reward_abs_max"],
        "eval_loss_before": start["eval_loss"],
        "loss_first": losses(history)[0],
        "loss_last": losses(history)[-1],
        "steps": stage.trainer.state.global_step,
        "train_pairs": len(stage.data.train),
    } | stage_cost(stage)
    finish_run(stage.wandb_run)
    update_metrics(stage.profile, dpo=result, splits=splits.overlap_report(stage.profile))
    return result


COST_KEYS = ("train_seconds", "seconds_per_step", "peak_memory_gib", "estimate_seconds")  # what `stage_cost` adds


def stage_cost(stage: Stage) -> dict[str, float | None]:
    """What the last training session cost: seconds (the Trainer's `train_runtime`), the median seconds an
    optimizer step took (`callbacks.StepTimer`), the peak memory logged in GiB (GPU peak allocated on a GPU, else the
    process's resident memory), and the estimate printed before training (`helpers.estimates`; None on a CPU)."""
    history = train.log_history(stage.trainer)
    runtime = [h["train_runtime"] for h in history if "train_runtime" in h]
    steps = [h["step_seconds"] for h in history if "step_seconds" in h]
    memory = [h.get("memory/gpu_peak_allocated_gib", h.get("memory/cpu_rss_gib")) for h in history]
    memory = [m for m in memory if m is not None]
    estimate = estimates.before_training(stage.trainer, stage.name)
    values = (
        runtime[-1] if runtime else None,
        median(steps) if steps else None,
        max(memory) if memory else None,
        round(estimate.seconds, 1) if estimate.gpu else None,
    )
    return dict(zip(COST_KEYS, values, strict=True))


def losses(history: list[dict], key: str = "loss") -> list[float]:
    """The training losses logged, in order; a clear error when training ended before its first log."""
    found = [h[key] for h in history if key in h]
    if not found:
        steps = max((h.get("step", 0) for h in history), default=0)
        raise RuntimeError(
            f"No training loss was logged in {steps} steps: set logging_steps to at most max_steps and train again."
        )
    return found


# --- whole stages -------------------------------------------------------------------------------------------


def run_sft(profile: Profile, resume: bool = True) -> dict:
    """Build, train, save and record the SFT stage."""
    stage = build_sft(profile)
    train_and_save(stage, resume)
    return record_sft(stage)


def run_dpo(profile: Profile, resume: bool = True) -> dict:
    """Build, measure the start, train, save and record the DPO stage (from the SFT adapter)."""
    stage = build_dpo(profile)
    measure_dpo_start(stage)
    train_and_save(stage, resume)
    return record_dpo(stage)


def run_rl(profile: Profile, resume: bool = True) -> dict:
    """The RL stage (`helpers.rlhf.run_rl`), imported when needed: `helpers.rlhf` builds on this module."""
    from helpers import rlhf

    return rlhf.run_rl(profile, resume)


STAGE_RUNNERS = {"sft": run_sft, "dpo": run_dpo, "rl": run_rl}


def ensure_adapter(profile: Profile, stage: str) -> None:
    """Train `stage`'s adapter (and what it starts from) unless one with the same stage key is saved."""
    folder = profile.output_dir / f"{stage}-adapter"
    if not is_current(folder, profile, stage):
        print(f"No {stage.upper()} adapter for these settings in {folder.name}/: training it first.")
        STAGE_RUNNERS[stage](profile)
