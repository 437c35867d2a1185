"""helpers.training: stage keys hold exactly what determines a stage's result; checkpoints resume only under the same
key and end with the uninterrupted run's adapter; a save is all or nothing; training stops with a clear message
instead of saving a broken adapter; SFT trains on assistant tokens only; DPO's reference, as TRL itself sees it, is the
SFT model; shared files are written by one process; and (slow) SFT then DPO train data-parallel under `accelerate
launch` with 2 CPU processes talking through gloo."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

from helpers import data, evaluation, fixes, generation, model, training
from helpers.settings import (
    PROJECT_ROOT,
    Profile,
    dpo_config,
    full_profile,
    load_profile,
    sft_config,
    smoke_profile,
)
from helpers.training import (
    CHECKPOINT_DONE,
    KEY_FILE,
    STAGES,
    NonFiniteLossError,
    complete_checkpoints,
    is_current,
    key_text,
    source_id,
    stage_key,
)

# --- stage keys -------------------------------------------------------------------------------------------------


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
    """SFT and DPO adapter folders holding only their stage keys, as `save_result` writes them."""
    for stage in ("sft", "dpo"):
        key = key_text(stage_key(profile, stage))
        training.save_atomically(profile.adapter_dir(stage), lambda f, k=key: (f / KEY_FILE).write_text(k))


def test_a_saved_adapter_is_current_until_what_determines_it_changes(tmp_profile):
    save_stub_adapters(tmp_profile)
    assert (tmp_profile.adapter_dir("sft") / KEY_FILE).exists()
    for apply, expected in CHANGES.values():
        changed = replace(apply(tmp_profile), outputs_root=tmp_profile.outputs_root)  # the same folder, read again
        current = {s for s in ("sft", "dpo") if is_current(changed, s)}
        assert current == {"sft", "dpo"} - expected


def test_a_copied_outputs_folder_is_reused_as_is(tmp_profile, tmp_path, monkeypatch):
    save_stub_adapters(tmp_profile)
    train_dir = tmp_profile.checkpoint_dir("sft")
    training.discard_stale_checkpoints(train_dir, stage_key(tmp_profile, "sft"))
    (train_dir / "checkpoint-3").mkdir()
    moved = replace(tmp_profile, outputs_root=str(tmp_path / "moved"))
    shutil.copytree(tmp_profile.output_dir, moved.output_dir)

    assert is_current(moved, "sft") and is_current(moved, "dpo")
    monkeypatch.setattr(training, "run", lambda *args: pytest.fail("a current stage was trained again"))
    training.ensure(moved, "dpo")
    training.discard_stale_checkpoints(moved.checkpoint_dir("sft"), stage_key(moved, "sft"))
    assert (moved.checkpoint_dir("sft") / "checkpoint-3").exists()


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


def test_toy_reward_model_is_for_the_smoke_profile_only(tmp_path):
    profile = replace(full_profile(), outputs_root=str(tmp_path))  # judges with a published reward model
    with pytest.raises(ValueError, match="toy reward model is for the smoke profile's tiny base only"):
        training.build_reward(profile)
    assert not profile.output_dir.exists()  # refused before loading or writing anything


# --- checkpoints and saves ----------------------------------------------------------------------------------------


class FakeTrainer:
    """Stands in for a Trainer in `Stage` and `train_and_save`: remembers which checkpoint `train` was asked to resume
    from, or raises `error` there."""

    def __init__(self, output_dir: Path, error: BaseException | None = None, **args):
        one_process = contextlib.nullcontext
        self.args = SimpleNamespace(output_dir=str(output_dir), main_process_first=lambda desc: one_process(), **args)
        self.model = SimpleNamespace(load_adapter=lambda *a, **k: None)
        self.callback_handler = SimpleNamespace(callbacks=[])
        self.error, self.resumed_from = error, "never called"

    def pop_callback(self, callback):
        return None

    def add_callback(self, callback):
        self.callback_handler.callbacks.append(callback)

    def train(self, resume_from_checkpoint=None):
        if self.error:
            raise self.error
        self.resumed_from = resume_from_checkpoint


def test_resume_takes_the_last_checkpoint_marked_complete(tmp_profile, tmp_path):
    folder = tmp_path / "checkpoints"
    training.discard_stale_checkpoints(folder, stage_key(tmp_profile, "sft"))  # as the interrupted run did
    for step, complete in ((3, True), (6, True), (9, False), (12, False)):
        (folder / f"checkpoint-{step}").mkdir()
        if complete:
            (folder / f"checkpoint-{step}" / CHECKPOINT_DONE).write_text(str(step))
    assert [p.name for p in complete_checkpoints(folder)] == ["checkpoint-3", "checkpoint-6"]
    trainer = FakeTrainer(folder)
    stage = training.Stage(tmp_profile, "sft", trainer, save=False)
    training.train_and_save(stage)
    assert trainer.resumed_from == str(folder / "checkpoint-6")
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-3", "checkpoint-6", KEY_FILE]  # half-written: gone
    training.train_and_save(stage, resume=False)
    assert trainer.resumed_from is None


def test_checkpoints_of_other_settings_are_discarded(tmp_profile, tmp_path):
    folder = tmp_path / "checkpoints"
    training.discard_stale_checkpoints(folder, stage_key(tmp_profile, "dpo"))
    (folder / "checkpoint-3").mkdir()
    training.discard_stale_checkpoints(folder, stage_key(CHANGES["evaluation settings"][0](tmp_profile), "dpo"))
    assert (folder / "checkpoint-3").exists()
    training.discard_stale_checkpoints(folder, stage_key(CHANGES["DPO beta"][0](tmp_profile), "dpo"))  # would mix runs
    assert not (folder / "checkpoint-3").exists()


def test_a_crash_during_save_leaves_the_previous_adapter(tmp_profile, monkeypatch):
    profile = tmp_profile
    policy, tokenizer = model.load_for_training(profile, profile.sft.max_length)
    target, key = profile.adapter_dir("sft"), stage_key(profile, "sft")
    training.save_result(policy, tokenizer, target, key)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    with torch.no_grad():  # a different adapter, so a half-done overwrite would show
        next(p for n, p in policy.named_parameters() if "lora_B" in n).add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        training.save_result(policy, tokenizer, target, key)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert is_current(profile, "sft")
    base, _ = model.load_base(profile, profile.sft.max_length)
    loaded = model.load_adapter(base, target, trainable=False)
    assert "default" in loaded.peft_config


# --- stops with a clear message -----------------------------------------------------------------------------------


def test_out_of_memory_names_the_settings_to_lower(tmp_profile, tmp_path):
    trainer = FakeTrainer(
        tmp_path,
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.91 GiB"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_length=2048,
    )
    with pytest.raises(RuntimeError) as error:
        training.train_and_save(training.Stage(tmp_profile, "sft", trainer))
    assert type(error.value) is RuntimeError  # not the bare OutOfMemoryError (a RuntimeError subclass)
    assert isinstance(error.value.__cause__, torch.OutOfMemoryError)
    settings = ("per_device_train_batch_size (now 8)", "gradient_accumulation_steps (now 2)", "max_length (now 2048)")
    assert all(setting in str(error.value) for setting in settings), str(error.value)
    assert not tmp_profile.adapter_dir("sft").exists()


def test_no_logged_loss_says_how_to_log_one():
    assert training.losses([{"loss": 2.0, "step": 1}, {"eval_loss": 1.0, "step": 1}]) == [2.0]
    with pytest.raises(RuntimeError, match="No loss was logged in 3 steps: set logging_steps to at most max_steps"):
        training.losses([{"step": 3, "train_runtime": 1.0}])


def test_failures_name_what_a_stage_did_not_show(tmp_profile):
    assert training.sft_failures(tmp_profile, {"loss_first": 2.0, "loss_last": 0.5}) == []
    assert training.sft_failures(tmp_profile, {"loss_first": 2.0, "loss_last": 1.5}) == [
        "SFT loss 2.000 → 1.500: not below 0.5 × the first"
    ]
    assert "did not fall" in training.sft_failures(tmp_profile, {"loss_first": 2.0, "loss_last": 2.5})[0]
    good = {
        "step0_rewards": {"chosen": 0.0, "rejected": 0.0, "margins": 0.0},
        "reward_accuracy_before": 0.0,
        "reward_accuracy_after": 0.95,
    }
    assert training.dpo_failures(tmp_profile, good) == []
    bad = good | {"step0_rewards": {"chosen": 0.0, "rejected": 1e-7, "margins": -1e-7}, "reward_accuracy_after": 0.5}
    found = training.dpo_failures(tmp_profile, bad)
    assert found[:2] == [
        "eval_rewards/rejected is 1e-07 before the first step, not exactly 0",
        "eval_rewards/margins is -1e-07 before the first step, not exactly 0",
    ]
    assert found[2] == "DPO held-out reward accuracy 0.500 < 0.9" and len(found) == 3
    with pytest.raises(AssertionError, match="eval_rewards/rejected is 1e-07 .*; eval_rewards/margins"):
        training.require(found)
    training.require([])


class PoisonWeights(TrainerCallback):
    """Writes a NaN into one LoRA weight at the end of step `step`, as a diverging update would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for name, p in model.named_parameters() if "lora_A" in name).view(-1)[0] = float("nan")


