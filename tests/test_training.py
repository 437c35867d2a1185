"""SFT trains on assistant tokens only; DPO starts from the SFT model as reference; both backends train on CPU."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from datasets import Dataset

from helpers import checks, pipeline, train
from helpers.checkpoints import is_current
from helpers.config import smoke_profile
from helpers.evaluate import implicit_rewards
from helpers.metrics import read_metrics
from helpers.model import load_for_training


def few_steps(profile, stage: str, steps: int):
    """The profile with `stage` cut to `steps` steps: enough to move the weights, quick on a CPU."""
    settings = replace(getattr(profile, stage), max_steps=steps, logging_steps=2, save_steps=1000)
    return replace(profile, **{stage: settings})


def test_sft_loss_sees_exactly_the_assistant_turns(tmp_profile):
    model, tokenizer = load_for_training(tmp_profile, tmp_profile.sft.max_length)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "Answer: 4."},
        {"role": "user", "content": "Add 1 and 3."},
        {"role": "assistant", "content": "Let me think. So the answer is 4."},
    ]
    trainer = train.make_sft_trainer(tmp_profile, model, tokenizer, Dataset.from_list([{"messages": messages}]))
    spans = train.loss_token_spans(trainer.train_dataset[0], tokenizer)
    assert spans == ["Answer: 4.<|eot_id|>", "Let me think. So the answer is 4.<|eot_id|>"]


@pytest.fixture
def with_sft_adapter(tmp_profile, session_outputs):
    """A profile with 6 DPO steps whose SFT adapter exists: the notebooks' (copied from this session's outputs:
    a stage key does not depend on the folder), or else one of 20 steps, trained here by `build_dpo`."""
    session = session_outputs / tmp_profile.name / "sft-adapter"
    if is_current(session, tmp_profile, "sft"):
        shutil.copytree(session, tmp_profile.sft_adapter_dir)
        return few_steps(tmp_profile, "dpo", 6)
    return few_steps(few_steps(tmp_profile, "sft", 20), "dpo", 6)


@pytest.mark.slow
def test_dpo_reference_is_the_sft_model(with_sft_adapter):
    stage = pipeline.build_dpo(with_sft_adapter)
    assert set(stage.model.peft_config) == {"default", "ref"}
    assert pipeline.measure_dpo_start(stage)["step0_reward_abs_max"] == 0.0  # exactly, not approximately
    pairs = stage.data.eval.select(range(16))
    # …and the reference is the SFT model, not the base: the SFT adapter changed the log-probs.
    sft_vs_base, _ = implicit_rewards(stage.model, stage.tokenizer, pairs, 1.0, "ref", None)
    assert sft_vs_base.abs().max() > 1.0
    pipeline.train_and_save(stage, resume=False)
    chosen, rejected = implicit_rewards(stage.model, stage.tokenizer, pairs, stage.profile.dpo.beta, "default", "ref")
    assert (chosen - rejected).mean() > 0  # a few steps already move the rewards the right way
    assert is_current(stage.adapter_dir, stage.profile, "dpo")


@pytest.mark.slow
def test_precomputed_reference_is_scored_sorted_by_length_and_stays_with_its_pairs(with_sft_adapter):
    """The sorted pass (`group_by_length`) returns the pairs by length, each with the reference log-probs TRL's own
    pass in stored order gives it: a pair never gets another pair's numbers. Grouped or not, the pass shares its
    pairs between processes (without that, TRL's pass fails under `accelerate launch`)."""
    # One pair a batch: no padding, so both passes compute exactly the same numbers for a pair.
    precompute = replace(with_sft_adapter.dpo, precompute_ref_log_probs=True, per_device_train_batch_size=1)
    scored = {}
    for grouped in (True, False):
        profile = replace(with_sft_adapter, dpo=replace(precompute, group_by_length=grouped))
        # Both ways, the pass reads its pairs from one folder every process shares (`share_between_processes`).
        shared = Path(f"{train.checkpoint_dir(profile, 'dpo')}-reference") / "train"
        shutil.rmtree(shared.parent, ignore_errors=True)
        rows = pipeline.build_dpo(profile).trainer.train_dataset
        assert any(shared.glob("pairs-*.arrow")), f"grouped={grouped}: the reference pass did not share its pairs"
        if grouped:
            lengths = train.pair_lengths(rows)
            assert lengths == sorted(lengths) and len(set(lengths)) > 1
        pairs = zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"], strict=True)
        keys = [tuple(p + c + r) for p, c, r in pairs]
        logps = zip(rows["ref_chosen_logps"], rows["ref_rejected_logps"], strict=True)
        scored[grouped] = dict(zip(keys, logps, strict=True))
    assert scored[True] == scored[False]
    assert len(set(scored[True].values())) > 1


def test_length_bucket_sampler_groups_lengths_and_shuffles_batches():
    lengths = [5, 50, 6, 51, 7, 52, 8, 53]
    sampler = train.LengthBucketSampler(lengths, batch_size=2, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(8))
    batches = [order[i : i + 2] for i in range(0, 8, 2)]
    assert all(abs(lengths[a] - lengths[b]) <= 1 for a, b in batches)
    epochs = set()
    for epoch in range(5):
        sampler.set_epoch(epoch)
        epochs.add(tuple(sampler))
    assert len(epochs) > 1  # the batch order changes from epoch to epoch


def test_common_args_come_from_the_stage_settings(tmp_profile):
    args = train.common_args(tmp_profile, "dpo")
    s = tmp_profile.dpo
    assert (args["learning_rate"], args["per_device_train_batch_size"], args["max_steps"]) == (
        s.learning_rate,
        s.per_device_train_batch_size,
        s.max_steps,
    )
    assert args["seed"] == args["data_seed"] == tmp_profile.seed
    assert args["output_dir"] == str(train.checkpoint_dir(tmp_profile, "dpo"))
    assert args["optim"] == "adamw_torch" and not args["bf16"]  # on a CPU
    assert args["report_to"] == []  # W&B disabled in the tests


UNSLOTH_SCRIPT = textwrap.dedent(
    """
    import json, warnings
    warnings.filterwarnings("error", ".*an autograd kernel was not registered", UserWarning)  # as pyproject's
    from helpers import pipeline
    from helpers.environment import load_profile
    p = load_profile()
    pipeline.prepare(p)
    sft, dpo = pipeline.run_sft(p), pipeline.run_dpo(p)
    print("RESULT", json.dumps({"sft": sft, "dpo": dpo, "backend": p.backend}))
    """
)


@pytest.mark.slow
def test_unsloth_backend_trains_sft_and_dpo_on_cpu(smoke_world, smoke_seed, tmp_path):
    settings = tmp_path / "settings.json"
    few_steps = {"max_steps": 4, "logging_steps": 1, "save_steps": 1000}
    settings.write_text(json.dumps({"sft": few_steps, "dpo": few_steps | {"max_steps": 3}}))
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
    assert result["dpo"]["step0_reward_abs_max"] == 0.0
    assert result["backend"] == "unsloth" and "Unsloth (CPU)" in done.stdout + done.stderr
    assert (tmp_path / "smoke" / "dpo-adapter" / "adapter_model.safetensors").exists()


def test_the_notebooks_run_meets_the_profile_expectations(session_outputs, smoke_seed):
    """The issue-2 criteria (SFT loss, DPO reward accuracy, step-0 rewards, better-answer rates, judge, splits) on
    the run this session's notebooks made, with the session's seed: CI sets one the recipe was not tuned on."""
    profile = replace(smoke_profile(smoke_seed, "hf"), outputs_root=str(session_outputs))
    metrics = read_metrics(profile)
    if "eval" not in metrics:
        pytest.skip("the notebooks did not run in this session (they run first in `make test`)")
    assert metrics["seed"] == smoke_seed
    evaluation = metrics["eval"]
    failures = checks.sft_failures(profile, metrics["sft"]) + checks.dpo_failures(profile, metrics["dpo"])
    failures += checks.eval_failures(profile, evaluation) + checks.reward_model_failures(profile, evaluation)
    failures += checks.split_failures(metrics["splits"])
    assert not failures, failures


def test_the_notebook_training_table_keeps_its_last_rows():
    from types import SimpleNamespace

    from helpers.callbacks import ShortTrainingTable

    table = ShortTrainingTable(rows=3)
    table.training_tracker = SimpleNamespace(inner_table=[["Step", "Loss"], [1, 0.9], [2, 0.8], [3, 0.7], [4, 0.6]])
    table._trim()
    assert table.training_tracker.inner_table == [["Step", "Loss"], [3, 0.7], [4, 0.6]]  # and the next one: 3 rows
