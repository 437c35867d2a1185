"""Two small DPO experiments on the smoke profile: a β sweep and a loss-type comparison (notebook 04).

Every run starts from the saved SFT adapter, trains a few dozen DPO steps on the `dpo-train` split with one
setting changed, and is measured on the held-out pairs and prompts:

- `reward_accuracy`: the share of held-out pairs whose chosen answer has the larger log-ratio
  log π_θ(y|x)/π_ref(y|x) (DPO's implicit-reward accuracy; its sign does not depend on β, so runs compare);
- `kl_nats`: the KL divergence from the policy to the reference (the SFT model), per answer:
  KL(π_θ ‖ π_ref) = E_{x, y ~ π_θ}[log π_θ(y|x) − log π_ref(y|x)], estimated by the mean, over answers the
  policy samples at temperature 1 to held-out prompts (`EvalSettings.samples_per_prompt` each), of the summed
  token log-ratio of the answer re-tokenised and closed by `<|eot_id|>`, as `helpers.evaluate.sequence_logps`
  scores it (so an answer cut at `max_new_tokens`, see `stopped_share`, also counts the `<|eot_id|>` it did not
  sample). It is the quantity β weighs in the RLHF objective (notebook 01), in nats per answer;
  `kl_nats_per_token` divides it by the mean answer length;
- `mean_answer_tokens`: the mean length of those sampled answers, in tokens, and `stopped_share`, the share that
  ended by themselves;
- with a code judge (smoke), `better_answer_rate` of those answers.

Each experiment takes under a minute on one CPU thread at the default sizes.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from helpers import evaluate, pipeline
from helpers.config import Profile
from helpers.model import load_for_training
from helpers.train import make_dpo_trainer

from transformers.trainer_callback import ProgressCallback  # isort: skip  (after helpers.backend, via evaluate)
from trl.trainer.utils import use_adapter  # isort: skip

__all__ = [
    "BETAS",
    "LOSS_TYPES",
    "Variant",
    "beta_sweep",
    "format_rows",
    "loss_type_comparison",
    "plot_experiment",
    "run_experiment",
    "run_variant",
    "sampled_kl",
]

BETAS = (0.01, 0.1, 1.0, 5.0)
# TRL 1.15 names. `ipo` and `sigmoid_norm` divide each answer's log-ratio by its number of tokens (length-normalised);
# `sigmoid` and `sigmoid`+`sft` (RPO, this recipe's loss) use the summed log-ratio.
LOSS_TYPES = {
    "sigmoid": ("sigmoid",),
    "sigmoid+sft (RPO)": ("sigmoid", "sft"),
    "ipo": ("ipo",),
    "sigmoid_norm": ("sigmoid_norm",),
}
MAX_STEPS = 60


@dataclass(frozen=True)
class Variant:
    """One DPO run of an experiment: a label and the settings it changes."""

    label: str
    beta: float
    loss_type: tuple[str, ...]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hide the progress bars of datasets and transformers (a few runs would print hundreds of lines)."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_on, transformers_on = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # The Trainer asks for pinned memory; without a GPU there is nothing to pin, and torch says so each run.
            warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true", category=UserWarning)
            yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            hf_logging.enable_progress_bar()


def sampled_kl(model: Any, tokenizer: Any, prompts: list, answers: list[str]) -> list[float]:
    """Per answer: log π_θ(y|x) − log π_ref(y|x), the adapters "default" (policy) and "ref" (reference)."""
    messages = [[{"role": "assistant", "content": a}] for a in answers]
    logps = {}
    for name in ("default", "ref"):
        with use_adapter(model, name):
            logps[name] = evaluate.sequence_logps(model, tokenizer, prompts, messages)
    return (logps["default"] - logps["ref"]).tolist()


def run_variant(profile: Profile, pairs: pipeline.Data, variant: Variant, max_steps: int = MAX_STEPS) -> dict:
    """Train DPO from the SFT adapter with `variant`'s settings for `max_steps` steps; measure it (module docstring).

    Args:
        profile: the profile (its SFT adapter must exist: `pipeline.ensure_adapter(profile, "sft")`).
        pairs: `pipeline.preference_data(profile, tokenizer)`: trains on `.train`, measures on `.eval`.
        variant: the β and loss type of this run.
        max_steps: optimizer steps.

    Returns:
        One row: the variant's label, β and loss type, the measurements, the last logged training loss and the
        seconds the run took.
    """
    start = time.perf_counter()
    model, tokenizer = load_for_training(profile, profile.dpo.max_length, adapter_dir=profile.sft_adapter_dir)
    with tempfile.TemporaryDirectory() as scratch:
        settings = replace(
            profile,
            outputs_root=scratch,  # checkpoints of these runs never mix with the series' own
            report_to_wandb=False,
            dpo=replace(
                profile.dpo,
                beta=variant.beta,
                loss_type=variant.loss_type,
                loss_weights=None,
                max_steps=max_steps,
                logging_steps=min(profile.dpo.logging_steps, max_steps),  # at least one logged loss
            ),
        )
        trainer = make_dpo_trainer(settings, model, tokenizer, pairs.train)
        trainer.remove_callback(ProgressCallback)  # a bar and a log line per run
        trainer.train()
    model.eval()
    chosen, rejected = evaluate.implicit_rewards(model, tokenizer, pairs.eval, 1.0, "default", "ref")
    s = profile.eval
    prompts = list(pairs.eval["prompt"])[: s.num_prompts] * s.samples_per_prompt
    gens = evaluate.generate(
        model, tokenizer, prompts, s.max_new_tokens, True, 1.0, profile.seed, batch_size=len(prompts), adapter="default"
    )
    kl = sampled_kl(model, tokenizer, prompts, gens.texts)
    mean_tokens = sum(gens.num_tokens) / len(gens.num_tokens)
    row = {
        "label": variant.label,
        "beta": variant.beta,
        "loss_type": "+".join(variant.loss_type),
        "reward_accuracy": evaluate.reward_accuracy(chosen, rejected),
        "kl_nats": sum(kl) / len(kl),
        "kl_nats_per_token": sum(kl) / len(kl) / max(mean_tokens, 1.0),
        "mean_answer_tokens": mean_tokens,
        "stopped_share": gens.stopped_share(),
        "train_loss_last": [h["loss"] for h in trainer.state.log_history if "loss" in h][-1],
    }
    if profile.code_judge:
        from helpers.smoke import is_better_answer

        row["better_answer_rate"] = evaluate.judge_responses(prompts, gens.texts, is_better_answer)
    return row | {"seconds": time.perf_counter() - start}


def run_experiment(profile: Profile, variants: Sequence[Variant], max_steps: int = MAX_STEPS) -> list[dict]:
    """`run_variant` for each of `variants` on the same pairs (the SFT adapter is trained first when missing)."""
    pipeline.ensure_adapter(profile, "sft")
    with quiet():
        _, tokenizer = load_for_training(profile, profile.dpo.max_length, adapter_dir=profile.sft_adapter_dir)
        pairs = pipeline.preference_data(profile, tokenizer)
        return [run_variant(profile, pairs, v, max_steps) for v in variants]


def beta_sweep(
    profile: Profile,
    betas: Sequence[float] = BETAS,
    loss_type: tuple[str, ...] = ("sigmoid",),
    max_steps: int = MAX_STEPS,
) -> list[dict]:
    """DPO at each β in `betas` with `loss_type`: one row each (see `run_variant`).

    The default is DPO's own loss, where β is the only thing that holds the policy near the reference; pass the
    profile's `dpo.loss_type` to sweep β in this recipe's loss (RPO), whose NLL term also holds it.
    """
    variants = [Variant(f"β={b:g}", b, tuple(loss_type)) for b in betas]
    return run_experiment(profile, variants, max_steps)


def loss_type_comparison(
    profile: Profile, loss_types: dict[str, tuple[str, ...]] | None = None, max_steps: int = MAX_STEPS
) -> list[dict]:
    """DPO with the profile's β and each loss type of `loss_types` (default `LOSS_TYPES`): one row each."""
    variants = [Variant(label, profile.dpo.beta, lt) for label, lt in (loss_types or LOSS_TYPES).items()]
    return run_experiment(profile, variants, max_steps)


