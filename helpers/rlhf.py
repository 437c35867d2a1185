"""Online RL against a reward model (RLHF) with TRL's `RLOOTrainer`: the RL stage of notebook 06, the held-out
curves it draws while it trains, and a reward-hacking run against a deliberately flawed proxy.

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
reference read the answers: the curves of notebook 06 and `metrics.json`'s `rlhf` section.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

import helpers.backend  # noqa: F401  (Unsloth, when selected, patches transformers and trl first)
from helpers import comparison, evaluate, pipeline, plots, reward, splits, train
from helpers.chat import stop_token_ids
from helpers.config import MODELS, Profile
from helpers.diagrams import Arrow, Box, _draw, _save
from helpers.experiments import sampled_kl
from helpers.metrics import read_metrics, update_metrics
from helpers.model import load_for_training
from helpers.sampling import FastSamplingMixin
from helpers.tracking import finish_run
from helpers.workarounds import complete_reference_adapter, install_cpu_logprob_fallback, keep_adapter_dtypes_on_resume

from transformers import TrainerCallback  # isort: skip  (after helpers.backend)
from trl import RLOOConfig, RLOOTrainer  # isort: skip

__all__ = [
    "ALGORITHM",
    "LENGTH_PROXY",
    "HeldOut",
    "HeldOutCurve",
    "Proxy",
    "RLStage",
    "build_hacking",
    "build_rl",
    "comparison_table",
    "draw_rloo_loop",
    "failures",
    "freeze_reference_adapter",
    "length_reward",
    "make_rloo_trainer",
    "measure_rl_start",
    "plot_rl_curves",
    "record_rl",
    "reward_model_proxy",
    "rloo_config",
    "run_hacking",
    "run_rl",
]

ALGORITHM = "RLOO"
# The hacking run is short: the flawed proxy's damage shows within a few dozen steps.
HACKING_STEPS_SHARE = 1 / 3


# --- what RL maximises ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proxy:
    """What a run maximises: TRL's `reward_funcs` (a reward model or a function), and the same score computed for
    held-out answers (`score(prompts, generations)`, one float per answer)."""

    name: str
    reward_funcs: Any
    reward_processing_classes: Any
    score: Callable[[Sequence[list[dict]], evaluate.Generations], list[float]]


def reward_model_proxy(model: Any, tokenizer: Any) -> Proxy:
    """The reward model as the proxy: TRL applies its chat template and reads `logits[:, 0]`, as `reward.score`."""
    return Proxy(
        "reward-model score",
        model,
        tokenizer,
        lambda prompts, gens: reward.score(model, tokenizer, prompts, gens.texts),
    )


def length_reward(completion_ids: list[list[int]], **kwargs) -> list[float]:
    """The flawed proxy of the hacking run: an answer's length in tokens (its end token included).

    The longer answer always wins, as it does for a reward model that learned "longer looks better" from its
    raters' labels (Singhal et al. 2023, https://arxiv.org/abs/2310.03716), taken to the limit.
    """
    return [float(len(ids)) for ids in completion_ids]


LENGTH_PROXY = Proxy(
    "answer length (tokens)",
    length_reward,
    None,
    lambda prompts, gens: [float(n + s) for n, s in zip(gens.num_tokens, gens.stopped, strict=True)],
)


# --- the held-out view ------------------------------------------------------------------------------------


@dataclass
class HeldOut:
    """The held-out prompts every RL measurement answers, and what reads the answers.

    The prompts are the first `eval.num_prompts` held-out problems, each asked `eval.samples_per_prompt` times,
    answered with `eval`'s sampling settings (as notebook 05 answers them), all in one batch (on a CPU a decoding
    step of the tiny model costs about the same for 16 rows or 192).
    """

    profile: Profile
    tokenizer: Any  # the policy's
    prompts: list[list[dict]]
    n_prompts: int
    reward_model: Any
    reward_tokenizer: Any
    proxy: Proxy

    def measure(self, model: Any) -> dict[str, float]:
        """Sample answers from the "default" adapter and read them: code judge (smoke), length, share cut at
        `max_new_tokens`, reward-model score, the proxy's score and the KL to the "ref" adapter (nats per answer).

        The random state is restored afterwards, so measuring does not change the training run's samples.
        """
        s = self.profile.eval
        was_training = model.training
        model.eval()
        with torch.random.fork_rng():
            gens = evaluate.generate(
                model, self.tokenizer, self.prompts, s.max_new_tokens, True, s.temperature, self.profile.seed,
                len(self.prompts), "default", "held-out",
            )  # fmt: skip
            kl = sampled_kl(model, self.tokenizer, self.prompts, gens.texts)
        model.train(was_training)
        described = comparison.describe_answers(self.profile, self.prompts, gens, self.n_prompts)
        result = {k: float(v) for k, v in described.items() if isinstance(v, int | float) and k != "stopped_share"}
        result["cut_share"] = 1.0 - gens.stopped_share()
        scores = reward.score(self.reward_model, self.reward_tokenizer, self.prompts, gens.texts)
        result["reward_model_score"] = mean(scores)
        result["proxy_reward"] = mean(self.proxy.score(self.prompts, gens))
        result["kl_nats"] = mean(kl)
        return result


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


class HeldOutCurve(TrainerCallback):
    """Every `every` optimizer steps and at the last one, measure the held-out answers and add the readings, as
    `heldout/<name>`, to that step's log (so W&B and the log history, which checkpoints keep, get them)."""

    def __init__(self, measure: Callable[[Any], dict[str, float]], every: int):
        self.measure, self.every, self.pending = measure, every, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.pending = {f"heldout/{k}": v for k, v in self.measure(model).items()}
            control.should_log = True  # log at this step, so the readings land at the step they measure

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pending and logs is not None:
            logs.update(self.pending)
            state.log_history[-1].update(self.pending)  # the Trainer copied `logs` into its history already
            self.pending = {}


