"""SFT trains on assistant tokens only; DPO starts from the SFT model as reference; both backends train on CPU."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from datasets import Dataset

from helpers import pipeline, train
from helpers.model import load_for_training
from helpers.smoke import is_better_answer


def short(profile, sft_steps=20, dpo_steps=6):
    """The profile with few steps: enough to move the weights, quick on a CPU."""
    return replace(
        profile,
        sft=replace(profile.sft, max_steps=sft_steps, logging_steps=5, save_steps=1000),
        dpo=replace(profile.dpo, max_steps=dpo_steps, logging_steps=2, save_steps=1000),
    )


def test_sft_loss_sees_exactly_the_assistant_turns(tmp_profile):
    model, tokenizer = load_for_training(tmp_profile, tmp_profile.sft.max_length)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
        {"role": "user", "content": "Add 1 and 3."},
        {"role": "assistant", "content": "Let me think. So the answer is 4."},
    ]
    trainer = train.make_sft_trainer(tmp_profile, model, tokenizer, Dataset.from_list([{"messages": messages}]))
    spans = train.loss_token_spans(trainer.train_dataset[0], tokenizer)
    assert spans == ["2 + 2 = 4.<|eot_id|>", "Let me think. So the answer is 4.<|eot_id|>"]


def test_dpo_reference_is_the_sft_model(tmp_profile):
    profile = short(tmp_profile)
    pipeline.run_sft(profile)
    model, tokenizer = load_for_training(profile, profile.dpo.max_length, adapter_dir=profile.sft_adapter_dir)
    splits = pipeline.preference_splits(profile, tokenizer)
    trainer = train.make_dpo_trainer(profile, model, tokenizer, splits.train, splits.eval.select(range(16)))
    assert set(trainer.model.peft_config) == {"default", "ref"}
    chosen, rejected = pipeline.step0_rewards(trainer, tokenizer, splits.eval.select(range(16)), profile.dpo.beta)
    assert torch.count_nonzero(chosen) == torch.count_nonzero(rejected) == 0  # exactly, not approximately
    # …and the reference is the SFT model, not the base: the SFT adapter changed the log-probs.
    from helpers.evaluate import implicit_rewards

    sft_vs_base, _ = implicit_rewards(trainer.model, tokenizer, splits.eval.select(range(16)), 1.0, "ref", None)
    assert sft_vs_base.abs().max() > 1.0
    train.run_training(trainer, resume=False)
    chosen, rejected = pipeline.step0_rewards(trainer, tokenizer, splits.eval.select(range(16)), profile.dpo.beta)
    assert (chosen - rejected).mean() > 0  # a few steps already move the rewards the right way


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


UNSLOTH_SCRIPT = textwrap.dedent(
    """
    import json
    from dataclasses import replace
    from helpers.config import load_profile
    from helpers import pipeline
    p = load_profile()
    p = replace(p, sft=replace(p.sft, max_steps=4, logging_steps=1, save_steps=1000),
                dpo=replace(p.dpo, max_steps=3, logging_steps=1, save_steps=1000))
    pipeline.prepare(p)
    sft, dpo = pipeline.run_sft(p), pipeline.run_dpo(p)
    print("RESULT", json.dumps({"sft": sft, "dpo": dpo, "backend": p.backend}))
    """
)


def test_unsloth_backend_trains_sft_and_dpo_on_cpu(smoke_world, tmp_path):
    env = os.environ | {"TUTORIAL_BACKEND": "unsloth", "TUTORIAL_OUTPUTS": str(tmp_path), "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-c", UNSLOTH_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert result["sft"]["steps"] == 4 and result["dpo"]["steps"] == 3
    assert result["dpo"]["step0_reward_abs_max"] == 0.0
    assert result["backend"] == "unsloth" and "Unsloth (CPU)" in done.stdout + done.stderr
    assert (tmp_path / "smoke" / "dpo-adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_recipe_works_for_another_seed(tmp_path, monkeypatch):
    """Issue 2's done criteria, on a seed the recipe was not tuned on (the notebooks cover seed 42)."""
    from helpers.config import smoke_profile

    monkeypatch.setenv("WANDB_MODE", "disabled")
    profile = replace(smoke_profile(7, "hf"), outputs_root=str(tmp_path))
    pipeline.prepare(profile)
    sft, dpo = pipeline.run_sft(profile), pipeline.run_dpo(profile)
    evaluation = pipeline.run_eval(profile, judge=is_better_answer)
    assert sft["loss_last"] <= 0.5 * sft["loss_first"]
    assert dpo["step0_reward_abs_max"] < 1e-6
    assert dpo["reward_accuracy_after"] >= 0.9
    rates = {name: evaluation[name]["better_answer_rate"] for name in ("base", "sft", "dpo")}
    assert rates["dpo"] >= rates["sft"] + 0.3 and rates["base"] < rates["sft"], rates
    assert json.loads((tmp_path / "smoke" / "metrics.json").read_text())["eval"]["dpo"] == evaluation["dpo"]
