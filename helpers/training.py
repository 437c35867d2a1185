"""Every training run (SFT, DPO, the toy reward model, RL, its hacking run, notebook 04's experiments) takes one path:
a TRL trainer built from the profile's config, wrapped in a `Stage` (this project's callbacks and library fixes),
`train_and_save` (resumably, the result saved atomically), then a record (`metrics.json`, the W&B run closed).

A stage's **key** holds exactly what determines its result: the model, the seed, the data (a content hash for a local
file), the split, the stage's settings, and the key of the stage it starts from; never evaluation, paths or tracking.
It is written next to a saved adapter (reused while the key matches) and to the checkpoints (removed when it does not).
Import this module after `settings.load_profile()`: its trainer classes subclass TRL's, which Unsloth replaces.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import AutoTokenizer, LlamaForSequenceClassification, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.utils.notebook import NotebookProgressCallback
from trl import DPOTrainer, RewardTrainer, RLOOTrainer, SFTTrainer

from helpers import data, fixes, generation, machine, model
from helpers.settings import Profile, dpo_config, report_to, reward_config, sft_config, wandb_mode

STAGES = ("sft", "dpo", "reward", "rl")
NOT_IN_KEYS = ("logging_steps", "save_steps", "eval_steps")  # how often a run logs or saves, never what it learns
CHECKPOINT_DONE, KEY_FILE = "CHECKPOINT_COMPLETE", "stage-key.json"
HASHED_FILE_LIMIT = 64 * 1024**2  # bigger files in a local model folder are identified by name and size


def source_id(source: str) -> str:
    """What identifies a model or dataset: the hub id, or a hash of the local file's (or folder's) content."""
    path = Path(source)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())  # none for a hub id
    return _content_hash(path, tuple((f, f.stat().st_size, f.stat().st_mtime_ns) for f in files)) if files else source


@functools.cache
def _content_hash(path: Path, files: tuple[tuple[Path, int, int], ...]) -> str:
    digest = hashlib.sha256()  # hashed once per version of the files (an edited file has a new size or time)
    for file, size, _ in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode() + str(size).encode())
        if size <= HASHED_FILE_LIMIT:
            digest.update(file.read_bytes())
    return f"sha256:{digest.hexdigest()}"


def stage_key(profile: Profile, stage: str) -> dict:
    """What determines the result of `stage` ('sft', 'dpo', 'reward' or 'rl'): see the module docstring."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
    d = profile.data
    split = {"seed": profile.seed, "eval_fraction": d.eval_fraction, "heldout_key": d.heldout_key}
    settings = {k: v for k, v in asdict(getattr(profile, stage)).items() if k not in NOT_IN_KEYS}
    if stage == "sft":
        sft_data = split | {"sft_dataset": source_id(d.sft_dataset), "max_sft_rows": d.max_sft_rows}
        model_key = {"model": source_id(profile.model_id), "lora": asdict(profile.lora)}
        return {"stage": stage, "data": sft_data, "sft": settings} | model_key
    pairs = split | {"preference_dataset": source_id(d.preference_dataset), "reward_fraction": d.reward_fraction}
    pairs["max_preference_rows"] = d.max_preference_rows
    key = {"stage": stage, "data": pairs, stage: settings}
    if stage == "dpo":
        return key | {"from": stage_key(profile, "sft")}
    if stage == "reward":
        return key | {"model": source_id(profile.model_id)}
    reward_model = profile.reward_model_id or stage_key(profile, "reward")
    start = stage_key(profile, profile.rl.start_from)
    return key | {"from": start, "reward_model": reward_model, "4bit": profile.reward_model_4bit}


def key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True, indent=1)


