"""Online RL against a reward model (RLHF) with TRL's `RLOOTrainer`: the RL stage of notebook 06 and a
reward-hacking run against a deliberately flawed proxy (`helpers.rl_proxy`).

RLOO (REINFORCE Leave-One-Out; Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740), for each prompt x:

1. the policy π_θ samples k = `num_generations` answers y_1 … y_k;
2. each gets the reward R_i = r_φ(x, y_i) − β · KL_i, where r_φ is the reward model's score and KL_i the summed
   log-ratio log π_θ(y_i|x) − log π_ref(y_i|x) of the answer's tokens (π_ref: the frozen model RL starts from);
3. its advantage is A_i = R_i − (1/(k−1)) Σ_{j≠i} R_j: the other answers to the same prompt are the baseline, so
   no value model is trained (PPO trains one as large as the policy);
4. the update raises log π_θ(y_i|x) in proportion to A_i (with one update per batch, TRL's clipped ratio stays 1).

The stage starts from `profile.rl.start_from` (the SFT model, as in InstructGPT's SFT → reward model → RL; notebook
06 says why), trains its adapter, and uses the same adapter copied into a frozen `"ref"` adapter as π_ref. Every
`eval_steps` the policy answers the held-out prompts, and the code judge (smoke), the reward model and the KL to the
reference read the answers (`helpers.rl_heldout`): the curves of notebook 06 and `metrics.json`'s `rlhf` section.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from typing import Any

import torch

import helpers.backend  # noqa: F401  (Unsloth, when selected, patches transformers and trl first)
from helpers import pipeline, plots, reward, splits, train
from helpers.callbacks import attach_callbacks
from helpers.chat import stop_token_ids
from helpers.config import Profile
from helpers.metrics import update_metrics
from helpers.model import load_for_training
from helpers.rl_heldout import HeldOut, HeldOutCurve, heldout_readings, plot_rl_curves
from helpers.rl_proxy import LENGTH_PROXY, Proxy, reward_model_proxy
from helpers.rollouts import FastSamplingMixin
from helpers.tracking import finish_run
from helpers.workarounds import (
    complete_reference_adapter,
    freeze_reference_adapter,
    install_cpu_logprob_fallback,
    keep_adapter_dtypes_on_resume,
)

from trl import RLOOConfig, RLOOTrainer  # isort: skip  (after helpers.backend)

__all__ = [
    "ALGORITHM",
    "RLStage",
    "build_hacking",
    "build_rl",
    "make_rloo_trainer",
    "measure_rl_start",
    "record_rl",
    "rloo_config",
    "run_hacking",
    "run_rl",
]

ALGORITHM = "RLOO"
# The hacking run is short: the flawed proxy's damage shows within a few dozen steps.
HACKING_STEPS_SHARE = 1 / 3


# --- the trainer ------------------------------------------------------------------------------------------


class FastRLOOTrainer(FastSamplingMixin, RLOOTrainer):
    """TRL's `RLOOTrainer` with its rollouts sampled by `helpers.sampling` (TRL's `generate` path on a CPU)."""


def rloo_config(profile: Profile, **changes: Any) -> RLOOConfig:
    """`RLOOConfig` from `profile.rl`, every setting Unsloth would silently change written out (REFERENCE §4:
    learning rate, optimizer, `num_generations`, `logging_steps`, `report_to`, `weight_decay`, warm-up), and RLOO's
    own settings at the values this stage means, not left to TRL's defaults. `changes` replace fields."""
    s = profile.rl
    args = train.common_args(profile, "rl") | dict(
        weight_decay=s.weight_decay,
        fp16=False,
        num_generations=s.num_generations,
        max_completion_length=s.max_completion_length,
        temperature=s.temperature,
        top_p=1.0,
        top_k=0,
        beta=s.beta,
        num_iterations=1,  # one update per batch of answers: REINFORCE with the leave-one-out baseline
        epsilon=0.2,
        normalize_advantages=False,
        mask_truncated_completions=False,  # an answer cut at the length limit is scored like any other
        disable_dropout=True,
        log_completions=False,
        dataloader_pin_memory=torch.cuda.is_available(),  # nothing to pin on a CPU (torch warns each run)
        torch_empty_cache_steps=None,  # Unsloth would empty the CUDA cache every 250 steps
    )
    return RLOOConfig(**(args | changes))


