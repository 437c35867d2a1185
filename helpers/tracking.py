"""Experiment tracking with Weights & Biases: offline by default, online when the user has a key.

Offline runs need no account: they are written to `outputs/<profile>/wandb/offline-run-*` and can be uploaded
later with `wandb sync outputs/<profile>/wandb/offline-run-*`. The API key is read by wandb from the
environment; this module never reads, prints or stores it.
"""

from __future__ import annotations

import os

from helpers.config import Profile
from helpers.distributed import is_main_process


def wandb_mode() -> str:
    """'online' when WANDB_API_KEY is set (and WANDB_MODE does not say otherwise), else 'offline'."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def report_to(profile: Profile) -> list[str]:
    """The `report_to` list for TRL configs."""
    return ["wandb"] if profile.report_to_wandb and wandb_mode() != "disabled" else []


def start_run(profile: Profile, stage: str):
    """Start a W&B run for one training stage ('sft' or 'dpo'); returns the run, or None when disabled or in
    a process other than the main one (under `accelerate launch` one run records the stage; the Trainer's W&B
    callback logs from that process only)."""
    if not report_to(profile) or not is_main_process():
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    profile.output_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=profile.wandb_project,
        name=f"{profile.name}-{stage}-seed{profile.seed}",
        dir=str(profile.output_dir),
        group=f"{profile.name}-seed{profile.seed}",
        job_type=stage,
        mode=wandb_mode(),
        config=profile.to_dict(),
        reinit="finish_previous",
    )


def finish_run(run) -> str | None:
    """Finish a W&B run; return its local folder (where offline runs wait to be synced)."""
    if run is None:
        return None
    folder = os.path.dirname(run.dir)
    run.finish()
    return folder
