"""The tutorial's stages as functions: prepare, SFT, DPO, evaluate. Notebooks, tests and the main job call these.

Each stage reads what the previous one saved under `outputs/<profile>/` and adds its numbers to
`metrics.json` there, so a stage can run alone once its inputs exist.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers import data, evaluate, plots, train
from helpers.config import Profile
from helpers.model import count_parameters, load_adapter, load_base, load_for_training
from helpers.preflight import check_environment
from helpers.tracking import finish_run, start_run


def prepare(profile: Profile) -> None:
    """Say what this run uses, stop early if it cannot run here; in the smoke profile build the local world."""
    print(profile.describe())
    check_environment(profile)
    profile.output_dir.mkdir(parents=True, exist_ok=True)
    if profile.name == "smoke":
        import torch

        from helpers.smoke import build_smoke_world

        # The smoke model's matrices are tiny: a second thread costs more in synchronisation than it saves
        # (a toy reward model trained in 4.7 s on one thread, 53 s on two, on a 2-core machine).
        torch.set_num_threads(1)
        print(f"smoke world: {build_smoke_world(profile.seed)}")


def metrics_path(profile: Profile) -> Path:
    return profile.output_dir / "metrics.json"


def read_metrics(profile: Profile) -> dict:
    """The run's metrics so far (empty before the first stage)."""
    path = metrics_path(profile)
    return json.loads(path.read_text()) if path.exists() else {}


