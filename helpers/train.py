"""SFT and DPO with TRL: trainer construction, the callbacks we add, resumable training, atomic adapter saves."""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback

from helpers.config import Profile
from helpers.memory import MemoryCallback
from helpers.tracking import report_to

CHECKPOINT_DONE = "CHECKPOINT_COMPLETE"


# --- TRL 1.15 on a CPU ------------------------------------------------------------------------------------


class TorchLogProbs:
    """Plain-torch stand-in for TRL's Triton `ChunkedLogProbFunction` (same arguments, same five outputs).

    Why: TRL 1.15's trainers compute per-token log-probs with a Triton kernel only, and crash on a CPU with
    "'NoneType' object has no attribute 'apply'". TRL 1.16 dispatches by device itself; remove this once
    Unsloth allows trl>=1.16. On CUDA tensors the kernel is used when Triton is there.
    """

    kernel: Any = None

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs):
        if hidden.is_cuda and cls.kernel is not None:
            return cls.kernel.apply(
                hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs
            )
        logits = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits / temperature
        log_z = torch.logsumexp(logits, dim=-1)
        target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        probs = torch.softmax(logits, dim=-1)
        return (
            target_logits - log_z,
            log_z - (probs * logits).sum(-1) if "entropy" in outputs else None,
            torch.log((probs * probs).sum(-1)) if "log_sum_sq_probs" in outputs else None,
            logits.mean(-1) if "mean_logits" in outputs else None,
            logits.argmax(-1) == targets if "is_top1" in outputs else None,
        )


def install_cpu_logprob_fallback() -> None:
    """Route TRL's fused log-prob computation through `TorchLogProbs` (idempotent)."""
    import trl.trainer.utils as trl_utils

    current = trl_utils._ChunkedLogProbFunction
    if current is not TorchLogProbs:
        TorchLogProbs.kernel = current
        trl_utils._ChunkedLogProbFunction = TorchLogProbs


# --- packed attention on torch < 2.12 ---------------------------------------------------------------------


def enable_packed_flash_attention() -> bool:
    """Run Unsloth's packed (padding-free) attention as one flash-attention call per layer on torch < 2.12.

    Why: Unsloth sends packed sequences to torch's varlen flash kernel, but finds it only on torch >= 2.12
    (`varlen_attn(..., enable_gqa=)`). On older torch (the H200 image's 2.11) it runs one SDPA call per packed
    sequence instead: about 40 small calls per layer at 16k tokens a step, which leaves the GPU waiting. The
    flash kernel itself (`aten._flash_attention_forward` with sequence offsets) is there since torch 2.5; this
    points Unsloth's varlen hook at it. Returns True when it changed something; a no-op on a CPU, without
    Unsloth, or when Unsloth found the kernel itself (the pinned torch 2.13).
    """
    if not torch.cuda.is_available():
        return False
    try:
        from unsloth.utils import attention_dispatch as dispatch
    except ImportError:
        return False
    if getattr(dispatch, "_TORCH_VARLEN_ATTN", True) is not None or not hasattr(dispatch, "_LeanFlashVarlen"):
        return False

    def flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), **kwargs):
        left, right = window_size
        return dispatch._LeanFlashVarlen.apply(q, k, v, cu_q, max_q, (left, right) == (-1, 0), scale, left, right)

    dispatch._TORCH_VARLEN_ATTN = flash_varlen
    dispatch._LEAN_VARLEN = True
    dispatch._varlen_can_use_cudnn = lambda *args, **kwargs: False
    return True


# --- callbacks --------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; nothing was saved."""