def is_current(profile: Profile, stage: str) -> bool:
    """True when `stage`'s adapter (or the toy reward model) is saved, complete, with exactly this key."""
    stamp = profile.adapter_dir(stage) / KEY_FILE
    return stamp.exists() and stamp.read_text() == key_text(stage_key(profile, stage))


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints the Trainer finished writing (marked by `CheckpointGuard`), oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if (p / CHECKPOINT_DONE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def discard_stale_checkpoints(output_dir: Path, key: dict) -> None:
    """Remove checkpoints written under another key (another seed, say): resuming them would mix two runs."""
    stamp = output_dir / KEY_FILE
    if output_dir.exists() and (not stamp.exists() or stamp.read_text() != key_text(key)):
        if any(output_dir.glob("checkpoint-*")):
            print(f"{output_dir.name}: checkpoints of other settings removed; training starts afresh.")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key_text(key))


def save_atomically(target: Path, write: Any) -> Path:
    """Call `write(folder)` on a temporary folder, then rename it to `target`: a crash leaves no half-written result."""
    staging, old = target.with_name(target.name + ".partial"), target.with_name(target.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write(staging)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def save_result(trained: Any, tokenizer: Any, target: Path, key: dict) -> Path:
    """Save a trained adapter (made portable) or a model, its tokenizer and the stage key to `target`, atomically."""

    def write(folder: Path) -> None:
        if hasattr(trained, "peft_config"):
            trained.save_pretrained(str(folder), selected_adapters=["default"])
            model.make_adapter_portable(folder, trained, tokenizer)
        else:
            trained.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        (folder / KEY_FILE).write_text(key_text(key))

    return save_atomically(target, write)


def read_metrics(profile: Profile) -> dict:
    """The run's `outputs/<profile>/metrics.json` so far (empty before the first stage)."""
    path = profile.output_dir / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def update_metrics(profile: Profile, **sections: Any) -> dict:
    """Merge `sections` into metrics.json, a dict one level deep (`eval={"dpo": ...}` keeps the other models); return
    the whole. Under `accelerate launch` one process writes."""
    metrics = read_metrics(profile) | {"profile": profile.name, "backend": profile.backend, "seed": profile.seed}
    for key, value in sections.items():
        metrics[key] = metrics.get(key, {}) | value if isinstance(value, dict) else value
    if PartialState().is_main_process:
        write_json_atomically(profile.output_dir / "metrics.json", metrics)
    return metrics


def write_json_atomically(path: Path, value: Any) -> Path:
    """Write `value` as indented JSON via a temporary file, so readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(value, indent=2) + "\n")
    path.with_suffix(".tmp").replace(path)
    return path


def start_run(profile: Profile, name: str) -> Any:
    """A W&B run for one stage, offline unless wandb itself finds `WANDB_API_KEY`; None when W&B is off or in a
    process other than the main one."""
    if not report_to(profile) or not PartialState().is_main_process:
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    profile.output_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=profile.wandb_project,
        name=f"{profile.name}-{name}-seed{profile.seed}",
        dir=str(profile.output_dir),
        group=f"{profile.name}-seed{profile.seed}",
        job_type=name,
        mode=wandb_mode(),
        config=asdict(profile),  # every setting (no secrets)
        reinit="finish_previous",
    )


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or weight; nothing was saved."""

    def __init__(self, what: str, step: int, args: Any):
        super().__init__(
            f"{what} at step {step}: training stopped and no adapter was saved. Likely causes: learning rate too high "
            f"(now {args.learning_rate:g}), fp16 overflow (use bf16), or a broken batch (run `python -m helpers.data "
            "check`). Lower the learning rate and run again."
        )


class CheckpointGuard(TrainerCallback):
    """Stops training at the first NaN/inf loss, gradient norm or weight (checked at each save and at the end, as losses
    are seen only every `logging_steps`), and marks a checkpoint complete once the Trainer has written all of it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            if logs.get(key) is not None and not math.isfinite(logs[key]):
                raise NonFiniteLossError(f"{key} is {logs[key]}", state.global_step, args)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        for name, param in model.named_parameters():
            if param.requires_grad and not torch.isfinite(param).all():
                raise NonFiniteLossError(f"weight {name} is not finite", state.global_step, args)

    def on_save(self, args, state, control, model=None, **kwargs):
        self.on_train_end(args, state, control, model=model)
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and folder.is_dir():  # the process that wrote it (one under `accelerate launch`)
            (folder / CHECKPOINT_DONE).write_text(str(state.global_step))


class LogReadings(TrainerCallback):
    """Adds to every training log the memory readings (`memory/*`, the GPU peak reset when training begins) and
    `step_seconds`, the median time of the optimizer steps since the last log (before W&B's callback sends it)."""

    def __init__(self):
        self.began, self.seconds = 0.0, []

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, args, state, control, **kwargs):
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.began)

    def on_log(self, args, state, control, logs=None, **kwargs):
        readings = {f"memory/{k}": round(v, 4) for k, v in machine.memory_snapshot().items()}
        if self.seconds:
            readings["step_seconds"] = round(statistics.median(self.seconds), 4)
            self.seconds = []
        logs.update(readings)
        if state.log_history:  # the Trainer copied `logs` into its history before calling back
            state.log_history[-1].update(readings)


