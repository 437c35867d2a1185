"""Memory readings: one function serves printing, plots and the training logs (and so W&B)."""

from __future__ import annotations

import os

import psutil
import torch

import helpers.backend  # noqa: F401  (Unsloth, when selected, patches transformers first)

from transformers import TrainerCallback  # isort: skip  (after helpers.backend)

GIB = 1024**3


def memory_snapshot() -> dict[str, float]:
    """Current memory in GiB: CPU process RSS, and on a CUDA GPU allocated, reserved and peak allocated."""
    snapshot = {"cpu_rss_gib": psutil.Process(os.getpid()).memory_info().rss / GIB}
    if torch.cuda.is_available():
        snapshot.update(
            gpu_allocated_gib=torch.cuda.memory_allocated() / GIB,
            gpu_reserved_gib=torch.cuda.memory_reserved() / GIB,
            gpu_peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
            gpu_total_gib=torch.cuda.get_device_properties(0).total_memory / GIB,
        )
    return snapshot


def reset_peak_memory() -> None:
    """Start a new GPU peak: `gpu_peak_allocated_gib` then reports the peak since this call (no-op on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def format_memory(snapshot: dict[str, float]) -> str:
    """One line, e.g. 'cpu_rss 1.20 GiB | gpu_allocated 5.61 GiB | ...'."""
    return " | ".join(f"{k.removesuffix('_gib')} {v:.2f} GiB" for k, v in snapshot.items())


class MemoryCallback(TrainerCallback):
    """Adds `memory/<name>` readings to every training log, so they land in W&B next to the loss.

    It must run before W&B's own callback, or the readings are added after W&B has sent the log:
    `trainer.callback_handler.callbacks.insert(0, MemoryCallback())` (see `helpers.callbacks.attach_callbacks`).
    The GPU peak is reset when training begins, so each stage logs its own training peak, not that of an
    evaluation or an earlier stage in the same process.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        reset_peak_memory()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        readings = {f"memory/{k}": round(v, 4) for k, v in memory_snapshot().items()}
        logs.update(readings)
        # The Trainer copied `logs` into its history before calling back: add them there too, for the plots.
        if state.log_history:
            state.log_history[-1].update(readings)