class NonFiniteLossGuard(TrainerCallback):
    """Stops training at the first NaN/inf loss or gradient norm, naming the step and the likely causes.

    Losses are only seen every `logging_steps`, so the trainable weights are also checked before a checkpoint
    is marked complete and when training ends: a NaN after the last log never reaches a checkpoint that
    resume would load, nor the saved adapter.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise NonFiniteLossError(non_finite_message(f"{key} is {value}", state.global_step, args))

    def on_save(self, args, state, control, model=None, **kwargs):
        check_weights(model, state.global_step, args)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        check_weights(model, state.global_step, args)


def non_finite_message(what: str, step: int, args: Any) -> str:
    return (
        f"{what} at step {step}: training stopped and no adapter was saved. Likely causes: learning rate too "
        f"high (now {args.learning_rate:g}), fp16 overflow (use bf16), or a broken batch (run `python -m "
        "helpers.data check`). Lower the learning rate and run again."
    )


def check_weights(model: Any, step: int, args: Any) -> None:
    """Raise NonFiniteLossError when a trainable weight holds a NaN or an infinity."""
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param).all():
            raise NonFiniteLossError(non_finite_message(f"weight {name} is not finite", step, args))


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it, so resume never loads half a one."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            (folder / CHECKPOINT_DONE).write_text(str(state.global_step))


def attach_callbacks(trainer: Any) -> Any:
    """Add our callbacks; memory first, so W&B's callback sees the readings it adds to each log."""
    trainer.callback_handler.callbacks.insert(0, MemoryCallback())
    trainer.add_callback(NonFiniteLossGuard())
    trainer.add_callback(CheckpointMarker())
    return trainer


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


def common_args(profile: Profile, stage: str, output_dir: Path) -> dict:
    """Training arguments shared by SFT and DPO."""
    s = profile.sft if stage == "sft" else profile.dpo
    on_gpu = torch.cuda.is_available()
    return dict(
        output_dir=str(output_dir),
        seed=profile.seed,
        data_seed=profile.seed,
        learning_rate=s.learning_rate,
        num_train_epochs=s.num_train_epochs,
        max_steps=s.max_steps,
        per_device_train_batch_size=s.per_device_train_batch_size,
        per_device_eval_batch_size=s.per_device_train_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        optim=s.optim if on_gpu else "adamw_torch",
        lr_scheduler_type=s.lr_scheduler_type,
        warmup_steps=s.warmup_steps,
        logging_steps=s.logging_steps,
        save_strategy="steps",
        save_steps=s.save_steps,
        save_total_limit=2,
        max_length=s.max_length,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        # Recompute activations in the backward pass on a GPU (memory); on a CPU it would only cost time.
        gradient_checkpointing=on_gpu,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to=report_to(profile),
        run_name=f"{profile.name}-{stage}-seed{profile.seed}",
        dataloader_num_workers=0,
        # Log a NaN loss as NaN: by default the Trainer logs the window's average instead, hiding it from the guard.
        logging_nan_inf_filter=False,
    )


