"""The RL stage: RLOO's advantages and loss are TRL's and give REINFORCE's gradient, its settings are all written out,
TRL scores answers exactly as `evaluation.score` does, the reference is the start model, the held-out curve lands in
the log history, a step's time splits into parts that add up, the checks catch a run that went wrong, and an
interrupted run resumes bit for bit."""

import shutil
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

from helpers import evaluation, machine, model, rl, settings, theory, training
from llama_sampler import Generations

# --- the policy gradient ----------------------------------------------------------------------------------------------


def test_rloo_advantages_are_the_reward_minus_the_mean_of_the_others():
    torch.manual_seed(0)
    k, beta = 4, 0.1
    scores, kl = torch.randn(5 * k), torch.randn(5 * k)
    rewards = (scores - beta * kl).view(5, k)
    advantages = theory.rloo_advantages(scores, kl, beta, k).view(5, k)
    assert torch.allclose(advantages, k / (k - 1) * (rewards - rewards.mean(1, keepdim=True)), atol=1e-6)
    others = torch.stack([torch.cat([r[:i], r[i + 1 :]]).mean() for r in rewards for i in range(k)]).view(5, k)
    assert torch.allclose(advantages, rewards - others, atol=1e-6)
    assert torch.allclose(advantages.sum(1), torch.zeros(5), atol=1e-5)


@pytest.mark.parametrize("stale", [False, True])
def test_rloo_loss_is_trls_and_its_gradient_is_reinforce(stale):
    torch.manual_seed(1)
    n, k, width = 3, 4, 7
    token_logps = (-4 * torch.rand(n * k, width)).requires_grad_()
    mask = (torch.rand(n * k, width) < 0.7).long()
    logps = (token_logps * mask).sum(1)
    old = logps.detach() + (0.4 * torch.randn(n * k) if stale else 0.0)  # stale: ρ ≠ 1, the clipping acts
    advantages = theory.rloo_advantages(torch.randn(n * k), torch.randn(n * k), 0.05, k)
    ours = theory.rloo_loss(logps, old, advantages, 0.2)
    trls = theory.trl_rloo_loss(token_logps, mask, old, advantages, 0.2)
    assert abs(ours.item() - trls.item()) < 1e-6
    (trl_grad,) = torch.autograd.grad(trls, token_logps)
    (our_grad,) = torch.autograd.grad(ours, token_logps)
    assert torch.allclose(trl_grad, our_grad, atol=1e-7)
    if not stale:  # ρ = 1: −(1/N) Σ A_i ∇ log π(y_i|x), REINFORCE with the leave-one-out baseline
        assert torch.allclose(trl_grad, -advantages[:, None] / (n * k) * mask, atol=1e-7)


# --- settings, proxies, readings --------------------------------------------------------------------------------------


def test_the_length_proxy_counts_the_same_tokens_in_training_and_held_out():
    eot = 7  # any id: TRL's completion ids end with the stop token when the answer ended by itself
    assert rl.length_reward([[1, 2, 3, eot], [1, 2, 3, 4, 5]]) == [4.0, 5.0]
    gens = Generations(["a b c", "a b c d e"], [3, 5], [True, False], [[1, 2, 3, eot], [1, 2, 3, 4, 5]])
    assert rl.length_reward(gens.token_ids) == [4.0, 5.0]  # what the held-out view reads


def test_rloo_config_writes_out_what_unsloth_would_change(tmp_profile):
    config, s = settings.rloo_config(tmp_profile), tmp_profile.rl
    assert (config.learning_rate, config.num_generations, config.logging_steps) == (
        s.learning_rate,
        s.num_generations,
        s.logging_steps,
    )
    assert (config.weight_decay, config.warmup_steps, config.beta) == (s.weight_decay, s.warmup_steps, s.beta)
    assert config.optim == "adamw_torch" and config.report_to == []  # on a CPU, W&B disabled in the tests
    assert config.max_completion_length == s.max_completion_length and config.num_iterations == 1
    assert config.torch_empty_cache_steps is None and not config.normalize_advantages
    assert settings.rloo_config(tmp_profile, max_steps=3).max_steps == 3


def test_heldout_readings_keep_the_step_and_drop_the_prefix():
    history = [{"loss": 0.0, "step": 5}, {"heldout/kl_nats": 0.5, "reward": 1.0, "step": 10}, {"step": 12}]
    assert rl.heldout_readings(history) == [{"step": 10, "kl_nats": 0.5}]