def make_rloo_trainer(
    profile: Profile, model: Any, tokenizer: Any, prompts: Any, proxy: Proxy, **changes: Any
) -> FastRLOOTrainer:
    """A `RLOOTrainer` that maximises `proxy` on `prompts` (rows `{"prompt": messages}`), its reference the model
    as passed in: `model` must be a `PeftModel` whose "default" adapter TRL copies into a frozen "ref" one."""
    install_cpu_logprob_fallback()
    # The base model's generation config ends a text at <|end_of_text|> only: a chat answer ends at <|eot_id|>.
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    trainer = FastRLOOTrainer(
        model=model,
        reward_funcs=proxy.reward_funcs,
        args=rloo_config(profile, **changes),
        train_dataset=prompts,
        processing_class=tokenizer,
        reward_processing_classes=proxy.reward_processing_classes,
    )
    if "ref" not in trainer.model.peft_config:  # a patched trainer that skips the copy would measure KL to the base
        raise RuntimeError("RLOOTrainer made no frozen 'ref' adapter: the KL would be to the base, not the start.")
    complete_reference_adapter(trainer.model)
    freeze_reference_adapter(trainer.model)
    keep_adapter_dtypes_on_resume(trainer.model)
    return attach_callbacks(trainer)


# --- the stage --------------------------------------------------------------------------------------------


@dataclass
class RLStage(pipeline.Stage):
    """An RL stage: `pipeline.Stage` plus the held-out view its curve callback measures."""

    heldout: HeldOut | None = None


def load_start(profile: Profile) -> tuple[Any, Any]:
    """The model RL starts from (`profile.rl.start_from`'s adapter, trained first when missing), trainable."""
    start = profile.rl.start_from
    pipeline.ensure_adapter(profile, start)
    max_length = profile.dpo.max_length + profile.rl.max_completion_length
    return load_for_training(profile, max_length, adapter_dir=profile.output_dir / f"{start}-adapter")


def rl_data(profile: Profile, tokenizer: Any) -> pipeline.Data:
    """The preference splits, with `train` replaced by the RL prompts: the prompts of the `dpo-train` pairs
    (training problems only; written as the `rl-train` split), `eval` the held-out pairs, `reward` the toy
    reward model's pairs."""
    from datasets import Dataset

    pairs = pipeline.preference_data(profile, tokenizer)
    prompts = Dataset.from_dict({"prompt": list(pairs.train["prompt"])})
    splits.write_split(profile, "rl-train", prompts)
    return replace(pairs, train=prompts)


def build_rl(profile: Profile) -> RLStage:
    """The start model, the RL prompts, the reward model (the toy one is trained first when missing) and a
    `RLOOTrainer` that maximises its score, with the held-out curve callback."""
    model, tokenizer = load_start(profile)
    data = rl_data(profile, tokenizer)
    reward_model, reward_tokenizer = reward.ensure_reward_model(profile, data.reward)
    proxy = reward_model_proxy(reward_model, reward_tokenizer)
    trainer = make_rloo_trainer(profile, model, tokenizer, data.train, proxy)
    prompts = list(data.eval["prompt"])[: profile.eval.num_prompts]
    sampled = prompts * profile.eval.samples_per_prompt
    heldout = HeldOut(profile, tokenizer, sampled, len(prompts), reward_model, reward_tokenizer, proxy, trainer.sampler)
    trainer.callback_handler.callbacks.insert(0, HeldOutCurve(heldout.measure, profile.rl.eval_steps))
    return RLStage(profile, "rl", trainer.model, tokenizer, data, trainer, heldout=heldout)


def measure_rl_start(stage: RLStage) -> dict:
    """Before the first step: the held-out readings of the start model (its KL to the reference is exactly 0).
    Opens the W&B run; kept in `stage.notes["start"]` and returned."""
    pipeline.open_run(stage)
    stage.notes["start"] = stage.heldout.measure(stage.model)
    return stage.notes["start"]


def before_after(start: dict, end: dict, key: str, name: str = "rl") -> dict[str, float]:
    """`{"sft": start[key], name: end[key]}`: "sft" names the model RL starts from (`profile.rl.start_from`)."""
    return {"sft": start[key], name: end[key]}


