"""Does the smoke recipe learn for any seed? Run the whole recipe for many seeds and check every criterion.

    .venv/bin/python benchmarks/smoke_seeds.py --seeds 100 101 102 103 104 105 106 107 108 109 --jobs 2

For each seed, in its own process (one thread), from a fresh smoke world and empty outputs: SFT, DPO and the
sampled comparison, exactly as `make run` does them (`helpers.pipeline`, `helpers.comparison`). Each seed's
numbers and the failures of `helpers.checks` go to `benchmarks/results/smoke-seeds.json`, with a plot of the
five numbers per seed (`smoke-seeds.png`). Exit status 1 when any seed fails a criterion.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

ONE_SEED = """
import json, sys, time
from helpers import checks, comparison, pipeline
from helpers.environment import load_profile
profile = load_profile()
start = time.perf_counter()
pipeline.prepare(profile)
sft, dpo = pipeline.run_sft(profile), pipeline.run_dpo(profile)
evaluation = comparison.sample_and_judge(profile)
from helpers.metrics import read_metrics
failures = checks.sft_failures(profile, sft) + checks.dpo_failures(profile, dpo)
failures += checks.eval_failures(profile, evaluation)
failures += checks.split_failures(read_metrics(profile)["splits"])
print("RESULT " + json.dumps({
    "seed": profile.seed,
    "sft_loss_first": sft["loss_first"], "sft_loss_last": sft["loss_last"],
    "dpo_reward_accuracy": dpo["reward_accuracy_after"], "step0_reward_abs_max": dpo["step0_reward_abs_max"],
    "better_answer_rate": {m: evaluation[m]["better_answer_rate"] for m in ("base", "sft", "dpo")},
    "style_shares": {m: evaluation[m]["style_shares"] for m in ("base", "sft", "dpo")},
    "correct_among_concise": {m: evaluation[m]["correct_among_concise"] for m in ("base", "sft", "dpo")},
    "splits": read_metrics(profile)["splits"],
    "failures": failures, "seconds": time.perf_counter() - start,
}))
"""


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
    done = subprocess.run([sys.executable, "-c", ONE_SEED], env=env, capture_output=True, text=True)
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
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--jobs", type=int, default=2, help="seeds run at once (one CPU thread each)")
    parser.add_argument("--out", type=Path, default=RESULTS / "smoke-seeds.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smoke-seeds-") as work, ThreadPoolExecutor(args.jobs) as pool:
        records = list(pool.map(lambda s: run_seed(s, Path(work)), args.seeds))
    for r in records:
        print(r["seed"], r.get("better_answer_rate"), r.get("dpo_reward_accuracy"), r["failures"] or "ok")
    ok = [r for r in records if "better_answer_rate" in r]
    import torch
    import transformers
    import trl

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, one thread per seed",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": "benchmarks/smoke_seeds.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_seconds": round(time.perf_counter() - start),
        "seeds": args.seeds,
        "all_pass": all(not r["failures"] for r in records),
        "spread": {
            f"better_answer_rate_{m}": spread([r["better_answer_rate"][m] for r in ok]) for m in ("base", "sft", "dpo")
        }
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
