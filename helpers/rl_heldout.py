"""The held-out view of an RL run: the held-out prompts the policy answers at the start, every `eval_steps` and at
the last step (`HeldOut`, `HeldOutCurve`), read by the code judge (smoke), the reward model, the run's proxy and the
KL to the reference; the readings read back from the log history (`heldout_readings`) and drawn (`plot_rl_curves`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

import helpers.backend  # noqa: F401  (Unsloth, when selected, patches transformers first)
from helpers import comparison, evaluate, plots, reward
from helpers.config import Profile
from helpers.experiments import sampled_kl
from helpers.rl_proxy import Proxy

from transformers import TrainerCallback  # isort: skip  (after helpers.backend)

__all__ = ["CURVES", "HeldOut", "HeldOutCurve", "heldout_readings", "plot_rl_curves"]


@dataclass
class HeldOut:
    """The held-out prompts every RL measurement answers, and what reads the answers.

    The prompts are the first `eval.num_prompts` held-out problems, each asked `eval.samples_per_prompt` times,
    answered with `eval`'s sampling settings (as notebook 05 answers them), all in one batch (on a CPU a decoding
    step of the tiny model costs about the same for 16 rows or 192). On a GPU they are sampled with the trainer's
    `Sampler` (its merged copy shared with the rollouts; `generate` took about 40 s for 64 answers of 256 tokens
    on the H200, benchmarks/results/h200-main-job.json), on a CPU with `evaluate.generate`.
    """

    profile: Profile
    tokenizer: Any  # the policy's
    prompts: list[list[dict]]
    n_prompts: int
    reward_model: Any
    reward_tokenizer: Any
    proxy: Proxy
    sampler: Any = None  # the trainer's `helpers.sampling.Sampler`

    def measure(self, model: Any) -> dict[str, float]:
        """Sample answers from the "default" adapter and read them: code judge (smoke), length, share cut at
        `max_new_tokens`, reward-model score, the proxy's score and the KL to the "ref" adapter (nats per answer).

        The random state is restored afterwards, so measuring does not change the training run's samples.
        """
        s = self.profile.eval
        was_training = model.training
        model.eval()
        with torch.random.fork_rng():
            if self.sampler is not None and evaluate.model_device(model).type == "cuda":
                self.sampler.refresh()  # the adapter changed since the last rollout
                gens = self.sampler.generate(
                    self.prompts, s.max_new_tokens, True, temperature=s.temperature, seed=self.profile.seed,
                    batch_size=len(self.prompts), adapter="default",
                )  # fmt: skip
            else:
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