def heldout_readings(history: list[dict]) -> list[dict]:
    """The held-out measurements in a log history, in step order, without their `heldout/` prefix."""
    return [
        {"step": h["step"]} | {k.removeprefix("heldout/"): v for k, v in h.items() if k.startswith("heldout/")}
        for h in history
        if any(k.startswith("heldout/") for k in h)
    ]


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
    return train.attach_callbacks(trainer)


def freeze_reference_adapter(model: Any) -> int:
    """Freeze every weight of TRL's frozen "ref" adapter; return how many were still trainable.

    What breaks: TRL adds the "ref" adapter with `add_adapter`, and peft 0.21 leaves the new adapter's trainable
    token rows (`...trainable_tokens_delta.ref`, from `LoraSettings.trainable_tokens`) trainable: its wrapper's
    `set_adapter` "only deals with active_adapters, not with requires_grad" (peft/utils/other.py). They get no
    gradient, so training is unchanged, but the optimizer holds them; on resume the Trainer reloads "ref" frozen,
    the optimizer's parameter groups no longer match the checkpoint's, and resuming fails with "loaded state dict
    contains a parameter group that doesn't match the size of optimizer's group". Switching adapters once (peft's
    `set_adapter`, as `use_adapter` does) freezes them too, which is why DPO, whose "ref" adapter is made the same
    way, resumes: `measure_dpo_start` switches before training. Not reported upstream as of 2026-11-30; remove when
    peft freezes a non-active adapter's rows. (Belongs in `helpers.workarounds`, beside `complete_reference_adapter`.)
    """
    trainable = [p for n, p in model.named_parameters() if p.requires_grad and (".ref." in n or n.endswith(".ref"))]
    for param in trainable:
        param.requires_grad_(False)
    return len(trainable)


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
    heldout = HeldOut(profile, tokenizer, sampled, len(prompts), reward_model, reward_tokenizer, proxy)
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
    } | pipeline.stage_cost(history)
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
    heldout = replace(stage.heldout, tokenizer=tokenizer, proxy=LENGTH_PROXY)
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


# --- checks -----------------------------------------------------------------------------------------------


def failures(profile: Profile, rlhf: dict) -> list[str]:
    """What the RL stage must show (empty when all hold): the reference is the start model (KL exactly 0 at step
    0); RL raised the reward model's held-out score; with a code judge, RL did not lower the better-answer rate;
    and the hacking run raised its proxy while the truth got worse: the code judge's rate fell, or without a code
    judge, the score of the reward model it did not optimise."""
    found = []
    if rlhf["step0_kl_nats"] != 0.0:
        found.append(f"the KL to the reference is {rlhf['step0_kl_nats']:g} before training, not exactly 0")
    proxy = rlhf["proxy_reward"]
    if not proxy["rl"] > proxy["sft"]:
        found.append(f"RL did not raise the reward model's held-out score: {proxy['sft']:.3f} → {proxy['rl']:.3f}")
    rate = rlhf["better_answer_rate"] if profile.code_judge else None
    if rate and rate["rl"] < rate["sft"]:
        found.append(f"RL lowered the better-answer rate: {rate['sft']:.3f} → {rate['rl']:.3f}")
    hacking = rlhf.get("hacking")
    if hacking:
        hacked = hacking["proxy_reward"]
        if not hacked["rl"] > hacked["sft"]:
            found.append(f"the hacking run did not raise its proxy: {hacked['sft']:.3f} → {hacked['rl']:.3f}")
        key = "better_answer_rate" if profile.code_judge else "reward_model_score"
        truth = hacking[key]
        if not truth["rl"] < truth["sft"]:
            found.append(f"the hacking run did not lower the {key}: {truth['sft']:.3f} → {truth['rl']:.3f}")
    return found


