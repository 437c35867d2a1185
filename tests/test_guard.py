"""Training stops with a clear message instead of saving a broken adapter: NaN/inf guard, out of GPU memory."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from helpers import pipeline, train
from helpers.callbacks import NonFiniteLossError
from helpers.checkpoints import complete_checkpoints


class PoisonWeights(TrainerCallback):
    """Writes a NaN into one LoRA weight at the end of step `step`, as a diverging update would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for name, p in model.named_parameters() if "lora_A" in name).view(-1)[0] = float("nan")


@pytest.fixture
def poisoned(monkeypatch):
    """`poisoned(step)`: every SFT trainer built from now on gets a NaN weight at the end of `step`."""

    def poison(step: int) -> None:
        make = train.make_sft_trainer

        def make_poisoned(*args, **kwargs):
            trainer = make(*args, **kwargs)
            trainer.add_callback(PoisonWeights(step))
            return trainer

        monkeypatch.setattr(train, "make_sft_trainer", make_poisoned)

    return poison


def few_steps(profile, max_steps: int):
    """SFT on 64 rows for `max_steps` steps, a log every 2 steps, a checkpoint only at the end."""
    sft = replace(profile.sft, max_steps=max_steps, logging_steps=2, save_steps=1000)
    return replace(profile, data=replace(profile.data, max_sft_rows=64), sft=sft)


@pytest.mark.slow
def test_a_nan_loss_stops_training_naming_the_step(tmp_profile, poisoned):
    profile = few_steps(tmp_profile, max_steps=8)
    poisoned(3)  # step 4 computes a NaN loss; step 4 is logged
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4: training stopped") as error:
        pipeline.run_sft(profile)
    assert f"learning rate too high (now {profile.sft.learning_rate:g})" in str(error.value)
    assert not profile.sft_adapter_dir.exists()


@pytest.mark.slow
def test_a_nan_after_the_last_log_never_reaches_a_checkpoint_or_the_adapter(tmp_profile, poisoned):
    profile = few_steps(tmp_profile, max_steps=5)
    poisoned(5)  # the last step: no log follows, only the final checkpoint
    with pytest.raises(NonFiniteLossError, match=r"weight .*lora_A.* is not finite at step 5"):
        pipeline.run_sft(profile)
    assert not profile.sft_adapter_dir.exists()
    checkpoints = profile.output_dir / "sft-checkpoints"
    assert (checkpoints / "checkpoint-5").exists() and not complete_checkpoints(checkpoints)


class OutOfMemoryTrainer:
    """Stands in for a Trainer on a GPU that runs out of memory at the first step."""

    def __init__(self, output_dir):
        self.args = SimpleNamespace(
            output_dir=str(output_dir),
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            max_length=2048,
            main_process_first=lambda desc: contextlib.nullcontext(),  # one process
        )

    def train(self, resume_from_checkpoint=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.91 GiB")


def test_out_of_memory_names_the_settings_to_lower(tmp_profile, tmp_path):
    with pytest.raises(RuntimeError) as error:
        train.run_training(OutOfMemoryTrainer(tmp_path), tmp_profile, "sft")
    assert type(error.value) is RuntimeError  # not the bare OutOfMemoryError (a RuntimeError subclass)
    assert isinstance(error.value.__cause__, torch.OutOfMemoryError)
    settings = ("per_device_train_batch_size (now 8)", "gradient_accumulation_steps (now 2)", "max_length (now 2048)")
    assert all(setting in str(error.value) for setting in settings), str(error.value)