def make_sft_trainer(profile: Profile, model: Any, tokenizer: Any, train_dataset, eval_dataset=None):
    """A TRL `SFTTrainer` that computes the loss on assistant tokens only."""
    from trl import SFTConfig, SFTTrainer

    install_cpu_logprob_fallback()
    if profile.backend == "unsloth":
        enable_packed_flash_attention()
    config = SFTConfig(
        **common_args(profile, "sft", profile.output_dir / "sft-checkpoints"),
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
        **common_args(profile, "dpo", profile.output_dir / "dpo-checkpoints"), beta=s.beta, loss_type=list(s.loss_type)
    )

    class GroupedDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return LengthBucketSampler(pair_lengths(dataset), self.args.per_device_train_batch_size, self.args.seed)

    trainer_class = GroupedDPOTrainer if s.group_by_length else DPOTrainer
    trainer = trainer_class(
        model=model,
        ref_model=None,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    match_reference_dtypes(trainer.model)
    keep_adapter_dtypes_on_resume(trainer.model)
    return attach_callbacks(trainer)


def keep_adapter_dtypes_on_resume(model: Any) -> None:
    """Make the Trainer's resume load the checkpoint's adapter weights in the dtypes they were saved in.

    Why: resuming, the Trainer calls `model.load_adapter(checkpoint, ...)`, and peft's default
    `autocast_adapter_dtype=True` turns the bf16 LoRA weights TRL made for a 4-bit model into fp32. The resumed
    run would train in another precision and end with another adapter than an uninterrupted run.
    """
    model.load_adapter = functools.partial(model.load_adapter, autocast_adapter_dtype=False)


def match_reference_dtypes(model: Any) -> None:
    """Give each weight of TRL's frozen `"ref"` adapter the dtype of the policy weight it copies.

    Why: TRL 1.15 copies the adapter into `"ref"` (fp32), then casts only the *trainable* weights of a quantized
    model to bf16. Policy and reference then compute different log-probs from the same values, and the DPO
    rewards at step 0 are not exactly 0. Remove once TRL casts the copy too.
    """
    params = dict(model.named_parameters())
    for name, param in params.items():
        ref = params.get(name.replace(".default.", ".ref.")) if ".default." in name else None
        if ref is not None and ref.dtype != param.dtype:
            ref.data = ref.data.to(param.dtype)


# --- running and saving -----------------------------------------------------------------------------------


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints the Trainer finished writing, oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if (p / CHECKPOINT_DONE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def remove_incomplete_checkpoints(output_dir: Path) -> list[Path]:
    """Delete checkpoints a crash left half-written; return what was removed."""
    removed = [p for p in Path(output_dir).glob("checkpoint-*") if not (p / CHECKPOINT_DONE).exists()]
    for p in removed:
        shutil.rmtree(p)
    return removed


def discard_stale_checkpoints(trainer: Any, profile: Profile) -> None:
    """Remove checkpoints written with other settings (another seed, say): resuming them would mix two runs."""
    output_dir = Path(trainer.args.output_dir)
    settings = settings_fingerprint(profile)
    stamp = output_dir / "settings.json"
    if output_dir.exists() and (not stamp.exists() or stamp.read_text() != settings):
        if any(output_dir.glob("checkpoint-*")):
            print(f"{output_dir}: checkpoints from other settings removed; training starts afresh.")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(settings)


def restore_trained_adapter(model: Any, checkpoint: Path) -> None:
    """Load the trained ("default") adapter of a checkpoint that also holds other adapters (DPO's frozen "ref").

    Why: when a checkpoint has adapter subfolders, the Trainer resumes by loading those subfolders only, so DPO's
    policy, saved at the checkpoint's top level, would silently restart from the SFT weights.
    """
    weights = checkpoint / "adapter_model.safetensors"
    if weights.exists() and any((sub / weights.name).exists() for sub in checkpoint.iterdir() if sub.is_dir()):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(weights), adapter_name="default")


def run_training(trainer: Any, resume: bool = True):
    """Train, resuming from the last complete checkpoint when there is one.

    Raises:
        RuntimeError: the GPU ran out of memory (naming the settings to lower).
        NonFiniteLossError: the loss became NaN or infinite.
    """
    output_dir = Path(trainer.args.output_dir)
    remove_incomplete_checkpoints(output_dir)
    checkpoints = complete_checkpoints(output_dir)
    resume_from = str(checkpoints[-1]) if resume and checkpoints else None
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
            f"lower max_length (now {a.max_length}). Then run again: training resumes from the last checkpoint."
        ) from e


def settings_fingerprint(profile: Profile) -> str:
    """Every setting of the run, as canonical JSON: saved next to checkpoints and adapters to tell runs apart."""
    return json.dumps(profile.to_dict(), sort_keys=True)


def save_adapter(model: Any, tokenizer: Any, target: Path, profile: Profile) -> Path:
    """Save the adapter, tokenizer and the run's settings to `target` atomically (temporary folder, renamed).

    A crash mid-save leaves the previous adapter (or none), never a half-written one that a later step loads.
    """
    target = Path(target)
    staging = target.with_name(target.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(str(staging), selected_adapters=["default"])
    tokenizer.save_pretrained(str(staging))
    (staging / "settings.json").write_text(settings_fingerprint(profile))
    old = target.with_name(target.name + ".old")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)
    return target


def adapter_is_current(adapter_dir: Path, profile: Profile) -> bool:
    """True when `adapter_dir` holds a complete adapter trained with exactly these settings."""
    stamp = Path(adapter_dir) / "settings.json"
    return stamp.exists() and stamp.read_text() == settings_fingerprint(profile)


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