def poisoned_sft(profile: Profile, max_steps: int, step: int) -> training.Stage:
    """SFT on 64 rows for `max_steps` steps, a log every 2 steps, a checkpoint only at the end, a NaN weight after
    `step`."""
    sft = replace(profile.sft, max_steps=max_steps, logging_steps=2, save_steps=1000)
    stage = training.build_sft(replace(profile, data=replace(profile.data, max_sft_rows=64), sft=sft))
    stage.trainer.add_callback(PoisonWeights(step))
    return stage


@pytest.mark.slow
def test_a_nan_loss_stops_training_naming_the_step(tmp_profile):
    stage = poisoned_sft(tmp_profile, max_steps=8, step=3)  # step 4 computes a NaN loss; step 4 is logged
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4: training stopped") as error:
        training.train_and_save(stage)
    assert f"learning rate too high (now {stage.profile.sft.learning_rate:g})" in str(error.value)
    assert not stage.profile.adapter_dir("sft").exists()


@pytest.mark.slow
def test_a_nan_after_the_last_log_never_reaches_a_checkpoint_or_the_adapter(tmp_profile):
    stage = poisoned_sft(tmp_profile, max_steps=5, step=5)  # the last step: no log follows, only the last checkpoint
    with pytest.raises(NonFiniteLossError, match=r"weight .*lora_A.* is not finite at step 5"):
        training.train_and_save(stage)
    assert not stage.profile.adapter_dir("sft").exists()
    checkpoints = stage.profile.checkpoint_dir("sft")
    assert (checkpoints / "checkpoint-5").exists() and not complete_checkpoints(checkpoints)