def update_metrics(profile: Profile, **sections: Any) -> dict:
    """Merge `sections` into metrics.json (written atomically) and return the whole."""
    metrics = read_metrics(profile) | {"profile": profile.name, "backend": profile.backend, "seed": profile.seed}
    for key, value in sections.items():
        metrics[key] = metrics.get(key, {}) | value if isinstance(value, dict) else value
    path = metrics_path(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    tmp.replace(path)
    return metrics


# --- data ---------------------------------------------------------------------------------------------------


@dataclass
class Splits:
    """Train and held-out examples of one dataset, with the load report and the length-filter line."""

    train: Any
    eval: Any
    report: data.LoadReport
    length_report: str


def sft_splits(profile: Profile, tokenizer: Any) -> Splits:
    """The SFT data, checked, split and filtered to `max_length`."""
    dataset, report = data.load_sft_dataset(profile.sft_dataset, profile.max_sft_rows)
    train_set, eval_set = data.split_train_eval(dataset, profile.eval_fraction, profile.seed)
    train_set, length_report = data.filter_by_length(train_set, tokenizer, profile.sft.max_length, "SFT train")
    return Splits(train_set, eval_set, report, length_report)


def preference_splits(profile: Profile, tokenizer: Any) -> Splits:
    """The preference data, checked, split and filtered to `max_length`."""
    dataset, report = data.load_preference_dataset(profile.preference_dataset, profile.max_preference_rows)
    train_set, eval_set = data.split_train_eval(dataset, profile.eval_fraction, profile.seed)
    train_set, length_report = data.filter_by_length(train_set, tokenizer, profile.dpo.max_length, "DPO train")
    eval_set, _ = data.filter_by_length(eval_set, tokenizer, profile.dpo.max_length, "DPO eval")
    return Splits(train_set, eval_set, report, length_report)


# --- stages -------------------------------------------------------------------------------------------------


def losses(history: list[dict], key: str = "loss") -> list[float]:
    return [h[key] for h in history if key in h]


def run_sft(profile: Profile, resume: bool = True) -> dict:
    """Train the SFT adapter, save it, plot the loss; return and record `{"loss_first", "loss_last"}`."""
    model, tokenizer = load_for_training(profile, profile.sft.max_length)
    splits = sft_splits(profile, tokenizer)
    print(splits.report.summary(), splits.length_report, sep="\n")
    trainer = train.make_sft_trainer(profile, model, tokenizer, splits.train)
    train.discard_stale_checkpoints(trainer, profile)
    wandb_run = start_run(profile, "sft")
    train.run_training(trainer, resume=resume)
    train.save_adapter(trainer.model, tokenizer, profile.sft_adapter_dir, profile)
    finish_run(wandb_run)
    return record_sft(profile, trainer)


def record_sft(profile: Profile, trainer: Any) -> dict:
    """Save the SFT loss plot; record (under `sft`) and return the loss at the first and last log, steps, and
    trainable parameters."""
    history = train.log_history(trainer)
    plots.save(plots.plot_training(history, "SFT"), profile.output_dir / "sft-training.png")
    loss = losses(history)
    result = {
        "loss_first": loss[0],
        "loss_last": loss[-1],
        "steps": trainer.state.global_step,
        "trainable_parameters": count_parameters(trainer.model)["trainable"],
    }
    update_metrics(profile, sft=result)
    return result


def ensure_sft_adapter(profile: Profile) -> None:
    """Train the SFT adapter when it is missing (so DPO and evaluation can run on their own)."""
    if not train.adapter_is_current(profile.sft_adapter_dir, profile):
        print(f"No SFT adapter for these settings in {profile.sft_adapter_dir}: training it first.")
        run_sft(profile)


def step0_rewards(trainer: Any, tokenizer: Any, pairs: Any, beta: float) -> tuple[Any, Any]:
    """Implicit rewards on `pairs` with the trainer's policy ('default') against its reference ('ref')."""
    return evaluate.implicit_rewards(trainer.model, tokenizer, pairs, beta, policy="default", reference="ref")


def run_dpo(profile: Profile, resume: bool = True) -> dict:
    """Train DPO from the SFT adapter (reference = SFT model), save the adapter, plot; record the results."""
    ensure_sft_adapter(profile)
    model, tokenizer = load_for_training(profile, profile.dpo.max_length, adapter_dir=profile.sft_adapter_dir)
    splits = preference_splits(profile, tokenizer)
    print(splits.report.summary(), splits.length_report, sep="\n")
    trainer = train.make_dpo_trainer(profile, model, tokenizer, splits.train, splits.eval)
    train.discard_stale_checkpoints(trainer, profile)
    step0 = step0_rewards(trainer, tokenizer, splits.eval, profile.dpo.beta)
    # The W&B run opens first: the step-0 evaluation is then logged to it (and W&B's Trainer callback does not
    # open a run of its own for that evaluation).
    wandb_run = start_run(profile, "dpo")
    before = trainer.evaluate(metric_key_prefix="eval")
    train.run_training(trainer, resume=resume)
    after = trainer.evaluate(metric_key_prefix="eval")
    train.save_adapter(trainer.model, tokenizer, profile.dpo_adapter_dir, profile)
    finish_run(wandb_run)
    return record_dpo(profile, trainer, step0, before, after)


def record_dpo(profile: Profile, trainer: Any, step0: tuple[Any, Any], before: dict, after: dict) -> dict:
    """Save the DPO plots (loss, rewards, memory); record under `dpo` and return the results.

    Args:
        step0: `step0_rewards` (chosen, rejected) before any training step.
        before, after: `trainer.evaluate()` on the held-out pairs before and after training.
    """
    history = train.log_history(trainer)
    plots.save(plots.plot_training(history, "DPO"), profile.output_dir / "dpo-training.png")
    plots.save(plots.plot_rewards(history), profile.output_dir / "dpo-rewards.png")
    plots.save(plots.plot_memory(history), profile.output_dir / "dpo-memory.png")
    result = {
        "reward_accuracy_before": before["eval_rewards/accuracies"],
        "reward_accuracy_after": after["eval_rewards/accuracies"],
        "reward_margin_after": after["eval_rewards/margins"],
        "step0_reward_abs_max": max(r.abs().max().item() for r in step0),
        "loss_first": losses(history)[0],
        "loss_last": losses(history)[-1],
        "steps": trainer.state.global_step,
    }
    update_metrics(profile, dpo=result)
    return result


def load_for_evaluation(profile: Profile) -> tuple[Any, Any]:
    """One 4-bit base with the SFT and DPO adapters loaded as 'sft' and 'dpo' (adapters off = base)."""
    model, tokenizer = load_base(profile, max(profile.sft.max_length, profile.dpo.max_length))
    model = load_adapter(model, profile.sft_adapter_dir, trainable=False, adapter_name="sft")
    model = load_adapter(model, profile.dpo_adapter_dir, trainable=False, adapter_name="dpo")
    model.eval()
    return model, tokenizer


MODELS = {"base": None, "sft": "sft", "dpo": "dpo"}


def run_eval(profile: Profile, judge=None) -> dict:
    """Base vs SFT vs DPO on held-out prompts; record and return `{name: {...}}` plus reward accuracy.

    Args:
        judge: `judge(prompt, response) -> bool` deciding a better answer by code (the smoke task has one);
            without it the better-answer rate is not computed.
    """
    if not train.adapter_is_current(profile.dpo_adapter_dir, profile):
        print(f"No DPO adapter for these settings in {profile.dpo_adapter_dir}: training it first.")
        run_dpo(profile)
    model, tokenizer = load_for_evaluation(profile)
    pairs = preference_splits(profile, tokenizer).eval
    prompts = list(pairs["prompt"])[: profile.eval.num_prompts]
    s = profile.eval
    sampled = prompts * s.samples_per_prompt
    results, samples, everything = {}, {}, {}
    for name, adapter in MODELS.items():
        responses = evaluate.generate(
            model,
            tokenizer,
            sampled,
            s.max_new_tokens,
            sample=True,
            temperature=s.temperature,
            seed=profile.seed,
            adapter=adapter,
            desc=f"sampling {name}",
        )
        lengths = evaluate.response_lengths(tokenizer, responses)
        results[name] = {"mean_response_tokens": sum(lengths) / len(lengths)}
        if judge is not None:
            results[name]["better_answer_rate"] = evaluate.judge_responses(sampled, responses, judge)
        samples[name] = responses[: s.num_side_by_side]
        everything[name] = {"responses": responses, "lengths": lengths}
    chosen, rejected = evaluate.implicit_rewards(model, tokenizer, pairs, profile.dpo.beta, "dpo", "sft")
    results["dpo_vs_sft_reward_accuracy"] = evaluate.reward_accuracy(chosen, rejected)
    update_metrics(profile, eval=results)
    (profile.output_dir / "samples.json").write_text(
        json.dumps({"prompts": [p[-1]["content"] for p in prompts[: s.num_side_by_side]], **samples}, indent=2)
    )
    (profile.output_dir / "responses.json").write_text(json.dumps({"prompts": sampled, **everything}))
    return results


# --- reading the evaluation (notebook 05) -------------------------------------------------------------------


def base_generation_path(profile: Profile) -> Path:
    """Where notebook 02 keeps the base model's greedy answer to the first held-out prompt (05 shows it again)."""
    return profile.output_dir / "base-generation.json"


def read_responses(profile: Profile) -> dict:
    """Every answer `run_eval` sampled: `{"prompts": [messages, ...], name: {"responses", "lengths"}}`.

    Prompts are chat message lists, in the order of each model's responses (the same for all models).

    Raises:
        FileNotFoundError: `run_eval` has not run for this profile.
    """
    path = profile.output_dir / "responses.json"
    if not path.exists():
        raise FileNotFoundError(f"No {path}: run the evaluation (pipeline.run_eval) first.")
    return json.loads(path.read_text())


def update_eval(profile: Profile, results: dict) -> dict:
    """Add `results` to the `eval` section of metrics.json; a model's dict is merged into the one it has there.

    `update_metrics` replaces each entry of a section; here `{"dpo": {"reward_model_score_mean": ...}}` keeps the
    numbers `run_eval` recorded for `dpo`. Returns the whole `eval` section.
    """
    evaluation = read_metrics(profile).get("eval", {})
    merged = {k: evaluation.get(k, {}) | v if isinstance(v, dict) else v for k, v in results.items()}
    return update_metrics(profile, eval=merged)["eval"]


def side_by_side(profile: Profile) -> str:
    """A markdown table of the first held-out prompts with each model's sampled answer (from samples.json)."""
    samples = json.loads((profile.output_dir / "samples.json").read_text())
    names = [n for n in MODELS if n in samples]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"

    lines = ["| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, prompt in enumerate(samples["prompts"]):
        lines.append(f"| {cell(prompt)} | " + " | ".join(cell(samples[n][i]) for n in names) + " |")
    return "\n".join(lines)
