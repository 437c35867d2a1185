"""The RL stage: RLOO's settings are all written out, TRL scores answers exactly as `reward.score` does, the reference
is the start model, the held-out curve lands in the log history, and the checks catch a run that went wrong."""

import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

from helpers import pipeline, report, reward, rl_heldout, rl_proxy, rlhf
from helpers.chat import EOT
from helpers.checkpoints import is_current
from helpers.checks import rl_failures
from helpers.evaluate import Generations
from helpers.metrics import read_metrics, update_metrics
from helpers.model import load_for_training


def test_the_length_proxy_counts_the_same_tokens_in_training_and_held_out():
    eot = 7  # any id: TRL's completion ids end with the stop token when the answer ended by itself
    assert rl_proxy.length_reward([[1, 2, 3, eot], [1, 2, 3, 4, 5]]) == [4.0, 5.0]
    gens = Generations(texts=["a b c", "a b c d e"], num_tokens=[3, 5], stopped=[True, False])
    assert rl_proxy.LENGTH_PROXY.score([[], []], gens) == [4.0, 5.0]


def test_rloo_config_writes_out_what_unsloth_would_change(tmp_profile):
    config = rlhf.rloo_config(tmp_profile)
    s = tmp_profile.rl
    assert (config.learning_rate, config.num_generations, config.logging_steps) == (
        s.learning_rate,
        s.num_generations,
        s.logging_steps,
    )
    assert (config.weight_decay, config.warmup_steps, config.beta) == (s.weight_decay, s.warmup_steps, s.beta)
    assert config.optim == "adamw_torch" and config.report_to == []  # on a CPU, W&B disabled in the tests
    assert config.max_completion_length == s.max_completion_length and config.num_iterations == 1
    assert rlhf.rloo_config(tmp_profile, max_steps=3).max_steps == 3


def test_heldout_readings_keep_the_step_and_drop_the_prefix():
    history = [{"loss": 0.0, "step": 5}, {"heldout/kl_nats": 0.5, "reward": 1.0, "step": 10}, {"step": 12}]
    assert rl_heldout.heldout_readings(history) == [{"step": 10, "kl_nats": 0.5}]


@pytest.fixture
def policy_and_judge(tmp_profile):
    """The smoke base with fresh adapters, and its weights under a fresh scalar head as an untrained judge."""
    from transformers import LlamaForSequenceClassification

    model, tokenizer = load_for_training(tmp_profile, tmp_profile.dpo.max_length)
    judge_tokenizer = reward.toy_tokenizer(tmp_profile)
    torch.manual_seed(0)
    judge = LlamaForSequenceClassification.from_pretrained(tmp_profile.model_id, num_labels=1, dtype=torch.float32)
    reward.use_neutral_padding(judge, judge_tokenizer)
    return model, tokenizer, judge.eval(), judge_tokenizer


def test_the_trainer_scores_answers_as_reward_score_does_and_freezes_its_reference(tmp_profile, policy_and_judge):
    model, tokenizer, judge, judge_tokenizer = policy_and_judge
    prompts = [[{"role": "user", "content": f"What is {a} + 2?"}] for a in range(4)]
    answers = ["Answer: 2.", "Let me think about this step by step. So the answer is 3.", "Answer: 9.", ""]
    trainer = rlhf.make_rloo_trainer(
        tmp_profile,
        model,
        tokenizer,
        Dataset.from_dict({"prompt": prompts}),
        rl_proxy.reward_model_proxy(judge, judge_tokenizer),
    )
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    ids = [tokenizer(a + EOT, add_special_tokens=False)["input_ids"] for a in answers]
    inputs = [{"prompt": p} for p in prompts]
    trl_rewards = trainer._calculate_rewards(inputs, prompts, completions, ids)[:, 0].tolist()
    assert trl_rewards == pytest.approx(reward.score(judge, judge_tokenizer, prompts, answers), abs=1e-5)
    assert not [n for n, p in trainer.model.named_parameters() if p.requires_grad and ".ref" in n]