# --- callbacks ----------------------------------------------------------------------------------------------------


def test_the_notebook_training_table_keeps_its_last_rows():
    table = training.ShortTrainingTable()
    table.rows = 3
    table.training_tracker = SimpleNamespace(inner_table=[["Step", "Loss"], [1, 0.9], [2, 0.8], [3, 0.7], [4, 0.6]])
    table._trim()
    assert table.training_tracker.inner_table == [["Step", "Loss"], [3, 0.7], [4, 0.6]]  # and the next one: 3 rows


def test_log_readings_reset_the_gpu_peak_when_training_begins(monkeypatch):
    resets = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: resets.append(a))
    training.LogReadings().on_train_begin(None, None, None)
    assert resets == [()]


def test_log_readings_add_memory_and_the_median_step_time_to_each_log():
    readings = training.LogReadings()
    readings.seconds = [0.5, 0.1, 0.3]
    logs = {"loss": 1.0}
    state = SimpleNamespace(log_history=[dict(logs)])
    readings.on_log(None, state, None, logs=logs)
    assert logs["step_seconds"] == 0.3 and logs["memory/cpu_rss_gib"] > 0
    assert state.log_history[-1] == logs and readings.seconds == []  # the history (and W&B) get them too


# --- data-parallel: one process writes the shared files ------------------------------------------------------------


