"""Build TRL's SFT and DPO trainers with the callbacks this project adds (`helpers.callbacks`), and run them
resumably."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler

import helpers.backend  # noqa: F401  (Unsloth, when selected, patches transformers and trl first)
from helpers.callbacks import attach_callbacks
from helpers.checkpoints import discard_stale_checkpoints, resume_point
from helpers.config import Profile
from helpers.distributed import split_batch, world_size
from helpers.tracking import report_to
from helpers.workarounds import (
    complete_reference_adapter,
    enable_packed_flash_attention,
    install_cpu_logprob_fallback,
    keep_adapter_dtypes_on_resume,
    restore_trained_adapter,
    share_between_processes,
)

# --- batching ---------------------------------------------------------------------------------------------


class LengthBucketSampler(Sampler[int]):
    """Batches of similar length, in random batch order.

    Sorting examples by length and cutting the sorted list into batches removes most padding; shuffling the
    order of those batches (anew each epoch, from the seed) keeps the order of training random, so the
    expected gradient is the same as with shuffled examples.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        by_length = sorted(range(len(self.lengths)), key=lambda i: self.lengths[i])
        batches = [by_length[i : i + self.batch_size] for i in range(0, len(by_length), self.batch_size)]
        order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return [batches[i] for i in order]

    def __iter__(self):
        return (i for batch in self.batches() for i in batch)

    def __len__(self) -> int:
        return len(self.lengths)


def pair_lengths(dataset) -> list[int]:
    """Padded length of each tokenized DPO pair: prompt plus the longer of its two answers."""
    return [
        len(p) + max(len(c), len(r))
        for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
    ]


# --- configs and trainers ---------------------------------------------------------------------------------


def checkpoint_dir(profile: Profile, stage: str) -> Path:
    """Where the Trainer of `stage` writes its checkpoints."""
    return profile.output_dir / f"{stage}-checkpoints"


def common_args(profile: Profile, stage: str) -> dict:
    """Training arguments every stage shares, from the stage's settings (`profile.sft`, `.dpo` or `.rl`)."""
    s = getattr(profile, stage)
    on_gpu = torch.cuda.is_available()
    # Under `accelerate launch` every process takes a share of each batch: the effective batch (per-device batch ×
    # processes × accumulation), and so the stage key, stay the profile's (helpers/distributed.py).
    per_device, accumulation = split_batch(s.per_device_train_batch_size, s.gradient_accumulation_steps, world_size())
    return dict(
        output_dir=str(checkpoint_dir(profile, stage)),
        seed=profile.seed,
        data_seed=profile.seed,
        learning_rate=s.learning_rate,
        num_train_epochs=s.num_train_epochs,
        max_steps=s.max_steps,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=s.per_device_train_batch_size,
        gradient_accumulation_steps=accumulation,
        optim=s.optim if on_gpu else "adamw_torch",
        lr_scheduler_type=s.lr_scheduler_type,
        warmup_steps=s.warmup_steps,
        logging_steps=s.logging_steps,
        save_strategy="steps",
        save_steps=s.save_steps,
        save_total_limit=2,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        # Recompute activations in the backward pass on a GPU (memory); on a CPU it would only cost time.
        gradient_checkpointing=on_gpu,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to=report_to(profile),
        run_name=f"{profile.name}-{stage}-seed{profile.seed}",
        dataloader_num_workers=0,
        # Log a NaN loss as NaN: by default the Trainer logs the window's average instead, hiding it from the guard.
        logging_nan_inf_filter=False,
        # Several processes: every trainable weight (LoRA, trained token rows) gets a gradient each step, so DDP
        # need not search the graph for unused ones (the search also breaks under reentrant checkpointing), and
        # processes without a GPU join through gloo (without `use_cpu` each would train alone).
        ddp_find_unused_parameters=False,
        use_cpu=not on_gpu,
    )


def make_sft_trainer(profile: Profile, model: Any, tokenizer: Any, train_dataset, eval_dataset=None):
    """A TRL `SFTTrainer` that computes the loss on assistant tokens only."""
    from trl import SFTConfig, SFTTrainer

    install_cpu_logprob_fallback()
    if profile.backend == "unsloth":
        enable_packed_flash_attention()
    config = SFTConfig(
        **common_args(profile, "sft"),
        max_length=profile.sft.max_length,
        packing=profile.sft.packing,
        assistant_only_loss=True,
        weight_decay=profile.sft.weight_decay,
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer
    )
    keep_adapter_dtypes_on_resume(trainer.model)
    return attach_callbacks(trainer)