class ShortTrainingTable(NotebookProgressCallback):
    """The Trainer's table in a notebook, showing its last `rows` logs only (the plots after training show all)."""

    rows = 8

    def _trim(self) -> None:
        table = self.training_tracker.inner_table if self.training_tracker else None
        if table and len(table) > self.rows:  # a header and rows: keep room for the one about to be written
            table[1:] = table[-(self.rows - 1) :]

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._trim()
        super().on_log(args, state, control, logs=logs, **kwargs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._trim()
        super().on_evaluate(args, state, control, metrics=metrics, **kwargs)


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length grouping, its shuffle seeded by the epoch: a resumed run sees the same batches."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + epoch)


class ProjectDPOTrainer(DPOTrainer):
    """TRL's `DPOTrainer`, its reference an exact copy of the SFT adapter (`fixes`), its precomputed reference pass
    shared between processes, and `group_by_length` working for pairs (TRL's have no `input_ids` for transformers to
    measure; real-token share, 16 pairs a batch, 8B shapes: 0.78 grouped, 0.46 shuffled, benchmarks/README.md)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        fixes.complete_reference_adapter(self.model)  # without a precomputed pass, TRL scores it in every step

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(*(dataset[k] for k in PAIR_COLUMNS), strict=True)]
        batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        return EpochSeededLengthGroupedSampler(batch, lengths, self.args.data_seed or self.args.seed)

    def _get_eval_sampler(self, eval_dataset):
        return torch.utils.data.SequentialSampler(eval_dataset)  # evaluation averages: its order does not matter

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        fixes.install_cpu_logprob_fallback()  # this pass runs inside __init__, before a `Stage` installs it
        fixes.complete_reference_adapter(self.model)  # TRL scores the reference here, inside __init__
        shared = fixes.share_between_processes(dataset, Path(f"{self.args.output_dir}-reference") / name, self.args)
        return super()._precompute_ref_logps(shared, name, batch_size)


PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


class FastRLOOTrainer(RLOOTrainer):
    """TRL's `RLOOTrainer`, its reference an exact frozen copy of the start adapter (`fixes`), its rollouts sampled by
    `helpers.sampler.Sampler` on a GPU (TRL's path on a CPU, and for top-p/k, min-p, repetition penalty,
    `generation_kwargs` or vLLM) in `_generate_single_turn`; `<|eot_id|>` and `<|end_of_text|>` both count as EOS."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "ref" not in self.model.peft_config:  # a patched trainer skipping the copy would measure KL to the base
            raise RuntimeError("RLOOTrainer made no frozen 'ref' adapter: the KL would be to the base, not the start.")
        fixes.complete_reference_adapter(self.model)
        fixes.freeze_reference_adapter(self.model)
        self.sampler = generation.sampler_for(self.model, self.processing_class)
        self.eos_token_ids = list(dict.fromkeys([*self.eos_token_ids, *self.sampler.stops]))
        self._rollout_step: int | None = None

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs):
        parent = super()._generate_single_turn
        plain = not (images is not None or multimodal_fields or self.use_vllm or self.args.generation_kwargs)
        plain = plain and self.top_p in (None, 1.0) and not self.top_k and not self.min_p
        if not (plain and self.repetition_penalty in (None, 1.0) and self.sampler.device.type == "cuda"):
            return parent(prompt_ids, images, multimodal_fields, *args, **kwargs)
        if self._rollout_step != self.state.global_step:  # an optimizer step changed the adapter
            self.sampler.refresh()
            self._rollout_step = self.state.global_step
        rows = self.sampler.generate_ids(
            prompt_ids,
            self.max_completion_length,
            sample=True,
            temperature=self.temperature,
            seed=None,
            batch_size=len(prompt_ids),
            adapter=self.model.active_adapter,
        )
        stops = set(self.sampler.stops)
        # TRL 1.15's RLOO takes the completion ids alone (GRPO also takes log-probs)
        return [r[: next((i + 1 for i, t in enumerate(r) if t in stops), len(r))] for r in rows]