def test_only_the_main_process_writes_shared_files(tmp_profile, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for module in (data, training):
        monkeypatch.setattr(module, "PartialState", lambda: SimpleNamespace(is_main_process=False))
    assert training.update_metrics(tmp_profile, sft={"steps": 3})["sft"] == {"steps": 3}
    path = data.write_split(tmp_profile, "sft-train", [{"messages": []}])
    assert training.start_run(tmp_profile, "sft") is None
    metrics = tmp_profile.output_dir / "metrics.json"
    assert not metrics.exists() and not path.exists()
    monkeypatch.setattr(training, "PartialState", lambda: SimpleNamespace(is_main_process=True))
    training.update_metrics(tmp_profile, sft={"steps": 3})
    assert json.loads(metrics.read_text())["sft"] == {"steps": 3}


def test_metrics_sections_merge_one_level_deep(tmp_profile):
    training.update_metrics(tmp_profile, eval={"sft": {"rate": 0.5}}, note="first")
    merged = training.update_metrics(tmp_profile, eval={"dpo": {"rate": 0.9}}, note="second")
    assert merged["eval"] == {"sft": {"rate": 0.5}, "dpo": {"rate": 0.9}} and merged["note"] == "second"
    assert training.read_metrics(tmp_profile) == merged and merged["seed"] == tmp_profile.seed


# --- SFT: the loss on the assistant's tokens only -----------------------------------------------------------------


def test_sft_loss_sees_exactly_the_assistant_turns(tmp_profile):
    from trl import SFTTrainer

    policy, tokenizer = model.load_for_training(tmp_profile, tmp_profile.sft.max_length)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "Answer: 4."},
        {"role": "user", "content": "Add 1 and 3."},
        {"role": "assistant", "content": "Let me think. So the answer is 4."},
    ]
    rows = Dataset.from_list([{"messages": messages}])
    trainer = SFTTrainer(
        model=policy,
        args=sft_config(tmp_profile),
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=tokenizer,
    )
    spans = data.loss_token_spans(trainer.train_dataset[0], tokenizer)
    assert spans == ["Answer: 4.<|eot_id|>", "Let me think. So the answer is 4.<|eot_id|>"]


# --- DPO: the reference, as TRL itself sees it, is the SFT model ----------------------------------------------------


def dpo_trainer(sft_like_policy, profile: Profile, precompute: bool) -> training.ProjectDPOTrainer:
    """`ProjectDPOTrainer` as notebook 04 builds it, on an SFT-like adapter, with 8 held-out smoke pairs to train and
    evaluate on."""
    profile = replace(profile, dpo=replace(profile.dpo, precompute_ref_log_probs=precompute))
    fixes.install_cpu_logprob_fallback()  # a `Stage` would (TRL's evaluation needs it without Triton)
    policy, tokenizer = sft_like_policy(profile)
    pairs = data.preference_data(profile, tokenizer).eval.select(range(8))
    return training.ProjectDPOTrainer(
        model=policy,
        ref_model=None,
        args=dpo_config(profile),
        train_dataset=pairs,
        eval_dataset=pairs,
        processing_class=tokenizer,
    )


STEP0_KEYS = ("eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins", "eval_rewards/accuracies")