# --- pictures and tables ----------------------------------------------------------------------------------

CURVES = (  # panel title, training-batch key (TRL's log), held-out key (HeldOutCurve)
    ("proxy reward (what RL maximises)", "reward", "proxy_reward"),
    ("reward-model score, held-out", None, "reward_model_score"),
    ("better-answer rate, held-out (code judge)", None, "better_answer_rate"),
    ("KL to the reference, held-out (nats per answer)", None, "kl_nats"),
    ("answer length (tokens)", "completions/mean_length", "mean_response_tokens"),
    ("share cut at the length limit", "completions/clipped_ratio", "cut_share"),
)


def plot_rl_curves(history: list[dict], start: dict, title: str) -> Figure:
    """The RL curves over optimizer steps: the training batches' values as TRL logs them (line) and the
    held-out readings (dots; step 0 is `start`), one panel per quantity of `CURVES` that was measured."""
    readings = [{"step": 0} | start, *heldout_readings(history)]
    panels = [c for c in CURVES if c[2] in readings[-1]]
    fig, axes = plt.subplots(2, 3, figsize=(14, 6.4))
    for ax, (name, batch_key, heldout_key) in zip(axes.flat, panels, strict=False):
        if batch_key:
            ax.plot(*plots.series(history, batch_key), color="C0", alpha=0.6, label="training batches")
        ax.plot([r["step"] for r in readings], [r[heldout_key] for r in readings], "o-", color="C1", label="held out")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if batch_key:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    plt.close(fig)
    return fig


TABLE_COLUMNS = {  # column header: (metrics section, key); the section "eval" is read per model
    "better-answer rate": ("eval", "better_answer_rate"),
    "reward-model score": ("eval", "reward_model_score_mean"),
    "win rate vs SFT": ("eval", "win_rate_vs_sft"),
    "mean tokens": ("eval", "mean_response_tokens"),
    "training s": ("stage", "train_seconds"),
    "peak memory GiB": ("stage", "peak_memory_gib"),
}
STAGE_SECTIONS = {"sft": "sft", "dpo": "dpo", "rl": "rlhf"}  # the metrics section that holds each model's training


def comparison_table(profile: Profile) -> str:
    """A markdown table of the models in metrics.json's `eval` section: the held-out numbers of notebook 05's
    comparison and each stage's training cost (– where a number was not recorded)."""
    metrics = read_metrics(profile)
    models = [m for m in MODELS if m in metrics.get("eval", {})]
    lines = ["| model | " + " | ".join(TABLE_COLUMNS) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for model in models:
        cells = []
        for section, key in TABLE_COLUMNS.values():
            source = metrics["eval"][model] if section == "eval" else metrics.get(STAGE_SECTIONS.get(model), {})
            value = source.get(key)
            cells.append("–" if value is None else f"{value:.3g}" if section == "stage" else f"{value:.3f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_rloo_loop(path: str | Path | None = None) -> Figure:
    """RLHF with RLOO: the policy samples k answers, the reward model scores them, the KL to the frozen reference
    is subtracted, the other answers' mean is the baseline, and the advantage updates the policy."""
    advantage = "$A_i = R_i - \\mathrm{mean}_{j \\ne i}\\, R_j$"
    boxes = {
        "prompts": Box(2.0, 4.9, "Prompts $x$\n(training problems)", "data"),
        "policy": Box(6.5, 4.9, "Policy $\\pi_\\theta$ samples\n$y_1, \\dots, y_k$ for each $x$", "model"),
        "rm": Box(11.0, 4.9, "Reward model\n$r_\\phi(x, y_i)$", "frozen"),
        "ref": Box(6.5, 2.8, "Reference $\\pi_{\\mathrm{ref}}$\n(frozen copy of the start)", "frozen"),
        "reward": Box(11.0, 2.8, "$R_i = r_\\phi(x, y_i) - \\beta\\,\\mathrm{KL}_i$", "training"),
        "update": Box(2.0, 0.8, f"{advantage}\nraise $\\log \\pi_\\theta(y_i|x)$\nin proportion to $A_i$", "training"),
    }  # fmt: skip
    arrows = [
        Arrow("prompts", "policy"),
        Arrow("policy", "rm", "answers $y_i$"),
        Arrow("policy", "ref", "$y_i$"),
        Arrow("rm", "reward", "score"),
        Arrow("ref", "reward", "$\\mathrm{KL}_i$"),
        Arrow("reward", "update", "baseline: the\nother answers"),
        Arrow("update", "policy", "update $\\theta$", dashed=True),
    ]
    return _save(_draw(boxes, arrows, "RLHF with RLOO: no value model", (13.0, 5.8)), path)
