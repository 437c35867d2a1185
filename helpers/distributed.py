"""Several processes on one machine (`accelerate launch`, torchrun): which process this is, the batch each one
takes, and the guards that keep shared files written once.

A launcher gives every process `RANK` (0 to `WORLD_SIZE` - 1) and `LOCAL_RANK` (its GPU on this machine). A
notebook or a plain `python -m` run has neither: it is process 0 of 1, and every guard here does nothing.
"""

from __future__ import annotations

import os

from helpers.environment import SettingsError


def world_size() -> int:
    """How many processes train together (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    """This process's number among all of them (0 without a launcher)."""
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    """This process's number on this machine: the GPU it trains on."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """True in the one process that writes shared files: splits, metrics, plots, the adapter, the W&B run."""
    return rank() == 0


def start() -> None:
    """Join the launcher's process group (NCCL between GPUs, gloo between CPU processes) and make this process's
    GPU the current one, before any model or tensor is placed on "cuda". A single process has nothing to do."""
    import torch
    import torch.distributed as dist

    if world_size() == 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def barrier() -> None:
    """Wait here until every process arrives (at once in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def split_batch(per_device: int, accumulation: int, processes: int) -> tuple[int, int]:
    """The (per-device batch, accumulation steps) that give `processes` processes the effective batch that
    (`per_device`, `accumulation`) gives one: per-device batch × processes × accumulation is unchanged.

    The accumulation is divided when it can be (every process keeps the one-process micro-batch: the same memory
    and speed per micro-step), else the per-device batch.

    Raises:
        SettingsError: neither divides by `processes`.
    """
    if accumulation % processes == 0:
        return per_device, accumulation // processes
    if per_device % processes == 0:
        return per_device // processes, accumulation
    raise SettingsError(
        f"{processes} processes cannot keep the effective batch of {per_device * accumulation} "
        f"(per_device_train_batch_size {per_device} × gradient_accumulation_steps {accumulation}): neither divides "
        f"by {processes}. Launch a number of processes that divides one of them, or change them with "
        "TUTORIAL_SETTINGS."
    )