@dataclass
class Stage:
    """One training run: profile, name, TRL trainer and data, with this project's callbacks and resume fixes. `key`
    defaults to `stage_key(profile, name)`; `save`: keep the result in `profile.adapter_dir(name)`."""

    profile: Profile
    name: str
    trainer: Any
    data: data.Splits | None = None
    key: dict | None = None
    save: bool = True
    notes: dict = field(default_factory=dict)  # numbers measured on the way (step-0 evaluation, estimate, held-out)
    wandb_run: Any = None

    def __post_init__(self):
        self.key = self.key or stage_key(self.profile, self.name)
        t = self.trainer
        if t.pop_callback(NotebookProgressCallback):  # in a notebook: the same table, kept short
            t.add_callback(ShortTrainingTable())
        t.callback_handler.callbacks.insert(0, LogReadings())  # before W&B's, which sends each log
        t.add_callback(CheckpointGuard())
        fixes.keep_adapter_dtypes_on_resume(t.model)
        fixes.install_cpu_logprob_fallback()

    @property
    def model(self) -> Any:
        return self.trainer.model

    @property
    def tokenizer(self) -> Any:
        return self.trainer.processing_class

    def history(self) -> list[dict]:
        """The Trainer's log records (one dict a logging step or evaluation)."""
        return list(self.trainer.state.log_history)


def open_run(stage: Stage) -> None:
    """Open the stage's W&B run, once (an evaluation before training is logged as step 0)."""
    if stage.wandb_run is None:
        stage.wandb_run = start_run(stage.profile, stage.name)


def train_and_save(stage: Stage, resume: bool = True) -> None:
    """Train, resuming from the last complete checkpoint of the same key (others removed first), then save the result
    when the stage keeps one. Out of GPU memory, a RuntimeError names the settings to lower."""
    open_run(stage)
    trainer, output_dir = stage.trainer, Path(stage.trainer.args.output_dir)
    # Under `accelerate launch` one process removes stale and half-written checkpoints; the others then find none.
    with trainer.args.main_process_first(desc="checkpoint cleanup"):
        discard_stale_checkpoints(output_dir, stage.key)
        for half_written in set(output_dir.glob("checkpoint-*")) - set(complete_checkpoints(output_dir)):
            shutil.rmtree(half_written)
    checkpoint = next(reversed(complete_checkpoints(output_dir)), None) if resume else None
    if checkpoint:
        print(f"resuming from {checkpoint}")
        fixes.restore_trained_adapter(trainer.model, checkpoint)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError as e:
        a = trainer.args
        raise RuntimeError(
            f"GPU out of memory: lower per_device_train_batch_size (now {a.per_device_train_batch_size}) and raise "
            f"gradient_accumulation_steps (now {a.gradient_accumulation_steps}) to keep the effective batch, or lower "
            f"max_length (now {getattr(a, 'max_length', None)}). Then run again: training resumes from the last "
            "checkpoint."
        ) from e
    if stage.save and PartialState().is_main_process:  # every process holds the same result: one saves it
        save_result(trainer.model, stage.tokenizer, stage.profile.adapter_dir(stage.name), stage.key)
    PartialState().wait_for_everyone()  # the next stage, in every process, loads it