def make_dpo_trainer(profile: Profile, model: Any, tokenizer: Any, train_dataset, eval_dataset=None):
    """A TRL `DPOTrainer` whose reference is the model as DPO starts (the SFT model).

    `model` must be a `PeftModel` carrying the SFT adapter: with `ref_model=None` TRL copies that adapter into a
    frozen `"ref"` adapter, so the implicit rewards are exactly 0 at step 0.
    """
    from trl import DPOConfig, DPOTrainer

    install_cpu_logprob_fallback()
    s = profile.dpo
    config = DPOConfig(
        **common_args(profile, "dpo"),
        max_length=s.max_length,
        beta=s.beta,
        loss_type=list(s.loss_type),
        loss_weights=list(s.loss_weights) if s.loss_weights else None,
        precompute_ref_log_probs=s.precompute_ref_log_probs,
    )

    class ProjectDPOTrainer(DPOTrainer):
        """TRL's trainer with batches grouped by length (`group_by_length`) and a reference pass (`precompute_ref_
        log_probs`) that also runs under `accelerate launch` and, when grouping, over the pairs sorted by length."""

        def _get_train_sampler(self, train_dataset=None):
            if not s.group_by_length:
                return super()._get_train_sampler(train_dataset)
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return LengthBucketSampler(pair_lengths(dataset), self.args.per_device_train_batch_size, self.args.seed)

        def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
            # TRL scores the reference in the pairs' stored order, so every batch pads to its longest pair. Sorted
            # by length, batches pad little (on the H200: 28 pairs/s sorted at 32 a batch, 16.6 unsorted; REFERENCE
            # §3). Training batches are grouped by length anyway, and evaluation averages: the order is free.
            if s.group_by_length:
                dataset = dataset.select(sorted(range(len(dataset)), key=pair_lengths(dataset).__getitem__))
            folder = Path(f"{self.args.output_dir}-reference") / name
            return super()._precompute_ref_logps(share_between_processes(dataset, folder, self.args), name, batch_size)

    trainer = ProjectDPOTrainer(
        model=model,
        ref_model=None,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    complete_reference_adapter(trainer.model)
    keep_adapter_dtypes_on_resume(trainer.model)
    return attach_callbacks(trainer)


# --- running ----------------------------------------------------------------------------------------------


def run_training(trainer: Any, profile: Profile, stage: str, resume: bool = True):
    """Train `stage`, resuming from its last complete checkpoint written under the same stage key.

    Checkpoints of other settings are removed first (resuming them would mix two runs).

    Raises:
        RuntimeError: the GPU ran out of memory (naming the settings to lower).
        NonFiniteLossError: the loss became NaN or infinite.
    """
    output_dir = Path(trainer.args.output_dir)
    # Under `accelerate launch` one process removes stale and half-written checkpoints first; the others then find
    # none (two processes removing one folder fail, or one removes the checkpoint the other resumes from).
    with trainer.args.main_process_first(desc="checkpoint cleanup"):
        discard_stale_checkpoints(output_dir, profile, stage)
        checkpoint = resume_point(output_dir, resume)
    resume_from = str(checkpoint) if checkpoint else None
    if resume_from:
        print(f"resuming from {resume_from}")
        restore_trained_adapter(trainer.model, Path(resume_from))
    try:
        return trainer.train(resume_from_checkpoint=resume_from)
    except torch.OutOfMemoryError as e:
        a = trainer.args
        raise RuntimeError(
            f"GPU out of memory: lower per_device_train_batch_size (now {a.per_device_train_batch_size}) and raise "
            f"gradient_accumulation_steps (now {a.gradient_accumulation_steps}) to keep the effective batch, or "
            f"lower max_length (now {getattr(a, 'max_length', None)}). Then run again: training resumes from the "
            "last checkpoint."
        ) from e


def log_history(trainer: Any) -> list[dict]:
    """The Trainer's log records (one dict per logging step), for plots and reports."""
    return list(trainer.state.log_history)


def loss_token_spans(example: dict, tokenizer: Any) -> list[str]:
    """The stretches of text the SFT loss is computed on, decoded from a tokenized example's labels.

    Each maximal run of labels that are not -100 becomes one string: with the loss on assistant tokens only,
    these are exactly the assistant turns, each ending with `<|eot_id|>`.
    """
    spans, current = [], []
    for token_id, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != -100:
            current.append(token_id)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(span) for span in spans]