@pytest.mark.parametrize("precompute", [True, False], ids=["precomputed", "in-step"])
def test_trls_own_step0_evaluation_sees_the_sft_model_as_reference(tmp_profile, sft_like_policy, precompute):
    """TRL's `evaluate()` before the first step: every implicit reward is exactly 0 (the reference is the SFT
    adapter, token rows and dtypes included), so no pair is ranked right yet. Smoke precomputes the reference; the GPU
    profiles score it in each step."""
    assert tmp_profile.dpo.precompute_ref_log_probs  # the smoke profile's setting, the one the bug was found in
    trainer = dpo_trainer(sft_like_policy, tmp_profile, precompute)
    assert set(trainer.model.peft_config) == {"default", "ref"}
    start = trainer.evaluate()
    assert {k: start[k] for k in STEP0_KEYS} == dict.fromkeys(STEP0_KEYS, 0.0)
    assert training.dpo_start_failures(start) == []


def test_without_the_fix_trls_step0_rewards_are_not_zero_and_the_check_names_them(
    tmp_profile, sft_like_policy, monkeypatch
):
    """The old code path: TRL's copy of the policy into "ref" skips the chat-token rows, and the precomputed
    reference is the base model's rows under the SFT adapter."""
    monkeypatch.setattr(fixes, "complete_reference_adapter", lambda model: 0)
    start = dpo_trainer(sft_like_policy, tmp_profile, precompute=True).evaluate()
    assert start["eval_rewards/margins"] != 0.0
    failures = training.dpo_start_failures(start)
    named = [k for k in STEP0_KEYS if start[k] != 0.0]
    assert "eval_rewards/margins" in named and len(failures) == len(named)
    assert all(f.startswith(f"{k} is {start[k]:g} before the first step") for f, k in zip(failures, named, strict=True))


def test_dpo_batches_pairs_grouped_by_length_reshuffled_each_epoch(tmp_profile, sft_like_policy):
    trainer = dpo_trainer(sft_like_policy, tmp_profile, precompute=False)
    assert tmp_profile.dpo.train_sampling_strategy == "group_by_length"
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, training.EpochSeededLengthGroupedSampler) and sampler.seed == tmp_profile.seed
    rows = trainer.train_dataset
    pairs = zip(*(rows[k] for k in training.PAIR_COLUMNS), strict=True)
    assert sampler.lengths == [len(p) + max(len(c), len(r)) for p, c, r in pairs]


def test_length_grouped_batches_hold_similar_lengths_and_follow_the_epoch():
    lengths = [(i * 37) % 400 + 5 for i in range(400)]  # 400 different lengths, shuffled
    sampler = training.EpochSeededLengthGroupedSampler(batch_size=2, lengths=lengths, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(400))
    batches = [order[i : i + 2] for i in range(0, 400, 2)]
    assert sum(abs(lengths[a] - lengths[b]) for a, b in batches) / len(batches) < 10  # random pairs: about 133
    assert list(training.EpochSeededLengthGroupedSampler(2, lengths, seed=0)) == order  # a resumed run: same batches
    epochs = set()
    for epoch in range(5):
        sampler.set_epoch(epoch)
        epochs.add(tuple(sampler))
    assert len(epochs) == 5  # the batch order changes from epoch to epoch


@pytest.fixture
def with_sft_adapter(tmp_profile, session_outputs):
    """A profile with 6 DPO steps whose SFT adapter exists: the notebooks' (copied from this session's outputs:
    a stage key does not depend on the folder), or else one of 20 steps, trained here by `build_dpo`."""
    session = replace(tmp_profile, outputs_root=str(session_outputs))
    if is_current(session, "sft"):
        shutil.copytree(session.adapter_dir("sft"), tmp_profile.adapter_dir("sft"))
        return few_steps(tmp_profile, "dpo", 6)
    return few_steps(few_steps(tmp_profile, "sft", 20), "dpo", 6)