def test_the_reward_models_card_figures_add_up():
    for card in rl.REWARD_MODELS.values():
        parts = [card[k] for k in ("chat", "chat_hard", "safety", "reasoning")]
        assert abs(sum(parts) / 4 - card["average"]) < 0.06  # the card's average, rounded to one decimal


# --- where a step's time goes -----------------------------------------------------------------------------------------


class StubTrainer:
    """The methods `rl.time_parts` times, each sleeping a known time, and a trainer's state and callbacks."""

    def __init__(self):
        self.state, self.callback_handler = SimpleNamespace(global_step=0), SimpleNamespace(callbacks=[])

    def _generate_single_turn(self):
        time.sleep(0.03)

    def _calculate_rewards(self):
        time.sleep(0.01)

    def _get_per_token_logps_and_entropies(self):
        time.sleep(0.01)


def test_time_parts_and_step_split_add_up():
    trainer = StubTrainer()
    parts = rl.time_parts(trainer)
    timer = trainer.callback_handler.callbacks[0]
    assert isinstance(timer, rl.StepTimer)  # first: the held-out measurement after a step is not part of it
    for _ in range(3):
        timer.on_step_begin(None, trainer.state, None)
        trainer._generate_single_turn()
        trainer._calculate_rewards()
        with torch.no_grad():  # the policy's and the reference's log-probs for the KL
            trainer._get_per_token_logps_and_entropies()
            trainer._get_per_token_logps_and_entropies()
        trainer._get_per_token_logps_and_entropies()  # with gradients: the update's own pass, not a part
        time.sleep(0.02)
        trainer.state.global_step += 1
        timer.on_step_end(None, trainer.state, None)
    assert sorted(parts["step"]) == sorted(parts["sampling"]) == [1, 2, 3]
    split = rl.step_split(SimpleNamespace(trainer=trainer), parts)
    seconds = split["seconds"]
    assert split["steps"] == 2 and set(seconds) == {*rl.PARTS, "policy_update"}
    assert sum(seconds.values()) == pytest.approx(split["seconds_per_step"])
    assert seconds["sampling"] >= 0.03 and seconds["reward_scoring"] >= 0.01
    assert seconds["reference_and_kl_logps"] >= 0.02 and seconds["policy_update"] >= 0.03
    assert split["sampling_share"] == pytest.approx(seconds["sampling"] / split["seconds_per_step"])
    assert "sampling" in rl.describe_split(split) and rl.describe_split(None) == "not measured"
    assert rl.step_split(SimpleNamespace(trainer=trainer), {"step": {}}) is None


# --- the trainer ------------------------------------------------------------------------------------------------------


