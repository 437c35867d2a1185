"""Where one RL step's time goes, at notebook 06's shapes: sampling, reward scoring, the no-grad log-prob passes
(the policy's, and the reference's for the KL) and the policy update (`helpers.rl.time_parts`).

    python benchmarks/bench_rl_step.py --steps 5 --out benchmarks/results/rl-step.json

The profile comes from the environment, as for the notebooks (the GPU run script points it at the 8B-shapes world:
`benchmarks/gpu.sh`); the RL stage is `helpers.rl.build`'s, which notebook 06 builds in its cells. With random weights
no answer stops early, so every step samples the full `max_completion_length`: the worst case. The first step (the
sampler's merge and graph capture) is left out of the medians. Run it under `BENCH_MEMORY_CAP_GIB` (with
`benchmarks/cap` on PYTHONPATH) for the split on an A100 40 GB, where the sampler may have to run lean.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from helpers import settings

    profile = settings.load_profile()
    rl_settings = replace(profile.rl, max_steps=args.steps, eval_steps=10_000, logging_steps=1, save_steps=10_000)
    profile = replace(profile, rl=rl_settings, report_to_wandb=False)
    import torch

    from helpers import machine, rl, training

    machine.prepare(profile)
    training.ensure(profile, profile.rl.start_from)
    stage = rl.build(profile, *rl.load_reward_model(profile))
    parts = rl.time_parts(stage.trainer)
    torch.cuda.reset_peak_memory_stats()
    training.train_and_save(stage, resume=False)
    split = rl.step_split(stage, parts) | {
        "steps": args.steps,
        "answers_a_step": profile.rl.per_device_train_batch_size,
        "max_completion_length": profile.rl.max_completion_length,
        "reward_model": profile.reward_model_id,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "memory_cap_gib": float(os.environ["BENCH_MEMORY_CAP_GIB"]) if os.environ.get("BENCH_MEMORY_CAP_GIB") else None,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python benchmarks/bench_rl_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "trl", "peft")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(split, indent=1) + "\n")
    print(json.dumps(split, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