def few_steps(profile: Profile, stage: str, steps: int) -> Profile:
    """The profile with `stage` cut to `steps` steps: enough to move the weights, quick on a CPU."""
    settings = replace(getattr(profile, stage), max_steps=steps, logging_steps=2, save_steps=1000)
    return replace(profile, **{stage: settings})


def margins(stage: training.Stage, pairs, policy: str | None, reference: str | None) -> torch.Tensor:
    """Per pair, the log-ratio margin of `policy` against `reference` (chosen's log-ratio minus rejected's)."""
    prompts = list(pairs["prompt"])
    chosen, rejected = ([row[-1]["content"] for row in pairs[k]] for k in ("chosen", "rejected"))
    ratios = [
        generation.log_ratios(stage.model, stage.tokenizer, prompts, a, policy, reference) for a in (chosen, rejected)
    ]
    return ratios[0] - ratios[1]


@pytest.mark.slow
def test_dpo_reference_is_the_sft_model(with_sft_adapter):
    stage = training.build_dpo(with_sft_adapter)
    assert set(stage.model.peft_config) == {"default", "ref"}
    assert training.dpo_start_failures(training.measure_dpo_start(stage)) == []  # exactly 0, not approximately
    pairs = stage.data.eval.select(range(16))
    # …and the reference is the SFT model, not the base: the SFT adapter changed the log-probs.
    sft_vs_base = generation.log_ratios(
        stage.model, stage.tokenizer, list(pairs["prompt"]), [r[-1]["content"] for r in pairs["chosen"]], "ref", None
    )
    assert sft_vs_base.abs().max() > 1.0
    training.train_and_save(stage, resume=False)
    assert margins(stage, pairs, "default", "ref").mean() > 0  # a few steps already move the rewards the right way
    assert is_current(stage.profile, "dpo")
    result = training.record_dpo(stage)
    assert result["step0_rewards"] == {"chosen": 0.0, "rejected": 0.0, "margins": 0.0}
    assert training.read_metrics(stage.profile)["dpo"] == result and result["steps"] == 6


@pytest.mark.slow
def test_precomputed_reference_stays_with_its_pairs_and_is_shared_between_processes(with_sft_adapter):
    """Grouped by length or not, the reference pass gives each pair the same log-probs, and reads its pairs from one
    folder every process shares (`fixes.share_between_processes`: without it, TRL's pass fails under `accelerate
    launch`)."""
    # One pair a batch: no padding, so both passes compute exactly the same numbers for a pair.
    precompute = replace(with_sft_adapter.dpo, precompute_ref_log_probs=True, per_device_train_batch_size=1)
    scored = {}
    for strategy in ("group_by_length", "random"):
        profile = replace(with_sft_adapter, dpo=replace(precompute, train_sampling_strategy=strategy))
        shared = Path(f"{profile.checkpoint_dir('dpo')}-reference") / "train"
        shutil.rmtree(shared.parent, ignore_errors=True)
        rows = training.build_dpo(profile).trainer.train_dataset
        assert any(shared.glob("pairs-*.arrow")), f"{strategy}: the reference pass did not share its pairs"
        pairs = zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], strict=True)
        keys = [tuple(p + c + r) for p, c, r in pairs]
        logps = zip(rows["ref_chosen_logps"], rows["ref_rejected_logps"], strict=True)
        scored[strategy] = dict(zip(keys, logps, strict=True))
    assert scored["group_by_length"] == scored["random"]
    assert len(set(scored["random"].values())) > 1


def test_the_notebooks_run_meets_the_profile_expectations(session_outputs, smoke_seed):
    """The learning criteria (SFT loss, DPO reward accuracy, step-0 rewards, better-answer rates, judge, splits) on
    the run this session's notebooks made, with the session's seed: CI sets one the recipe was not tuned on."""
    profile = replace(smoke_profile(smoke_seed, "hf"), outputs_root=str(session_outputs))
    metrics = training.read_metrics(profile)
    if "eval" not in metrics:
        pytest.skip("the notebooks did not run in this session (they run first in `make test`)")
    assert metrics["seed"] == smoke_seed
    failures = training.sft_failures(profile, metrics["sft"]) + training.dpo_failures(profile, metrics["dpo"])
    failures += evaluation.eval_failures(profile, metrics["eval"]) + data.overlap_failures(metrics["splits"])
    assert not failures, failures