def record_rl(stage: RLStage) -> dict:
    """Measure the reward model on the held-out pairs, save the curves, close the W&B run; record under `rlhf`."""
    profile, heldout = stage.profile, stage.heldout
    start = stage.notes.get("start") or measure_rl_start(stage)
    history = train.log_history(stage.trainer)
    end = heldout_readings(history)[-1]
    pairs = list(stage.data.eval)[: profile.eval.num_prompts]
    judge = reward.judge_report(heldout.reward_model, heldout.reward_tokenizer, pairs, profile.code_judge)
    plots.save(plot_rl_curves(history, start, "RLOO against the reward model"), profile.output_dir / "rl-training.png")
    result = {
        "algorithm": ALGORITHM,
        "starts_from": profile.rl.start_from,
        "steps": stage.trainer.state.global_step,
        "reward_model": profile.reward_model_id or "toy reward model (RewardTrainer, reward-train pairs)",
        "reward_model_accuracy": judge["accuracy"],
        "step0_kl_nats": start["kl_nats"],
        "proxy_reward": before_after(start, end, "reward_model_score"),
        "kl_final": end["kl_nats"],
        "mean_response_tokens": before_after(start, end, "mean_response_tokens"),
        "cut_share": before_after(start, end, "cut_share"),
    } | pipeline.stage_cost(stage)
    if profile.code_judge:
        result["better_answer_rate"] = before_after(start, end, "better_answer_rate")
    finish_run(stage.wandb_run)
    update_metrics(profile, rlhf=result, splits=splits.overlap_report(profile))
    return result


def run_rl(profile: Profile, resume: bool = True) -> dict:
    """Build, measure the start, train, save and record the RL stage (`pipeline.STAGE_RUNNERS["rl"]`)."""
    stage = build_rl(profile)
    measure_rl_start(stage)
    pipeline.train_and_save(stage, resume)
    return record_rl(stage)


# --- reward hacking ---------------------------------------------------------------------------------------


def build_hacking(stage: RLStage) -> RLStage:
    """A second RL run from the same start model, with the same settings, prompts and held-out view, that
    maximises the flawed `LENGTH_PROXY` for a third of the steps. It is not resumed and saves no adapter."""
    profile = stage.profile
    model, tokenizer = load_start(profile)
    trainer = make_rloo_trainer(
        profile,
        model,
        tokenizer,
        stage.data.train,
        LENGTH_PROXY,
        output_dir=str(train.checkpoint_dir(profile, "rl-hacking")),
        run_name=f"{profile.name}-rl-hacking-seed{profile.seed}",
        max_steps=max(1, round(profile.rl.max_steps * HACKING_STEPS_SHARE)),
        save_strategy="no",
    )
    heldout = replace(stage.heldout, tokenizer=tokenizer, proxy=LENGTH_PROXY, sampler=trainer.sampler)
    every = max(1, min(profile.rl.eval_steps, trainer.args.max_steps // 4))  # at least four readings
    trainer.callback_handler.callbacks.insert(0, HeldOutCurve(heldout.measure, every))
    return RLStage(profile, "rl-hacking", trainer.model, tokenizer, stage.data, trainer, heldout=heldout)


def run_hacking(hack: RLStage) -> dict:
    """Train the hacking run, save its curves; record under `rlhf.hacking` and return that section."""
    profile = hack.profile
    start = hack.notes.get("start") or measure_rl_start(hack)
    hack.trainer.train()
    finish_run(hack.wandb_run)
    shutil.rmtree(hack.trainer.args.output_dir, ignore_errors=True)
    history = train.log_history(hack.trainer)
    end = heldout_readings(history)[-1]
    title = f"RLOO against a flawed proxy: {LENGTH_PROXY.name}"
    plots.save(plot_rl_curves(history, start, title), profile.output_dir / "rl-hacking.png")
    result = {
        "proxy": LENGTH_PROXY.name,
        "steps": hack.trainer.state.global_step,
        "proxy_reward": before_after(start, end, "proxy_reward"),
        "reward_model_score": before_after(start, end, "reward_model_score"),
        "kl_final": end["kl_nats"],
        "mean_response_tokens": before_after(start, end, "mean_response_tokens"),
        "cut_share": before_after(start, end, "cut_share"),
    }
    if profile.code_judge:
        result["better_answer_rate"] = before_after(start, end, "better_answer_rate")
    update_metrics(profile, rlhf={"hacking": result})
    return result