def finish(stage: Stage, section: str, result: dict) -> dict:
    """Add what training cost to `result`, record it under `section` of metrics.json, close the W&B run; return it."""
    history = stage.history()
    memory = [h.get("memory/gpu_peak_allocated_gib", h.get("memory/cpu_rss_gib")) for h in history]
    steps = [h["step_seconds"] for h in history if "step_seconds" in h]
    result |= {
        "steps": stage.trainer.state.global_step,
        "train_seconds": next((h["train_runtime"] for h in reversed(history) if "train_runtime" in h), None),
        "seconds_per_step": statistics.median(steps) if steps else None,
        "peak_memory_gib": max((m for m in memory if m is not None), default=None),
        "estimate_seconds": stage.notes.get("estimate_seconds"),
    }
    if stage.wandb_run is not None:
        stage.wandb_run.finish()
    update_metrics(stage.profile, **{section: result}, splits=data.overlap_report(stage.profile))
    return result


def losses(history: list[dict]) -> list[float]:
    """The logged training losses, in order; a clear error when training ended before its first log."""
    found = [h["loss"] for h in history if "loss" in h]
    if not found:
        steps = max((h.get("step", 0) for h in history), default=0)
        raise RuntimeError(f"No loss was logged in {steps} steps: set logging_steps to at most max_steps.")
    return found


def build_sft(profile: Profile) -> Stage:
    """Notebook 03's stage: the 4-bit base with fresh LoRA adapters, the SFT data, TRL's `SFTTrainer`."""
    machine.require_memory("sft", machine.MEASURED["peak_gib"]["sft"])
    policy, tokenizer = model.load_for_training(profile, profile.sft.max_length)
    sft = data.sft_data(profile, tokenizer)
    sft.write(profile)
    args = sft_config(profile)
    trainer = SFTTrainer(
        model=policy, args=args, train_dataset=sft.train, eval_dataset=sft.eval, processing_class=tokenizer
    )
    return Stage(profile, "sft", trainer, sft)


def build_dpo(profile: Profile) -> Stage:
    """Notebook 04's stage: the SFT model (trained first when missing, and the frozen `"ref"` adapter) and the pairs."""
    ensure(profile, "sft")
    machine.require_memory("dpo", machine.MEASURED["peak_gib"]["dpo"])
    policy, tokenizer = model.load_for_training(profile, profile.dpo.max_length, profile.adapter_dir("sft"))
    pairs = data.preference_data(profile, tokenizer)
    pairs.write(profile)
    args = dpo_config(profile)
    trainer = ProjectDPOTrainer(
        model=policy, args=args, train_dataset=pairs.train, eval_dataset=pairs.eval, processing_class=tokenizer
    )
    return Stage(profile, "dpo", trainer, pairs)


def build_reward(profile: Profile) -> Stage:
    """The smoke profile's toy reward model: its base with a fresh scalar head, trained whole by TRL's `RewardTrainer`
    (notebook 01's Bradley-Terry loss) on the `reward-train` pairs, which DPO never sees."""
    if profile.reward_model_id is not None:  # a GPU profile judges with a published reward model: nothing to train
        raise ValueError(
            f"Profile {profile.name!r} judges with the published {profile.reward_model_id}; the toy reward model is "
            "for the smoke profile's tiny base only. Use rl.load_reward_model(profile), or the smoke profile."
        )
    tokenizer = model.apply_chat_template(AutoTokenizer.from_pretrained(profile.model_id))
    pairs = data.preference_data(profile, tokenizer)
    pairs.write(profile)
    torch.manual_seed(profile.seed)  # the scalar head starts random: seed it
    scorer = LlamaForSequenceClassification.from_pretrained(profile.model_id, num_labels=1, dtype=torch.float32)
    scorer.config.pad_token_id = tokenizer.pad_token_id
    trainer = RewardTrainer(
        model=scorer, args=reward_config(profile), train_dataset=pairs.reward, processing_class=tokenizer
    )
    return Stage(profile, "reward", trainer, pairs)


def measure_dpo_start(stage: Stage) -> dict:
    """TRL's evaluation of the held-out pairs before the first step (W&B's step 0, `stage.notes["start"]`): with the
    SFT model as the reference every implicit reward is exactly 0."""
    open_run(stage)
    stage.notes["start"] = stage.trainer.evaluate()
    return stage.notes["start"]


