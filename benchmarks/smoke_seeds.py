"""Does the smoke recipe learn for any seed? Run the whole recipe for many seeds and check every criterion.

    .venv/bin/python benchmarks/smoke_seeds.py --seeds 100 101 102 103 104 105 106 107 108 109 --jobs 2

For each seed, in its own process (one thread), from a fresh smoke world and empty outputs: SFT, DPO and notebook
05's sampled comparison, as `make run` does them (`training.run`, `evaluation.compare`). Each seed's numbers, TRL's
step-0 evaluation of DPO, and the failures of `training.sft_failures`, `training.dpo_failures` (the step-0 check
included), `evaluation.eval_failures` and `data.overlap_failures` go to `--out` (default
`benchmarks/results/smoke-seeds.json`), with a plot of the numbers per seed beside it. Exit status 1 when any seed
fails a criterion.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_training import environment  # this script's folder is first on sys.path

RESULTS = Path(__file__).parent / "results"
MODELS = ("base", "sft", "dpo")


def one_seed() -> dict:
    """The recipe for the seed the environment names, in this process."""
    from helpers import settings

    profile = settings.load_profile()
    from helpers import data, evaluation, machine, training

    start = time.perf_counter()
    machine.prepare(profile)
    sft, dpo = training.run(profile, "sft"), training.run(profile, "dpo")
    names = evaluation.trained_models(profile)
    policy, tokenizer = evaluation.load_models(profile, names)
    results = evaluation.compare(profile, policy, tokenizer, names)
    splits = training.read_metrics(profile)["splits"]
    failures = training.sft_failures(profile, sft) + training.dpo_failures(profile, dpo)
    failures += evaluation.eval_failures(profile, results) + data.overlap_failures(splits)
    return {
        "seed": profile.seed,
        "sft_loss_first": sft["loss_first"],
        "sft_loss_last": sft["loss_last"],
        "dpo_reward_accuracy": dpo["reward_accuracy_after"],
        "reward_accuracy_before": dpo["reward_accuracy_before"],  # TRL's step-0 evaluation: exactly 0
        "step0_rewards": dpo["step0_rewards"],
        "step0_reward_abs_max": max(abs(v) for v in dpo["step0_rewards"].values()),  # TRL's step-0 eval rewards
        **{key: {m: results[m][key] for m in MODELS} for key in ("better_answer_rate", "style_shares")},
        "correct_among_concise": {m: results[m]["correct_among_concise"] for m in MODELS},
        "splits": splits,
        "failures": failures,
        "seconds": time.perf_counter() - start,
    }


def run_seed(seed: int, work: Path) -> dict:
    """The recipe for one seed in a fresh process, with its own cache and outputs folders."""
    env = os.environ | {
        "TUTORIAL_PROFILE": "smoke",
        "TUTORIAL_SEED": str(seed),
        "TUTORIAL_OUTPUTS": str(work / f"outputs-{seed}"),
        "TUTORIAL_CACHE": str(work / f"cache-{seed}"),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run([sys.executable, __file__, "--worker"], env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"seed": seed, "failures": [f"crashed: {done.stderr[-1500:]}"]}
    return json.loads(lines[-1].removeprefix("RESULT "))


def plot(records: list[dict], path: Path) -> None:
    """Per seed: the better-answer rates of base, SFT and DPO, and DPO's held-out reward accuracy."""
    import matplotlib.pyplot as plt

    ok = [r for r in records if "better_answer_rate" in r]
    seeds = [str(r["seed"]) for r in ok]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
    width = 0.27
    for i, model in enumerate(("base", "sft", "dpo")):
        xs = [j + (i - 1) * width for j in range(len(ok))]
        left.bar(xs, [r["better_answer_rate"][model] for r in ok], width, label=model)
    left.axhline(0.8, color="C2", ls="--", lw=1, label="DPO minimum")
    left.axhline(0.25, color="C1", ls=":", lw=1, label="SFT minimum")
    left.set(xticks=range(len(ok)), xticklabels=seeds, xlabel="seed", ylabel="better-answer rate", ylim=(0, 1))
    left.legend(fontsize=7, ncol=2)
    right.plot(seeds, [r["dpo_reward_accuracy"] for r in ok], "o-", label="DPO held-out reward accuracy")
    right.plot(seeds, [r["sft_loss_last"] / r["sft_loss_first"] for r in ok], "s-", label="SFT loss last / first")
    right.axhline(0.9, color="C0", ls="--", lw=1)
    right.axhline(0.5, color="C1", ls="--", lw=1)
    right.set(xlabel="seed", ylim=(0, 1.05))
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle("smoke recipe, one fresh run per seed (dashed: the criteria)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"min": ordered[0], "median": ordered[len(ordered) // 2], "max": ordered[-1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--jobs", type=int, default=2, help="seeds run at once (one CPU thread each)")
    parser.add_argument("--out", type=Path, default=RESULTS / "smoke-seeds.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(one_seed()))
        return 0
    if not args.seeds:
        parser.error("--seeds is required")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smoke-seeds-") as work, ThreadPoolExecutor(args.jobs) as pool:
        records = list(pool.map(lambda s: run_seed(s, Path(work)), args.seeds))
    for r in records:
        print(r["seed"], r.get("better_answer_rate"), r.get("dpo_reward_accuracy"), r["failures"] or "ok")
    ok, env = [r for r in records if "better_answer_rate" in r], environment()
    result = {
        **env,
        "machine": f"{env['machine']}, one thread per seed",
        "wall_seconds": round(time.perf_counter() - start),
        "seeds": args.seeds,
        "all_pass": all(not r["failures"] for r in records),
        "spread": {f"better_answer_rate_{m}": spread([r["better_answer_rate"][m] for r in ok]) for m in MODELS}
        | {"dpo_reward_accuracy": spread([r["dpo_reward_accuracy"] for r in ok])}
        if ok
        else {},
        "records": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if ok:
        plot(records, args.out.with_suffix(".png"))
    print(f"{args.out}: all pass = {result['all_pass']}")
    return 0 if result["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
