"""helpers.experiments: the β sweep and loss-type comparison run the settings they name, measure held-out
accuracy, KL and length, and never touch the series' own checkpoints."""

from dataclasses import replace

import pytest
import torch

from helpers import experiments, pipeline
from helpers.model import load_for_training
from helpers.theory import toy_token_logps
from helpers.trl_loss import trl_batch_loss


@pytest.mark.parametrize("loss_type", experiments.LOSS_TYPES.values(), ids=experiments.LOSS_TYPES)
def test_every_compared_loss_type_runs_in_trl(loss_type):
    chosen, chosen_mask = toy_token_logps(4, seed=0)
    rejected, rejected_mask = toy_token_logps(4, seed=1)
    loss, _ = trl_batch_loss(
        chosen, chosen_mask, rejected, rejected_mask, torch.zeros(4), torch.zeros(4), 0.1, loss_type
    )
    assert torch.isfinite(loss)


@pytest.mark.slow
def test_beta_sweep_trains_each_setting_and_measures_it(tmp_profile, monkeypatch):
    profile = replace(
        tmp_profile,
        sft=replace(tmp_profile.sft, max_steps=10, save_steps=1000),
        eval=replace(tmp_profile.eval, num_prompts=4, samples_per_prompt=2),
    )
    built = []
    make = experiments.make_dpo_trainer

    def recording(settings, *args, **kwargs):
        trainer = make(settings, *args, **kwargs)
        built.append(trainer.args)
        return trainer

    monkeypatch.setattr(experiments, "make_dpo_trainer", recording)
    rows = experiments.beta_sweep(profile, betas=(0.1, 2.0), max_steps=2)

    assert [(a.beta, tuple(a.loss_type), a.max_steps) for a in built] == [
        (0.1, ("sigmoid",), 2),
        (2.0, ("sigmoid",), 2),
    ]
    assert all(not a.output_dir.startswith(str(profile.output_dir)) and a.report_to == [] for a in built)
    assert not (profile.output_dir / "dpo-checkpoints").exists() and not profile.dpo_adapter_dir.exists()
    assert [r["label"] for r in rows] == ["β=0.1", "β=2"]
    for row in rows:
        assert 0 <= row["reward_accuracy"] <= 1 and 0 <= row["better_answer_rate"] <= 1
        assert 0 < row["mean_answer_tokens"] <= profile.eval.max_new_tokens and 0 <= row["stopped_share"] <= 1
        assert row["kl_nats_per_token"] == pytest.approx(row["kl_nats"] / row["mean_answer_tokens"])
    plotted = experiments.plot_experiment(rows, "β sweep")
    assert [ax.get_xlabel()[:2] for ax in plotted.axes[:2]] == ["KL", "me"]
    assert "accuracy" in experiments.format_rows(rows).splitlines()[0]

    # Before any DPO step the policy is the reference: every sampled answer's log-ratio is exactly 0.
    model, tokenizer = load_for_training(profile, profile.dpo.max_length, adapter_dir=profile.sft_adapter_dir)
    pairs = pipeline.preference_data(profile, tokenizer)
    trainer = experiments.make_dpo_trainer(profile, model, tokenizer, pairs.train)
    prompts = list(pairs.eval["prompt"])[:4]
    answers = [row["chosen"][-1]["content"] for row in pairs.eval.select(range(4))]
    assert experiments.sampled_kl(trainer.model, tokenizer, prompts, answers) == [0.0] * 4