def test_failures_name_what_went_wrong():
    good = {
        "step0_kl_nats": 0.0,
        "proxy_reward": {"sft": -1.0, "rl": 0.5},
        "better_answer_rate": {"sft": 0.4, "rl": 0.9},
        "kl_final": 0.6,
        "hacking": {"proxy_reward": {"sft": 20.0, "rl": 30.0}, "better_answer_rate": {"sft": 0.4, "rl": 0.1}},
    }
    profile = SimpleNamespace(code_judge=True, random_weights=False)
    assert rl_failures(profile, good) == []
    worse = good | {"better_answer_rate": {"sft": 0.4, "rl": 0.3}, "step0_kl_nats": 1e-6}
    found = rl_failures(profile, worse)
    assert len(found) == 2 and "KL" in found[0] and "lowered the better-answer rate" in found[1]
    harmless = good | {"hacking": good["hacking"] | {"better_answer_rate": {"sft": 0.4, "rl": 0.5}}}
    assert rl_failures(profile, harmless) == ["the hacking run did not lower the better_answer_rate: 0.400 → 0.500"]
    no_judge = {k: v for k, v in good.items() if k != "better_answer_rate"}
    no_judge["hacking"] = {"proxy_reward": {"sft": 20.0, "rl": 30.0}, "reward_model_score": {"sft": -1.0, "rl": 0.0}}
    assert "reward_model_score" in rl_failures(SimpleNamespace(code_judge=False, random_weights=False), no_judge)[0]
    # random weights (the benchmarks' 8B stand-ins): only the invariant is asserted
    random = SimpleNamespace(code_judge=False, random_weights=True)
    assert rl_failures(random, no_judge | {"proxy_reward": {"sft": 1.0, "rl": 0.0}}) == []
    assert "KL" in rl_failures(random, no_judge | {"step0_kl_nats": 1e-6})[0]


def test_comparison_table_marks_what_was_not_recorded(tmp_profile):
    evaluation = {
        m: {"better_answer_rate": 0.5, "reward_model_score_mean": 0.1, "mean_response_tokens": 6.0}
        for m in ("sft", "rl")
    }
    update_metrics(tmp_profile, eval=evaluation, rlhf={"train_seconds": 12.5, "peak_memory_gib": 1.25})
    lines = report.comparison_table(tmp_profile).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| sft", "| rl"]
    assert lines[2].endswith("| 0.500 | 0.100 | – | 6.000 | – | – |")
    assert lines[3].endswith("| 12.5 | 1.25 |")


@pytest.fixture
def short_rl(tmp_profile):
    """The smoke profile with a 20-step SFT adapter, a reward model of a few steps and 4 RL steps, measured on few
    held-out prompts every 2 steps."""
    profile = replace(
        tmp_profile,
        sft=replace(tmp_profile.sft, max_steps=20, save_steps=1000),
        reward=replace(tmp_profile.reward, num_train_epochs=0.1),
        rl=replace(tmp_profile.rl, max_steps=4, eval_steps=2, logging_steps=2, save_steps=2),
        eval=replace(tmp_profile.eval, num_prompts=8, samples_per_prompt=2),
    )
    pipeline.prepare(profile)
    return profile


@pytest.mark.slow
def test_rl_starts_at_its_reference_logs_its_curve_and_records(short_rl):
    stage = rlhf.build_rl(short_rl)
    assert set(stage.model.peft_config) == {"default", "ref"}
    start = rlhf.measure_rl_start(stage)
    assert start["kl_nats"] == 0.0  # exactly: the reference is a complete copy of the start adapter
    pipeline.train_and_save(stage)
    readings = rl_heldout.heldout_readings(stage.trainer.state.log_history)
    assert [r["step"] for r in readings] == [2, 4]
    assert readings[-1]["kl_nats"] != 0.0  # the policy moved away from the reference
    assert is_current(short_rl.rl_adapter_dir, short_rl, "rl")
    result = rlhf.record_rl(stage)
    assert read_metrics(short_rl)["rlhf"] == result
    assert result["steps"] == 4 and set(result["proxy_reward"]) == {"sft", "rl"}
    assert result["better_answer_rate"]["sft"] == start["better_answer_rate"]
    assert read_metrics(short_rl)["splits"]["eval_problems_in_training"] == 0  # the RL prompts included


class Crash(TrainerCallback):
    """Stops training at `step` as a crash would (after the checkpoint of an earlier step was written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"crash at step {self.step}")


@pytest.mark.slow
def test_an_interrupted_rl_run_resumes_to_the_uninterrupted_adapter(short_rl, tmp_path, capsys):
    uninterrupted = rlhf.build_rl(short_rl)  # trains the SFT adapter and the reward model first
    pipeline.train_and_save(uninterrupted)
    other = replace(short_rl, outputs_root=str(tmp_path / "interrupted"))
    other.output_dir.mkdir(parents=True)
    for name in ("sft-adapter", "reward-model"):  # the same stage keys: reused, not retrained
        shutil.copytree(short_rl.output_dir / name, other.output_dir / name)
    crashing = rlhf.build_rl(other)
    crashing.trainer.add_callback(Crash(3))
    with pytest.raises(KeyboardInterrupt):
        pipeline.train_and_save(crashing)
    pipeline.train_and_save(rlhf.build_rl(other))
    assert "resuming from" in capsys.readouterr().out
    a, b = (load_file(p.rl_adapter_dir / "adapter_model.safetensors") for p in (short_rl, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit, as for SFT and DPO
