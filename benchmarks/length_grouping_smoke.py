"""Does batching by length bias DPO? Train the smoke profile's DPO with and without it and compare (CPU, minutes).

`train_sampling_strategy="group_by_length"` (the project's setting: transformers' length grouping, through
`helpers.training.ProjectDPOTrainer`'s `EpochSeededLengthGroupedSampler`) puts pairs of similar length in one batch,
in a shuffled order that changes every epoch; `"random"` is transformers' shuffled sampler. Both start from the same
SFT adapter and see every pair once an epoch, so only the batching differs. Several seeds, because one seed's curve
is noisy. Written: `results/length_grouping_smoke.json` (with machine, versions, date and command) and `.png`.

    OMP_NUM_THREADS=1 python benchmarks/length_grouping_smoke.py --seeds 42 1 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench_training import environment  # this script's folder is first on sys.path

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = {"grouped": "group_by_length", "shuffled": "random"}


def run_seed(seed: int, outputs_root: Path) -> dict:
    """SFT once, then DPO twice from that adapter (grouped, shuffled); losses and held-out rewards of each."""
    from helpers import machine, settings, training

    base = replace(settings.smoke_profile(seed, "hf"), report_to_wandb=False, outputs_root=str(outputs_root))
    machine.prepare(base)
    training.ensure(base, "sft")
    runs = {}
    for name, strategy in STRATEGIES.items():
        profile = replace(base, dpo=replace(base.dpo, train_sampling_strategy=strategy, save_steps=10**9))
        trainer = training.build_dpo(profile).trainer
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
        after = trainer.evaluate()
        history = trainer.state.log_history
        runs[name] = {
            "steps": [h["step"] for h in history if "loss" in h],
            "loss": [round(h["loss"], 5) for h in history if "loss" in h],
            "eval_loss": round(after["eval_loss"], 5),
            "eval_reward_accuracy": round(after["eval_rewards/accuracies"], 4),
            "eval_reward_margin": round(after["eval_rewards/margins"], 4),
            "train_s": round(train_s, 1),
        }
        print(seed, name, {k: v for k, v in runs[name].items() if "eval" in k}, flush=True)
    return runs


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, color in (("grouped", "tab:blue"), ("shuffled", "tab:orange")):
        curves = [runs[name] for runs in results["seeds"].values()]
        steps = curves[0]["steps"]
        mean = [statistics.fmean(c["loss"][i] for c in curves) for i in range(len(steps))]
        ax.plot(steps, mean, color=color, alpha=0.3, linewidth=1)
        # Grouped batches hold pairs of one kind, so single logged losses scatter more: compare running means.
        window = 8
        smooth = [statistics.fmean(mean[max(0, i - window + 1) : i + 1]) for i in range(len(mean))]
        label = "grouped by length" if name == "grouped" else "shuffled pairs (transformers' default)"
        ax.plot(steps, smooth, color=color, linewidth=2.5, label=f"{label} (mean of {len(curves)} seeds)")
    ax.set(xlabel="optimizer step", ylabel="DPO training loss")
    ax.set_title("Smoke profile DPO: batching by length (thin: logged; thick: running mean of 8)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarize(results: dict) -> dict:
    """Per-variant means over seeds of the final losses and held-out rewards."""
    summary = {}
    for name in ("grouped", "shuffled"):
        runs = [seed_runs[name] for seed_runs in results["seeds"].values()]
        summary[name] = {
            "final_train_loss_mean": round(statistics.fmean(r["loss"][-1] for r in runs), 4),
            "last_quarter_train_loss_mean": round(
                statistics.fmean(statistics.fmean(r["loss"][-max(1, len(r["loss"]) // 4) :]) for r in runs), 4
            ),
            "eval_loss_mean": round(statistics.fmean(r["eval_loss"] for r in runs), 4),
            "eval_reward_accuracy_mean": round(statistics.fmean(r["eval_reward_accuracy"] for r in runs), 4),
            "eval_reward_margin_mean": round(statistics.fmean(r["eval_reward_margin"] for r in runs), 4),
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 7])
    parser.add_argument("--out", type=Path, default=RESULTS / "length_grouping_smoke.json")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from --out")
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return 0
    results = {**environment(), "seeds": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="grouping-") as tmp:
        for seed in args.seeds:  # written after every seed, so a stopped run keeps the seeds it finished
            results["seeds"][str(seed)] = run_seed(seed, Path(tmp))
            results["summary"] = summarize(results)
            args.out.write_text(json.dumps(results, indent=1) + "\n")
            plot(results, args.out.with_suffix(".png"))
            print(json.dumps(results["summary"], indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
