"""Data-parallel stages: the batch split that keeps the effective batch, the guards that keep shared files written
by one process, and (slow) SFT then DPO under `accelerate launch` with 2 CPU processes talking through gloo."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import distributed, splits, tracking, train
from helpers.checkpoints import complete_checkpoints, is_current
from helpers.config import PROJECT_ROOT, full_profile
from helpers.environment import SettingsError, load_profile
from helpers.metrics import metrics_path, update_metrics


def test_split_batch_divides_the_accumulation_first_then_the_per_device_batch():
    assert distributed.split_batch(16, 2, 2) == (16, 1)
    assert distributed.split_batch(8, 1, 2) == (4, 1)
    assert distributed.split_batch(8, 4, 4) == (8, 1)
    assert distributed.split_batch(8, 2, 4) == (2, 2)
    assert distributed.split_batch(8, 3, 1) == (8, 3)
    with pytest.raises(SettingsError, match="neither divides by 3"):
        distributed.split_batch(8, 2, 3)


def test_trainer_arguments_keep_the_effective_batch_on_two_processes(monkeypatch):
    profile = full_profile(42, "hf")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for stage in ("sft", "dpo"):
        s, args = getattr(profile, stage), train.common_args(profile, stage)
        effective = args["per_device_train_batch_size"] * 2 * args["gradient_accumulation_steps"]
        assert effective == s.per_device_train_batch_size * s.gradient_accumulation_steps
    assert train.common_args(profile, "dpo")["per_device_train_batch_size"] == profile.dpo.per_device_train_batch_size
    assert train.common_args(profile, "sft")["ddp_find_unused_parameters"] is False


def test_only_the_main_process_writes_shared_files(tmp_profile, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("RANK", "1")
    assert not distributed.is_main_process()
    assert update_metrics(tmp_profile, sft={"steps": 3})["sft"] == {"steps": 3}
    path = splits.write_split(tmp_profile, "sft-train", [{"messages": []}])
    assert tracking.start_run(tmp_profile, "sft") is None
    assert not metrics_path(tmp_profile).exists() and not path.exists()
    monkeypatch.setenv("RANK", "0")
    update_metrics(tmp_profile, sft={"steps": 3})
    assert json.loads(metrics_path(tmp_profile).read_text())["sft"] == {"steps": 3}


def launch(stage: str, env: dict, processes: int = 2) -> str:
    """Run the stage: `accelerate launch` on 2 processes (no GPU: gloo), or plain `python -m` on one; return the
    output of all processes."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--main_process_port", "0", "-m", "helpers.stages", stage]
    if processes == 1:
        command = [sys.executable, "-m", "helpers.stages", stage]
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    return log


def logged_losses(profile, stage: str) -> list[float]:
    """The training losses logged in the stage's last checkpoint."""
    (checkpoint,) = complete_checkpoints(train.checkpoint_dir(profile, stage))
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


@pytest.mark.slow
def test_sft_then_dpo_train_data_parallel_on_two_processes(smoke_world, smoke_seed, tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({stage: {"max_steps": 3, "logging_steps": 1} for stage in ("sft", "dpo")}))
    env = os.environ | {
        "TUTORIAL_PROFILE": "smoke",
        "TUTORIAL_SEED": str(smoke_seed),
        "TUTORIAL_SETTINGS": str(settings),
        "TUTORIAL_OUTPUTS": str(tmp_path / "outputs"),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    profile = load_profile(env)
    alone = load_profile(env | {"TUTORIAL_OUTPUTS": str(tmp_path / "alone")})
    for stage in ("sft", "dpo"):
        log = launch(stage, env)
        assert f"process 0 of 2: {stage}" in log and f"process 1 of 2: {stage}" in log
        assert is_current(profile.output_dir / f"{stage}-adapter", profile, stage)
        (checkpoint,) = complete_checkpoints(train.checkpoint_dir(profile, stage))
        assert sorted(p.name for p in checkpoint.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
        args = torch.load(checkpoint / "training_args.bin", weights_only=False)  # what the Trainer ran with
        s = getattr(profile, stage)
        assert args.world_size == 2
        effective = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        assert effective == s.per_device_train_batch_size * s.gradient_accumulation_steps
    # Same batches, gradients averaged over both processes: the same training as one process, up to rounding.
    launch("sft", env | {"TUTORIAL_OUTPUTS": str(tmp_path / "alone")}, processes=1)
    assert logged_losses(alone, "sft") == pytest.approx(logged_losses(profile, "sft"), abs=0.01)
    assert sorted(p.name for p in profile.output_dir.glob("*-adapter*")) == ["dpo-adapter", "sft-adapter"]
    assert not [p for p in profile.output_dir.rglob("*") if p.suffix in (".tmp", ".partial")]
    metrics = json.loads(metrics_path(profile).read_text())
    assert metrics["sft"]["steps"] == metrics["dpo"]["steps"] == 3
    assert metrics["dpo"]["step0_reward_abs_max"] == 0.0 and metrics["splits"]["eval_problems_in_training"] == 0
