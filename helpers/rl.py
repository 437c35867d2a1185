"""Online RL against a reward model (RLHF) with TRL's `RLOOTrainer` (REINFORCE Leave-One-Out, Ahmadian et al. 2024,
https://arxiv.org/abs/2402.14740; `helpers.theory` writes it out and checks it against TRL's loss): notebook 06's
stage, what its held-out curves measure, where an RL step's time goes, and a run against a deliberately flawed proxy.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import TrainerCallback

from helpers import data, evaluation, generation, machine, model, training
from helpers.settings import Profile, rloo_config

HACKING_STEPS_SHARE = 1 / 3  # the hacking run is short: the flawed proxy's damage shows within a few dozen steps
# RewardBench (https://huggingface.co/spaces/allenai/reward-bench) as each model card reports it, and the parameters in
# billions: the GPU profiles' reward model, and the 8B one they used before (too big for an A100 40 GB beside RL).
_CARD = ("params_b", "average", "chat", "chat_hard", "safety", "reasoning")
REWARD_MODELS = {
    "Ray2333/GRM-Llama3.2-3B-rewardmodel-ft": dict(zip(_CARD, (3.2, 90.9, 91.6, 84.9, 92.7, 94.6), strict=True)),
    "Ray2333/GRM_Llama3.1_8B_rewardmodel-ft": dict(zip(_CARD, (8.0, 92.6, 95.0, 87.7, 91.4, 96.4), strict=True)),
}
LENGTH_PROXY = "answer length (tokens)"  # the hacking run's proxy, `length_reward`


def length_reward(completion_ids: list[list[int]], **kwargs) -> list[float]:
    """The hacking run's flawed proxy, an answer's tokens with its end token (TRL's `completion_ids`, `token_ids` of
    `Generations`): "longer looks better" learned from raters (https://arxiv.org/abs/2310.03716) taken to the limit."""
    return [float(len(ids)) for ids in completion_ids]


@dataclass(eq=False)
class HeldOut(TrainerCallback):
    """The held-out prompts (sampled as in notebook 05) and their readers, the run's `proxy` (None: the reward model);
    a callback adding the readings (`heldout/<name>`) to the log every `every` steps and at the last (W&B gets them)."""

    profile: Profile
    tokenizer: Any
    prompts: list
    reward_model: Any
    reward_tokenizer: Any
    proxy: Callable[..., list[float]] | None
    every: int
    pending: dict = field(default_factory=dict)

    def measure(self, policy: Any) -> dict[str, float]:
        """The "default" adapter's answers read by `evaluation.judge_answers`, the reward model and the run's proxy, and
        their KL to "ref" (nats per answer); the random state is restored, so the run's samples do not change."""
        s, prompts, was_training = self.profile.eval, self.prompts, policy.training
        sampling = (s.max_new_tokens, True, s.temperature, self.profile.seed, "default", len(prompts))  # one batch
        policy.eval()
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            gens = generation.generate(policy, self.tokenizer, prompts, *sampling)
        kl = generation.log_ratios(policy, self.tokenizer, prompts, gens.texts, "default", "ref").tolist()
        policy.train(was_training)
        rewards = evaluation.score(self.reward_model, self.reward_tokenizer, prompts, gens.texts)
        judged = evaluation.judge_answers(self.profile, prompts, gens)
        result = {k: float(v) for k, v in judged.items() if isinstance(v, int | float) and k != "stopped_share"}
        proxy = rewards if self.proxy is None else self.proxy(completion_ids=gens.token_ids)
        return result | {
            "reward_model_score": sum(rewards) / len(rewards),
            "cut_share": 1 - gens.stopped_share(),
            "proxy_reward": sum(proxy) / len(proxy),
            "kl_nats": sum(kl) / len(kl),
        }

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.pending = {f"heldout/{k}": v for k, v in self.measure(model).items()}
            control.should_log = True  # log at this step, so the readings land at the step they measure

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pending and logs is not None:
            logs.update(self.pending)
            state.log_history[-1].update(self.pending)
            self.pending = {}


def heldout_readings(history: list[dict]) -> list[dict]:
    """The held-out measurements in a log history, in step order, without their `heldout/` prefix."""
    return [
        {"step": h["step"]} | {k.removeprefix("heldout/"): v for k, v in h.items() if k.startswith("heldout/")}
        for h in history
        if any(k.startswith("heldout/") for k in h)
    ]


def load_start(profile: Profile) -> tuple[Any, Any]:
    """The model RL starts from (`rl.start_from`'s adapter, trained first when missing), trainable."""
    training.ensure(profile, profile.rl.start_from)
    max_length = profile.dpo.max_length + profile.rl.max_completion_length
    return model.load_for_training(profile, max_length, profile.adapter_dir(profile.rl.start_from))


def rl_prompts(profile: Profile, tokenizer: Any) -> data.Splits:
    """The preference splits with `train` replaced by the `dpo-train` pairs' prompts, written as `rl-train`."""
    pairs = data.preference_data(profile, tokenizer)
    splits = replace(pairs, parts={"rl-train": pairs.train.select_columns("prompt")} | pairs.parts)
    splits.write(profile)
    return splits


def load_reward_model(profile: Profile) -> tuple[Any, Any]:
    """The profile's reward model; the smoke profile's toy one is trained first when missing."""
    if profile.reward_model_id is None:
        training.ensure(profile, "reward")
    return model.load_reward_model(profile)


def _trainer(profile: Profile, reward_funcs: Any, reward_tokenizer: Any = None, **config: Any) -> tuple[Any, Any]:
    """A `FastRLOOTrainer` from the start model on the RL prompts that maximises `reward_funcs`, and the prompts."""
    policy, tokenizer = load_start(profile)
    prompts = rl_prompts(profile, tokenizer)
    policy.generation_config.eos_token_id = generation.stop_token_ids(tokenizer)  # a chat answer ends at <|eot_id|> too
    trainer = training.FastRLOOTrainer(
        model=policy,
        reward_funcs=reward_funcs,
        args=rloo_config(profile, **config),
        train_dataset=prompts.train,
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizer,
    )
    return trainer, prompts


def build(profile: Profile, reward_model: Any, reward_tokenizer: Any) -> training.Stage:
    """Notebook 06's stage for other callers: the start model, the RL prompts, a `FastRLOOTrainer` that maximises the
    reward model's score, and the held-out curve. Check memory (`run` does) before the reward model is loaded."""
    trainer, prompts = _trainer(profile, reward_model, reward_tokenizer)
    return with_heldout(training.Stage(profile, "rl", trainer, prompts), reward_model, reward_tokenizer)


def with_heldout(
    stage: training.Stage, reward_model: Any, reward_tokenizer: Any, proxy: Callable | None = None, every: int = 0
) -> training.Stage:
    """Attach the held-out view (`stage.notes["heldout"]`; `every` 0: `rl.eval_steps`) and its curve callback to an RL
    stage: after the step timer (a measurement is not a step's time), before W&B's callback (which sends readings)."""
    profile = stage.profile
    prompts = evaluation.heldout_prompts(profile) * profile.eval.samples_per_prompt
    every = every or profile.rl.eval_steps
    heldout = HeldOut(profile, stage.tokenizer, prompts, reward_model, reward_tokenizer, proxy, every)
    stage.notes["heldout"] = heldout
    stage.trainer.callback_handler.callbacks.insert(1, heldout)
    return stage


def measure_start(stage: training.Stage) -> dict:
    """Before the first step: the held-out readings of the start model, whose KL to the reference is exactly 0."""
    training.open_run(stage)
    stage.notes["start"] = stage.notes["heldout"].measure(stage.model)
    return stage.notes["start"]


def before_after(stage: training.Stage, keys: list[str]) -> dict:
    """`kl_final`, `objective` (the proxy's held-out mean minus β times the KL per answer: what the run maximises) and
    `keys` (and a code judge's rate) of the start and last held-out readings, each as `{"sft": start, "rl": end}`."""
    start = stage.notes.get("start") or measure_start(stage)
    both = {"sft": start, "rl": heldout_readings(stage.history())[-1]}
    objective = {k: r["proxy_reward"] - stage.profile.rl.beta * r["kl_nats"] for k, r in both.items()}
    keys = keys + ["better_answer_rate"] * stage.profile.code_judge
    readings = {k: {n: r[k] for n, r in both.items()} for k in keys}
    return {"kl_final": both["rl"]["kl_nats"], "objective": objective} | readings


def record(stage: training.Stage) -> dict:
    """The start and last held-out readings, and how good the reward model is on held-out pairs, under `rlhf`."""
    heldout, profile = stage.notes["heldout"], stage.profile
    readings = before_after(stage, ["proxy_reward", "mean_response_tokens", "cut_share"])
    pairs = data.read_split(profile, "eval")[: profile.eval.num_prompts]
    judge = evaluation.judge_report(heldout.reward_model, heldout.reward_tokenizer, pairs, profile.code_judge)
    result = {
        "algorithm": "RLOO",
        "starts_from": profile.rl.start_from,
        "reward_model": profile.reward_model_id or "toy reward model (RewardTrainer, reward-train pairs)",
        "reward_model_accuracy": judge["accuracy"],
        "step0_kl_nats": stage.notes["start"]["kl_nats"],
    }
    return training.finish(stage, "rlhf", result | readings)


def build_hacking(profile: Profile, heldout: HeldOut) -> training.Stage:
    """A second RL run from the same start model, settings and held-out view that maximises the flawed `length_reward`
    for a third of the steps (not saved). Build it once the RL stage's policy is freed: one policy at a time."""
    steps = max(1, round(profile.rl.max_steps * HACKING_STEPS_SHARE))
    name, output_dir = f"{profile.name}-rl-hacking-seed{profile.seed}", str(profile.checkpoint_dir("rl-hacking"))
    trainer, prompts = _trainer(profile, length_reward, output_dir=output_dir, max_steps=steps, run_name=name)
    key = training.stage_key(profile, "rl") | {"proxy": LENGTH_PROXY, "max_steps": steps}
    stage = training.Stage(profile, "rl-hacking", trainer, prompts, key=key, save=False)
    every = max(1, min(profile.rl.eval_steps, steps // 4))  # at least four readings
    return with_heldout(stage, heldout.reward_model, heldout.reward_tokenizer, length_reward, every)


def record_hacking(hack: training.Stage) -> dict:
    """The hacking run's start and last readings, under `rlhf.hacking`."""
    keys = ["proxy_reward", "reward_model_score", "mean_response_tokens", "cut_share"]
    result = {"proxy": LENGTH_PROXY, "steps": hack.trainer.state.global_step} | before_after(hack, keys)
    result["train_seconds"] = next((h["train_runtime"] for h in reversed(hack.history()) if "train_runtime" in h), None)
    if hack.wandb_run is not None:
        hack.wandb_run.finish()
    training.update_metrics(hack.profile, rlhf={"hacking": result})
    return result


def run(profile: Profile, resume: bool = True) -> dict:
    """Build, measure the start, train, save and record the RL stage (the command line's `--stage rl`)."""
    machine.require_memory("rl", machine.MEASURED["peak_gib"]["rl"])
    stage = build(profile, *load_reward_model(profile))
    measure_start(stage)
    training.train_and_save(stage, resume)
    return record(stage)


def failures(profile: Profile, rlhf: dict) -> list[str]:
    """What the RL stage failed to show: KL exactly 0 at step 0 (random weights: only this); RL raised the reward
    model's held-out score, kept the better-answer rate; the hacking run raised its proxy and worsened the truth."""
    kl = rlhf["step0_kl_nats"]
    found = [] if kl == 0.0 else [f"the KL to the reference is {kl:g} before training, not exactly 0"]
    if profile.random_weights:
        return found
    proxy = rlhf["proxy_reward"]
    if not proxy["rl"] > proxy["sft"]:
        found.append(f"RL did not raise the reward model's held-out score: {proxy['sft']:.3f} → {proxy['rl']:.3f}")
    rate = rlhf.get("better_answer_rate")
    if rate and rate["rl"] < rate["sft"]:
        found.append(f"RL lowered the better-answer rate: {rate['sft']:.3f} → {rate['rl']:.3f}")
    if hacking := rlhf.get("hacking"):
        hacked = hacking["proxy_reward"]
        if not hacked["rl"] > hacked["sft"]:
            found.append(f"the hacking run did not raise its proxy: {hacked['sft']:.3f} → {hacked['rl']:.3f}")
        key = "better_answer_rate" if profile.code_judge else "reward_model_score"
        truth = hacking[key]
        if not truth["rl"] < truth["sft"]:
            found.append(f"the hacking run did not lower the {key}: {truth['sft']:.3f} → {truth['rl']:.3f}")
    return found


PARTS = ("sampling", "reward_scoring", "reference_and_kl_logps")  # the last: no-grad passes of policy and reference


class StepTimer(TrainerCallback):
    """Each optimizer step's wall time (a device sync at both ends), by step. Put it first among the callbacks: its
    `on_step_end` then runs before the held-out measurement, which is not part of the step."""

    def __init__(self, seconds: dict[int, float]):
        self.seconds, self.began = seconds, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.began = _now()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds[state.global_step] = _now() - self.began


def _now() -> float:
    """`time.perf_counter()` once the device has finished its queued work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def time_parts(trainer: Any) -> dict[str, dict[int, float]]:
    """Time each RL step from now on, and its `PARTS` (the rest is the policy update): `{"step": {step: seconds}, part:
    {step: seconds}}`, filled as training runs (a device sync around each call: the parts add up)."""
    parts: dict[str, dict[int, float]] = {name: {} for name in ("step", *PARTS)}

    def timed(method: Callable, part: str) -> Callable:
        def wrapper(*args, **kwargs):
            if part == "reference_and_kl_logps" and torch.is_grad_enabled():  # the update's own pass: not a part
                return method(*args, **kwargs)
            began = _now()
            out = method(*args, **kwargs)
            step = trainer.state.global_step + 1  # the step under way (StepTimer's key for it)
            parts[part][step] = parts[part].get(step, 0.0) + _now() - began
            return out

        return wrapper

    methods = ("_generate_single_turn", "_calculate_rewards", "_get_per_token_logps_and_entropies")  # PARTS' order
    for method, part in zip(methods, PARTS, strict=True):
        setattr(trainer, method, timed(getattr(trainer, method), part))
    trainer.callback_handler.callbacks.insert(0, StepTimer(parts["step"]))
    return parts


def step_split(stage: training.Stage, parts: dict[str, dict[int, float]], skip: int = 1) -> dict | None:
    """Where the RL steps' time went after `skip` warm-up steps (a `benchmarks/results/` record): the mean step, each
    part's mean seconds (the policy update is the rest) and the sampling share; None when no step was timed."""
    if not parts["step"]:
        return None
    steps = sorted(parts["step"])[skip:] or sorted(parts["step"])
    seconds = {part: sum(parts[part].get(s, 0.0) for s in steps) / len(steps) for part in PARTS}
    step = sum(parts["step"][s] for s in steps) / len(steps)
    seconds["policy_update"] = step - sum(seconds.values())
    on_gpu = torch.cuda.is_available()
    return {
        "stage": "rl",
        "steps": len(steps),
        "seconds_per_step": step,
        "sampling_share": seconds["sampling"] / step,
        "seconds": seconds,
        "gpu": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "memory_cap_fraction": torch.cuda.get_per_process_memory_fraction() if on_gpu else None,
        "sampler": getattr(stage.trainer.sampler, "mode", None) if on_gpu else "TRL's generate (CPU)",
    }


def describe_split(split: dict | None) -> str:
    """One line a part of a `step_split` record: seconds a step and share; "not measured" for None."""
    if split is None:
        return "not measured"
    step = split["seconds_per_step"]
    lines = [f"{split['seconds_per_step']:.3f} s a step on {split['gpu']} (sampler: {split['sampler']})"]
    return "\n".join(lines + [f"  {part:24s} {s:8.3f} s  {s / step:6.1%}" for part, s in split["seconds"].items()])