def format_rows(rows: list[dict]) -> str:
    """The rows as a fixed-width table, one line per run."""
    header = f"{'run':20s} {'accuracy':>8s} {'KL nats':>8s} {'KL/token':>8s} {'tokens':>7s} {'better':>7s} {'loss':>7s}"
    lines = [header]
    for r in rows:
        better = f"{r['better_answer_rate']:7.2f}" if "better_answer_rate" in r else f"{'-':>7s}"
        lines.append(
            f"{r['label']:20s} {r['reward_accuracy']:8.2f} {r['kl_nats']:8.2f} {r['kl_nats_per_token']:8.3f} "
            f"{r['mean_answer_tokens']:7.1f} {better} {r['train_loss_last']:7.3f}"
        )
    return "\n".join(lines)


def plot_experiment(rows: list[dict], title: str):
    """Held-out reward accuracy (filled circles) and, with a code judge, the better-answer rate (open squares)
    against KL to the reference (left) and against mean answer length (right); one colour per run."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, xlabel in (
        (axes[0], "kl_nats", "KL(policy ‖ reference), nats per sampled answer"),
        (axes[1], "mean_answer_tokens", "mean sampled answer length (tokens)"),
    ):
        for i, r in enumerate(rows):
            ax.scatter(r[key], r["reward_accuracy"], color=f"C{i}", s=45)
            if "better_answer_rate" in r:
                ax.scatter(r[key], r["better_answer_rate"], s=45, marker="s", facecolors="none", edgecolors=f"C{i}")
        ax.set(xlabel=xlabel, ylabel="share, held-out", ylim=(-0.02, 1.08))
        ax.grid(alpha=0.3)
    axes[0].set_xscale("symlog", linthresh=1.0)  # KL spans orders of magnitude across β; an estimate can be < 0
    kls = [r["kl_nats"] for r in rows]
    axes[0].set_xlim(min(0.0, *kls), 2 * max(1.0, *kls))
    handles = [Line2D([], [], color=f"C{i}", marker="o", ls="", label=r["label"]) for i, r in enumerate(rows)]
    handles.append(Line2D([], [], color="grey", marker="o", ls="", label="reward accuracy"))
    if any("better_answer_rate" in r for r in rows):
        handles.append(Line2D([], [], color="grey", marker="s", mfc="none", ls="", label="better-answer rate"))
    axes[1].legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title)
    fig.tight_layout()
    plt.close(fig)
    return fig