# --- interrupted training resumes to the uninterrupted run's adapter (slow) ----------------------------------------

# On a CPU with a fixed seed every step is the same sequence of float operations, so a resumed run should be
# bit for bit the uninterrupted one. Measured: identical (max |difference| 0.0), so the tolerance is 0: any
# difference means some state was not restored. Three bugs showed this way before they were fixed: LoRA weights
# initialised from an unseeded generator (0.2), resume up-casting the bf16 adapter to fp32 (1 bf16 ulp), and
# DPO resuming its policy from the SFT weights instead of the checkpoint (0.004, rewards visibly lower).
ATOL = 0.0
KILL_TIMEOUT_S = 300
TESTS_DIR = Path(__file__).parent
COST_KEYS = ("train_seconds", "seconds_per_step", "peak_memory_gib", "estimate_seconds")  # differ between runs
CHILD = textwrap.dedent(
    """
    import sys, time, warnings
    from pathlib import Path

    sys.path.insert(0, sys.argv[1])
    warnings.filterwarnings("error", ".*an autograd kernel was not registered", UserWarning)  # as pyproject's
    from test_training import short_profile
    from helpers import training

    # Pause after each checkpoint is marked complete, so the signal lands mid-run however fast the machine is (12
    # steps take under a second on an idle CPU: the run could end before the parent's signal arrives).
    mark = training.CheckpointGuard.on_save
    training.CheckpointGuard.on_save = lambda self, *a, **k: (mark(self, *a, **k), time.sleep(5))
    training.run(short_profile(Path(sys.argv[2])), sys.argv[3])
    """
)


def short_profile(outputs: Path) -> Profile:
    """The smoke profile of the session's seed cut short, a checkpoint every 3 steps: SFT 12 steps (batch 16 from
    96 rows), DPO 10 steps (batch 8 from 48 rows)."""
    profile = smoke_profile(int(os.environ.get("TUTORIAL_SEED", 42)), "hf")
    rows = replace(profile.data, max_sft_rows=96, max_preference_rows=48)
    sft = replace(profile.sft, max_steps=12, save_steps=3, logging_steps=1)
    dpo = replace(profile.dpo, max_steps=10, save_steps=3, logging_steps=1)
    return replace(profile, outputs_root=str(outputs), data=rows, sft=sft, dpo=dpo)


