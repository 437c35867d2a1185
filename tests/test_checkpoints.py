"""Stage keys hold exactly what determines a stage's result; checkpoints resume only under the same key; a save
is all or nothing."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import checkpoints, pipeline, train
from helpers.checkpoints import KEY_FILE, STAGES, is_current, key_text, save_adapter, source_id, stage_key
from helpers.config import Profile


def changed_stages(profile: Profile, other: Profile) -> set[str]:
    return {stage for stage in STAGES if stage_key(profile, stage) != stage_key(other, stage)}


def setting(section: str, **changes):
    """A change of one settings section of a profile, for `dataclasses.replace`."""
    return lambda p: replace(p, **{section: replace(getattr(p, section), **changes)})


# Each change, and the stages whose result it changes (RL starts from SFT; the smoke RL judge is the toy
# reward model, so it follows the reward stage too).
CHANGES = {
    "evaluation settings": (
        setting("eval", num_prompts=3, samples_per_prompt=1, max_new_tokens=5, temperature=0.1, bootstrap_samples=9),
        set(),
    ),
    "expectations": (setting("expect", better_answer_rate_dpo_min=0.1, sft_loss_ratio_max=0.9), set()),
    "code judge": (lambda p: replace(p, code_judge=False), set()),
    "outputs folder": (lambda p: replace(p, outputs_root="/somewhere/else"), set()),
    "W&B": (lambda p: replace(p, report_to_wandb=not p.report_to_wandb, wandb_project="another"), set()),
    "logging and saving": (
        lambda p: setting("dpo", logging_steps=1, save_steps=3)(setting("sft", logging_steps=1, save_steps=3)(p)),
        set(),
    ),
    "DPO beta": (setting("dpo", beta=0.9), {"dpo"}),  # smoke trains at 0.5
    "DPO loss": (setting("dpo", loss_type=("sigmoid",), learning_rate=1e-5), {"dpo"}),
    "preference rows": (setting("data", max_preference_rows=100), {"dpo", "reward", "rl"}),
    "reward split": (setting("data", reward_fraction=0.1), {"dpo", "reward", "rl"}),
    "reward model settings": (setting("reward", learning_rate=1e-5), {"reward", "rl"}),
    "RL settings": (setting("rl", beta=0.5, max_steps=3), {"rl"}),
    "RL start": (setting("rl", start_from="dpo"), {"rl"}),
    "SFT settings": (setting("sft", learning_rate=1e-5), {"sft", "dpo", "rl"}),
    "LoRA settings": (setting("lora", r=8), {"sft", "dpo", "rl"}),
    "SFT rows": (setting("data", max_sft_rows=100), {"sft", "dpo", "rl"}),
    "held-out share": (setting("data", eval_fraction=0.3), set(STAGES)),
    "seed": (lambda p: replace(p, seed=p.seed + 1), set(STAGES)),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_stage_key_changes_exactly_with_what_determines_the_stage(tmp_profile, change):
    apply, expected = CHANGES[change]
    assert changed_stages(tmp_profile, apply(tmp_profile)) == expected


def save_stub_adapters(profile: Profile) -> None:
    """SFT and DPO adapter folders holding only their stage keys, as `save_adapter` writes them."""
    for stage in ("sft", "dpo"):
        folder = profile.output_dir / f"{stage}-adapter"
        checkpoints.save_atomically(folder, lambda f, s=stage: (f / KEY_FILE).write_text(key_text(profile, s)))


def test_a_saved_adapter_is_current_until_what_determines_it_changes(tmp_profile):
    save_stub_adapters(tmp_profile)
    assert (tmp_profile.sft_adapter_dir / KEY_FILE).exists()
    for apply, expected in CHANGES.values():
        changed = apply(tmp_profile)
        current = {s for s in ("sft", "dpo") if is_current(tmp_profile.output_dir / f"{s}-adapter", changed, s)}
        assert current == {"sft", "dpo"} - expected


def test_a_copied_outputs_folder_is_reused_as_is(tmp_profile, tmp_path, monkeypatch):
    save_stub_adapters(tmp_profile)
    train_dir = train.checkpoint_dir(tmp_profile, "sft")
    checkpoints.discard_stale_checkpoints(train_dir, tmp_profile, "sft")
    (train_dir / "checkpoint-3").mkdir()
    moved = replace(tmp_profile, outputs_root=str(tmp_path / "moved"))
    shutil.copytree(tmp_profile.output_dir, moved.output_dir)

    assert is_current(moved.sft_adapter_dir, moved, "sft") and is_current(moved.dpo_adapter_dir, moved, "dpo")
    monkeypatch.setattr(pipeline, "STAGE_RUNNERS", {})  # training anything would fail with a KeyError
    pipeline.ensure_adapter(moved, "dpo")
    checkpoints.discard_stale_checkpoints(train.checkpoint_dir(moved, "sft"), moved, "sft")
    assert (train.checkpoint_dir(moved, "sft") / "checkpoint-3").exists()


def test_a_local_source_is_identified_by_its_content(tmp_path):
    a, b = tmp_path / "a" / "data.jsonl", tmp_path / "b" / "data.jsonl"
    for path in (a, b):
        path.parent.mkdir()
        path.write_text('{"x": 1}\n')
    assert source_id(str(a)) == source_id(str(b))  # a copy is the same source
    b.write_text('{"x": 2}\n')  # edited in place: hashed again
    assert source_id(str(a)) != source_id(str(b))
    assert source_id("mlabonne/FineTome-100k") == "mlabonne/FineTome-100k"  # a hub id is its own identity


def test_unknown_stage_is_refused(tmp_profile):
    with pytest.raises(ValueError, match="stage must be one of sft, dpo, reward, rl, not 'ppo'"):
        stage_key(tmp_profile, "ppo")


# --- checkpoints ------------------------------------------------------------------------------------------


class RecordingTrainer:
    """Stands in for a Trainer: remembers which checkpoint `train` was asked to resume from."""

    def __init__(self, output_dir: Path):
        one_process = SimpleNamespace(main_process_first=lambda desc: contextlib.nullcontext())
        self.args, self.model = SimpleNamespace(output_dir=str(output_dir), **vars(one_process)), None
        self.resumed_from = "never called"

    def train(self, resume_from_checkpoint=None):
        self.resumed_from = resume_from_checkpoint


def test_resume_takes_the_last_checkpoint_marked_complete(tmp_profile, tmp_path):
    folder = tmp_path / "checkpoints"
    checkpoints.discard_stale_checkpoints(folder, tmp_profile, "sft")  # as the interrupted run did
    for step, complete in ((3, True), (6, True), (9, False), (12, False)):
        (folder / f"checkpoint-{step}").mkdir()
        if complete:
            (folder / f"checkpoint-{step}" / checkpoints.CHECKPOINT_DONE).write_text(str(step))
    assert [p.name for p in checkpoints.complete_checkpoints(folder)] == ["checkpoint-3", "checkpoint-6"]
    trainer = RecordingTrainer(folder)
    train.run_training(trainer, tmp_profile, "sft")
    assert trainer.resumed_from == str(folder / "checkpoint-6")
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-3", "checkpoint-6", KEY_FILE]  # half-written: gone
    train.run_training(trainer, tmp_profile, "sft", resume=False)
    assert trainer.resumed_from is None


def test_checkpoints_of_other_settings_are_discarded(tmp_profile, tmp_path):
    folder = tmp_path / "checkpoints"
    checkpoints.discard_stale_checkpoints(folder, tmp_profile, "dpo")
    (folder / "checkpoint-3").mkdir()
    checkpoints.discard_stale_checkpoints(folder, CHANGES["evaluation settings"][0](tmp_profile), "dpo")
    assert (folder / "checkpoint-3").exists()
    checkpoints.discard_stale_checkpoints(folder, CHANGES["DPO beta"][0](tmp_profile), "dpo")  # would mix two runs
    assert not (folder / "checkpoint-3").exists()


def test_a_crash_during_save_leaves_the_previous_adapter(tmp_profile, monkeypatch):
    from helpers.model import load_adapter, load_base, load_for_training

    profile = tmp_profile
    model, tokenizer = load_for_training(profile, profile.sft.max_length)
    target = profile.sft_adapter_dir
    save_adapter(model, tokenizer, target, profile, "sft")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    with torch.no_grad():  # a different adapter, so a half-done overwrite would show
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tokenizer, target, profile, "sft")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert is_current(target, profile, "sft")
    base, _ = load_base(profile, profile.sft.max_length)
    loaded = load_adapter(base, target, trainable=False)
    assert "default" in loaded.peft_config
