"""Interrupted training resumes from its last complete checkpoint and ends with the uninterrupted run's adapter.

A run is killed (SIGKILL, or SIGINT as from Ctrl-C) in a subprocess once its first checkpoint is marked
complete, then resumed with one call, `pipeline.run_sft(profile)` or `pipeline.run_dpo(profile)`. Its final
adapter must equal, tensor by tensor, the adapter of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import pipeline
from helpers.checkpoints import complete_checkpoints
from helpers.config import Profile, smoke_profile
from helpers.metrics import read_metrics

# On a CPU with a fixed seed every step is the same sequence of float operations, so a resumed run should be
# bit for bit the uninterrupted one. Measured: identical (max |difference| 0.0), so the tolerance is 0: any
# difference means some state was not restored. Three bugs showed this way before they were fixed: LoRA weights
# initialised from an unseeded generator (0.2), resume up-casting the bf16 adapter to fp32 (1 bf16 ulp), and
# DPO resuming its policy from the SFT weights instead of the checkpoint (0.004, rewards visibly lower).
ATOL = 0.0
KILL_TIMEOUT_S = 300
TESTS_DIR = Path(__file__).parent
CHILD = (
    "import sys, warnings; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
    "warnings.filterwarnings('error', '.*an autograd kernel was not registered', UserWarning); "  # as pyproject's
    "from test_resume import short_profile; from helpers import callbacks, pipeline; "
    # Pause after each checkpoint is marked complete, so the signal lands mid-run however fast the machine is (12
    # steps take under a second on an idle CPU: the run could end before the parent's signal arrives).
    "mark = callbacks.CheckpointMarker.on_save; "
    "callbacks.CheckpointMarker.on_save = lambda self, *a, **k: (mark(self, *a, **k), __import__('time').sleep(5)); "
    "getattr(pipeline, 'run_' + sys.argv[3])(short_profile(Path(sys.argv[2])))"
)


def short_profile(outputs: Path) -> Profile:
    """The smoke profile of the session's seed cut short, a checkpoint every 3 steps: SFT 12 steps (batch 16 from
    96 rows), DPO 10 steps (batch 8 from 48 rows)."""
    profile = smoke_profile(int(os.environ.get("TUTORIAL_SEED", 42)), "hf")
    data = replace(profile.data, max_sft_rows=96, max_preference_rows=48)
    sft = replace(profile.sft, max_steps=12, save_steps=3, logging_steps=1)
    dpo = replace(profile.dpo, max_steps=10, save_steps=3, logging_steps=1)
    return replace(profile, outputs_root=str(outputs), data=data, sft=sft, dpo=dpo)


def adapter_weights(profile: Profile, stage: str) -> dict[str, torch.Tensor]:
    return load_file(profile.output_dir / f"{stage}-adapter" / "adapter_model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in b.items()}
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def uninterrupted(smoke_world, tmp_path_factory) -> Profile:
    """A profile whose SFT adapter was trained without interruption."""
    profile = short_profile(tmp_path_factory.mktemp("uninterrupted"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("WANDB_MODE", "disabled")
        assert pipeline.run_sft(profile)["steps"] == 12
    return profile


def interrupt_at_first_checkpoint(profile: Profile, stage: str, sig: signal.Signals) -> subprocess.CompletedProcess:
    """Run `stage` ('sft' or 'dpo') in a subprocess and send it `sig` once a checkpoint is marked complete."""
    env = os.environ | {"WANDB_MODE": "disabled"}
    args = [sys.executable, "-c", CHILD, str(TESTS_DIR), profile.outputs_root, stage]
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = profile.output_dir / f"{stage}-checkpoints"
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while not complete_checkpoints(checkpoints) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(sig)
    output, _ = process.communicate(timeout=60)
    return subprocess.CompletedProcess(args, process.returncode, output)


def interrupt_and_resume(profile: Profile, stage: str, sig: signal.Signals, capsys) -> dict[str, torch.Tensor]:
    """Interrupt `stage` at its first checkpoint, resume it with one call; return the final adapter."""
    killed = interrupt_at_first_checkpoint(profile, stage, sig)
    assert killed.returncode != 0, f"the run ended before it was interrupted:\n{killed.stdout[-2000:]}"
    assert not (profile.output_dir / f"{stage}-adapter").exists()
    checkpoints = profile.output_dir / f"{stage}-checkpoints"
    assert complete_checkpoints(checkpoints), f"no checkpoint was completed:\n{killed.stdout[-2000:]}"
    last_complete = complete_checkpoints(checkpoints)[-1]
    # A checkpoint a crash left half-written (no completion marker) must be removed, not resumed from.
    half_written = checkpoints / "checkpoint-11"
    half_written.mkdir(exist_ok=True)
    (half_written / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    capsys.readouterr()

    getattr(pipeline, f"run_{stage}")(profile)  # one call resumes
    assert f"resuming from {last_complete}" in capsys.readouterr().out
    assert not half_written.exists()
    return adapter_weights(profile, stage)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_sft_resumes_to_the_same_adapter(sig, uninterrupted, tmp_path, capsys):
    resumed = interrupt_and_resume(short_profile(tmp_path), "sft", sig, capsys)
    difference = max_difference(resumed, adapter_weights(uninterrupted, "sft"))
    assert difference <= ATOL, f"resumed adapter differs from the uninterrupted one by {difference:g}"


@pytest.mark.slow
def test_interrupted_dpo_resumes_to_the_same_adapter(uninterrupted, capsys):
    profile = uninterrupted  # its SFT adapter is current, so DPO starts from it without retraining
    expected = pipeline.run_dpo(profile)
    weights = adapter_weights(profile, "dpo")
    shutil.rmtree(profile.dpo_adapter_dir)
    shutil.rmtree(profile.output_dir / "dpo-checkpoints")

    resumed = interrupt_and_resume(profile, "dpo", signal.SIGKILL, capsys)
    difference = max_difference(resumed, weights)
    assert difference <= ATOL, f"resumed adapter differs from the uninterrupted one by {difference:g}"
    cost = pipeline.COST_KEYS  # what the run cost differs between runs; what it learned must not
    result = {k: v for k, v in read_metrics(profile)["dpo"].items() if k not in cost}
    assert result == {k: v for k, v in expected.items() if k not in cost}  # the same rewards, too