def dpo_start_failures(start: dict) -> list[str]:
    """What a DPO start must show (empty when it holds): TRL's step-0 rewards exactly 0, no pair ranked right."""
    keys = ("eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins", "eval_rewards/accuracies")
    return [f"{k} is {start[k]:g} before the first step, not exactly 0" for k in keys if start[k] != 0.0]


def first_and_last_loss(stage: Stage) -> dict:
    found = losses(stage.history())
    return {"loss_first": found[0], "loss_last": found[-1]}


def record_sft(stage: Stage) -> dict:
    """The first and last training loss and the held-out losses, under `sft` in metrics.json."""
    result = first_and_last_loss(stage) | {"train_rows": len(stage.data.train)}
    result["eval_loss"] = [h["eval_loss"] for h in stage.history() if "eval_loss" in h]
    result["trainable_parameters"] = model.count_parameters(stage.model)["trainable"]
    return finish(stage, "sft", result)


def record_dpo(stage: Stage) -> dict:
    """TRL's evaluation before (`measure_dpo_start`, called first) and after training, under `dpo` in metrics.json."""
    start, after = stage.notes["start"], stage.trainer.evaluate()
    result = {
        "reward_accuracy_before": start["eval_rewards/accuracies"],
        "step0_rewards": {k: start[f"eval_rewards/{k}"] for k in ("chosen", "rejected", "margins")},
        "eval_loss_before": start["eval_loss"],
        "reward_accuracy_after": after["eval_rewards/accuracies"],
        "reward_margin_after": after["eval_rewards/margins"],
    }
    return finish(stage, "dpo", result | first_and_last_loss(stage) | {"train_pairs": len(stage.data.train)})


def record_reward(stage: Stage) -> dict:
    """The toy reward model's training loss, under `reward` in metrics.json."""
    return finish(stage, "reward", first_and_last_loss(stage))


def run(profile: Profile, name: str) -> dict:
    """Build, train, save and record `name` ("sft", "dpo" or "reward") as the notebooks do."""
    stage = {"sft": build_sft, "dpo": build_dpo, "reward": build_reward}[name](profile)
    if name == "dpo":
        measure_dpo_start(stage)
    train_and_save(stage)
    return {"sft": record_sft, "dpo": record_dpo, "reward": record_reward}[name](stage)


def ensure(profile: Profile, name: str) -> None:
    """Train `name` ("sft", "dpo" or "reward") unless its result is saved under the same key."""
    if not is_current(profile, name):
        print(f"No {name} result for these settings in {profile.adapter_dir(name).name}/: training it first.")
        run(profile, name)


def sft_failures(profile: Profile, sft: dict) -> list[str]:
    """What an SFT run must show (empty when it holds): the loss fell (to `sft_loss_ratio_max` × the first, if set)."""
    first, last, e = sft["loss_first"], sft["loss_last"], profile.expect
    failures = [] if last < first else [f"SFT loss did not fall: {first:.3f} → {last:.3f}"]
    if e and last > e.sft_loss_ratio_max * first:
        failures.append(f"SFT loss {first:.3f} → {last:.3f}: not below {e.sft_loss_ratio_max} × the first")
    return failures


def dpo_failures(profile: Profile, dpo: dict) -> list[str]:
    """What a DPO run must show: TRL's step-0 rewards exactly 0, and the promised held-out reward accuracy."""
    start = {f"eval_rewards/{k}": v for k, v in dpo["step0_rewards"].items()}
    failures = dpo_start_failures(start | {"eval_rewards/accuracies": dpo["reward_accuracy_before"]})
    accuracy, e = dpo["reward_accuracy_after"], profile.expect
    if e and accuracy < e.dpo_reward_accuracy_min:
        failures.append(f"DPO held-out reward accuracy {accuracy:.3f} < {e.dpo_reward_accuracy_min}")
    return failures


def require(failures: list[str]) -> None:
    """Raise AssertionError listing `failures`, if any (the notebooks' checks)."""
    if failures:
        raise AssertionError("; ".join(failures))
