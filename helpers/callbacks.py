"""The callbacks this project adds to every trainer: a guard against non-finite losses and weights, checkpoints
marked complete, the GPU memory and step time in every log, and a short training table in notebooks."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import helpers.backend  # noqa: F401  (Unsloth, when selected, patches transformers first)
from helpers.checkpoints import CHECKPOINT_DONE
from helpers.memory import MemoryCallback

from transformers import TrainerCallback  # isort: skip  (after helpers.backend)
from transformers.utils.notebook import NotebookProgressCallback  # isort: skip


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
        if args.should_save and folder.is_dir():  # the process that wrote it (one under `accelerate launch`)
            (folder / CHECKPOINT_DONE).write_text(str(state.global_step))


class StepTimer(TrainerCallback):
    """Adds `step_seconds` to every training log: the median wall time of the optimizer steps since the last log
    (the median leaves out the first step's compiling). The pace the progress bar's ETA extrapolates, kept so that
    the estimate printed before training can be checked against it (`pipeline.stage_cost`)."""

    def __init__(self):
        self.began: float | None = None
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.began is not None:
            self.seconds.append(time.perf_counter() - self.began)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self.seconds:
            return
        logs["step_seconds"] = round(statistics.median(self.seconds), 4)
        if state.log_history:  # the Trainer copied `logs` into its history before calling back
            state.log_history[-1]["step_seconds"] = logs["step_seconds"]
        self.seconds = []


class ShortTrainingTable(NotebookProgressCallback):
    """The Trainer's table in a notebook, showing only its last `rows` logs (a stage logs up to a hundred; the
    plots after training show them all)."""

    def __init__(self, rows: int = 8):
        super().__init__()
        self.rows = rows

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


def attach_callbacks(trainer: Any) -> Any:
    """Add our callbacks; memory and step time first, so W&B's callback sees the readings they add to each log."""
    if trainer.pop_callback(NotebookProgressCallback):  # in a notebook: the same table, kept short
        trainer.add_callback(ShortTrainingTable())
    trainer.callback_handler.callbacks.insert(0, StepTimer())
    trainer.callback_handler.callbacks.insert(0, MemoryCallback())
    trainer.add_callback(NonFiniteLossGuard())
    trainer.add_callback(CheckpointMarker())
    return trainer