def adapter_weights(profile: Profile, stage: str) -> dict[str, torch.Tensor]:
    return load_file(profile.adapter_dir(stage) / "adapter_model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in b.items()}
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def uninterrupted(smoke_world, tmp_path_factory) -> Profile:
    """A profile whose SFT adapter was trained without interruption."""
    profile = short_profile(tmp_path_factory.mktemp("uninterrupted"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("WANDB_MODE", "disabled")
        assert training.run(profile, "sft")["steps"] == 12
    return profile


def interrupt_at_first_checkpoint(profile: Profile, stage: str, sig: signal.Signals) -> subprocess.CompletedProcess:
    """Run `stage` ('sft' or 'dpo') in a subprocess and send it `sig` once a checkpoint is marked complete."""
    env = os.environ | {"WANDB_MODE": "disabled"}
    args = [sys.executable, "-c", CHILD, str(TESTS_DIR), profile.outputs_root, stage]
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = profile.checkpoint_dir(stage)
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
    assert not profile.adapter_dir(stage).exists()
    checkpoints = profile.checkpoint_dir(stage)
    assert complete_checkpoints(checkpoints), f"no checkpoint was completed:\n{killed.stdout[-2000:]}"
    last_complete = complete_checkpoints(checkpoints)[-1]
    # A checkpoint a crash left half-written (no completion marker) must be removed, not resumed from.
    half_written = checkpoints / "checkpoint-11"
    half_written.mkdir(exist_ok=True)
    (half_written / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    capsys.readouterr()

    training.run(profile, stage)  # one call resumes
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
    expected = training.run(profile, "dpo")
    weights = adapter_weights(profile, "dpo")
    shutil.rmtree(profile.adapter_dir("dpo"))
    shutil.rmtree(profile.checkpoint_dir("dpo"))

    resumed = interrupt_and_resume(profile, "dpo", signal.SIGKILL, capsys)
    difference = max_difference(resumed, weights)
    assert difference <= ATOL, f"resumed adapter differs from the uninterrupted one by {difference:g}"
    result = {k: v for k, v in training.read_metrics(profile)["dpo"].items() if k not in COST_KEYS}
    assert result == {k: v for k, v in expected.items() if k not in COST_KEYS}  # the same rewards, too


# --- both backends, and two processes (slow) ---------------------------------------------------------------------

UNSLOTH_SCRIPT = textwrap.dedent(
    """
    import json, warnings
    warnings.filterwarnings("error", ".*an autograd kernel was not registered", UserWarning)  # as pyproject's
    from helpers import settings
    p = settings.load_profile()
    from helpers import machine, training
    machine.prepare(p)
    sft, dpo = training.run(p, "sft"), training.run(p, "dpo")
    print("RESULT", json.dumps({"sft": sft, "dpo": dpo, "backend": p.backend}))
    """
)


@pytest.mark.slow
def test_unsloth_backend_trains_sft_and_dpo_on_cpu(smoke_world, smoke_seed, tmp_path):
    settings = tmp_path / "settings.json"
    short = {"max_steps": 4, "logging_steps": 1, "save_steps": 1000}
    settings.write_text(json.dumps({"sft": short, "dpo": short | {"max_steps": 3}}))
    env = os.environ | {
        "TUTORIAL_BACKEND": "unsloth",
        "TUTORIAL_SEED": str(smoke_seed),
        "TUTORIAL_OUTPUTS": str(tmp_path),
        "TUTORIAL_SETTINGS": str(settings),
        "WANDB_MODE": "disabled",
    }
    done = subprocess.run([sys.executable, "-c", UNSLOTH_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert result["sft"]["steps"] == 4 and result["dpo"]["steps"] == 3
    assert result["dpo"]["step0_rewards"] == {"chosen": 0.0, "rejected": 0.0, "margins": 0.0}
    assert result["backend"] == "unsloth" and "Unsloth (CPU)" in done.stdout + done.stderr
    assert (tmp_path / "smoke" / "dpo-adapter" / "adapter_model.safetensors").exists()


def launch(stage: str, env: dict, processes: int = 2) -> str:
    """Run the stage: `accelerate launch` on 2 processes (no GPU: gloo), or plain `python -m` on one; return the
    output of all processes."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--main_process_port", "0", "-m", "helpers.run", "--stage", stage]
    if processes == 1:
        command = [sys.executable, "-m", "helpers.run", "--stage", stage]
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    return log


def logged_losses(profile: Profile, stage: str) -> list[float]:
    """The training losses logged in the stage's last checkpoint."""
    (checkpoint,) = complete_checkpoints(profile.checkpoint_dir(stage))
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
        assert is_current(profile, stage)
        (checkpoint,) = complete_checkpoints(profile.checkpoint_dir(stage))
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
    metrics = json.loads((profile.output_dir / "metrics.json").read_text())
    assert metrics["sft"]["steps"] == metrics["dpo"]["steps"] == 3
    assert metrics["dpo"]["step0_rewards"] == {"chosen": 0.0, "rejected": 0.0, "margins": 0.0}
    assert metrics["splits"]["eval_problems_in_training"] == 0