@pytest.fixture
def policy_and_judge(tmp_profile):
    """The smoke base with fresh adapters, and its weights under a fresh scalar head as an untrained judge."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    policy, tokenizer = model.load_for_training(tmp_profile, tmp_profile.dpo.max_length)
    judge_tokenizer = model.apply_chat_template(AutoTokenizer.from_pretrained(tmp_profile.model_id))
    torch.manual_seed(0)
    judge = LlamaForSequenceClassification.from_pretrained(tmp_profile.model_id, num_labels=1, dtype=torch.float32)
    model.use_neutral_padding(judge, judge_tokenizer)
    return policy, tokenizer, judge.eval(), judge_tokenizer


def test_the_trainer_scores_answers_as_evaluation_score_does_and_freezes_its_reference(tmp_profile, policy_and_judge):
    policy, tokenizer, judge, judge_tokenizer = policy_and_judge
    prompts = [[{"role": "user", "content": f"What is {a} + 2?"}] for a in range(4)]
    answers = ["Answer: 2.", "Let me think about this step by step. So the answer is 3.", "Answer: 9.", ""]
    trainer = training.FastRLOOTrainer(
        model=policy,
        reward_funcs=judge,
        args=settings.rloo_config(tmp_profile),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        reward_processing_classes=judge_tokenizer,
    )
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    ids = [tokenizer(a + settings.EOT, add_special_tokens=False)["input_ids"] for a in answers]
    trl_rewards = trainer._calculate_rewards([{"prompt": p} for p in prompts], prompts, completions, ids)[:, 0]
    assert trl_rewards.tolist() == pytest.approx(evaluation.score(judge, judge_tokenizer, prompts, answers), abs=1e-5)
    assert set(trainer.model.peft_config) == {"default", "ref"}
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
    assert rl.failures(profile, good) == []
    worse = good | {"better_answer_rate": {"sft": 0.4, "rl": 0.3}, "step0_kl_nats": 1e-6}
    found = rl.failures(profile, worse)
    assert len(found) == 2 and "KL" in found[0] and "lowered the better-answer rate" in found[1]
    harmless = good | {"hacking": good["hacking"] | {"better_answer_rate": {"sft": 0.4, "rl": 0.5}}}
    assert rl.failures(profile, harmless) == ["the hacking run did not lower the better_answer_rate: 0.400 → 0.500"]
    no_judge = {k: v for k, v in good.items() if k != "better_answer_rate"}
    no_judge["hacking"] = {"proxy_reward": {"sft": 20.0, "rl": 30.0}, "reward_model_score": {"sft": -1.0, "rl": 0.0}}
    assert "reward_model_score" in rl.failures(SimpleNamespace(code_judge=False, random_weights=False), no_judge)[0]
    # random weights (the benchmarks' 8B stand-ins): only the invariant is asserted
    random = SimpleNamespace(code_judge=False, random_weights=True)
    assert rl.failures(random, no_judge | {"proxy_reward": {"sft": 1.0, "rl": 0.0}}) == []
    assert "KL" in rl.failures(random, no_judge | {"step0_kl_nats": 1e-6})[0]


# --- training ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def short_rl(tmp_profile):
    """The smoke profile with a 20-step SFT adapter, a reward model of half an epoch and 4 RL steps, measured on few
    held-out prompts every 2 steps."""
    profile = replace(
        tmp_profile,
        sft=replace(tmp_profile.sft, max_steps=20, save_steps=1000),
        reward=replace(tmp_profile.reward, num_train_epochs=0.5),  # past its first log (every 10 steps)
        rl=replace(tmp_profile.rl, max_steps=4, eval_steps=2, logging_steps=2, save_steps=2),
        eval=replace(tmp_profile.eval, num_prompts=8, samples_per_prompt=2),
    )
    machine.prepare(profile)
    return profile


def build(profile: settings.Profile) -> training.Stage:
    return rl.build(profile, *rl.load_reward_model(profile))  # trains the SFT adapter and the reward model first


@pytest.mark.slow
def test_rl_starts_at_its_reference_logs_its_curve_and_records(short_rl):
    stage = build(short_rl)
    assert set(stage.model.peft_config) == {"default", "ref"}
    start = rl.measure_start(stage)
    assert start["kl_nats"] == 0.0  # exactly: the reference is a complete copy of the start adapter
    parts = rl.time_parts(stage.trainer)
    training.train_and_save(stage)
    readings = rl.heldout_readings(stage.history())
    assert [r["step"] for r in readings] == [2, 4]
    assert readings[-1]["kl_nats"] != 0.0  # the policy moved away from the reference
    assert training.is_current(short_rl, "rl")
    result = rl.record(stage)
    metrics = training.read_metrics(short_rl)
    assert metrics["rlhf"] == result and metrics["splits"]["eval_problems_in_training"] == 0  # RL prompts included
    assert result["steps"] == 4 and set(result["proxy_reward"]) == {"sft", "rl"}
    assert result["better_answer_rate"]["sft"] == start["better_answer_rate"]
    assert result["objective"]["sft"] == start["proxy_reward"]  # KL 0 at the start
    split = rl.step_split(stage, parts)
    assert split["steps"] == 3 and sum(split["seconds"].values()) == pytest.approx(split["seconds_per_step"])
    assert min(split["seconds"][p] for p in rl.PARTS) > 0


class Crash(TrainerCallback):
    """Stops training at `step` as a crash would (after the checkpoint of an earlier step was written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"crash at step {self.step}")


@pytest.mark.slow
def test_an_interrupted_rl_run_resumes_to_the_uninterrupted_adapter(short_rl, tmp_path, capsys):
    training.train_and_save(build(short_rl))
    other = replace(short_rl, outputs_root=str(tmp_path / "interrupted"))
    other.output_dir.mkdir(parents=True)
    for name in ("sft-adapter", "reward-model"):  # the same stage keys: reused, not retrained
        shutil.copytree(short_rl.output_dir / name, other.output_dir / name)
    crashing = build(other)
    crashing.trainer.add_callback(Crash(3))
    with pytest.raises(KeyboardInterrupt):
        training.train_and_save(crashing)
    training.train_and_save(build(other))
    assert "resuming from" in capsys.readouterr().out
    a, b = (load_file(p.adapter_dir("rl") / "adapter_model.safetensors") for p in (short_rl, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit, as for SFT and DPO
