"""One training stage from the command line, on one GPU or data-parallel over the GPUs of one machine:

    python -m helpers.stages sft                                            # one process
    accelerate launch --multi_gpu --num_processes 2 -m helpers.stages sft   # two GPUs (DDP)
    accelerate launch --multi_gpu --num_processes 2 -m helpers.stages dpo   # then DPO, from the SFT adapter

Settings come from the `TUTORIAL_*` variables, as for the notebooks (`helpers.environment`), and the stage runs
the notebooks' code (`helpers.pipeline`). Each process loads the 4-bit model on its own GPU and trains on its
share of every batch; the gradients are averaged after each step. The effective batch (per-device batch ×
processes × accumulation) stays the profile's (`helpers.distributed.split_batch`), and so does the stage key:
the notebooks reuse an adapter trained here. One process writes the data splits, the W&B run, the adapter, the
plots and metrics.json.

Without GPUs, `--multi_gpu` starts the processes all the same and they train on the CPU through gloo (the tests
do that); accelerate's own `--cpu` flag starts a single process unless MPI is set up.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from helpers import distributed

STAGES = ("sft", "dpo", "rl")


def runner(stage: str) -> Callable[..., dict]:
    """The function that builds, trains, saves and records `stage`."""
    if stage == "rl":
        from helpers.rlhf import run_rl  # imports TRL's RLOO trainer: only when RL is asked for

        return run_rl
    from helpers.pipeline import STAGE_RUNNERS

    return STAGE_RUNNERS[stage]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.stages", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=STAGES, help="the stage to train (the ones before it are trained if missing)")
    stage = parser.parse_args(argv).stage
    distributed.start()  # before anything lands on a GPU: each process on its own

    from helpers.config import shown
    from helpers.environment import load_profile
    from helpers.pipeline import prepare

    profile = load_profile()
    s = getattr(profile, stage)
    processes = distributed.world_size()
    per_device, accumulation = distributed.split_batch(
        s.per_device_train_batch_size, s.gradient_accumulation_steps, processes
    )
    print(
        f"process {distributed.rank()} of {processes}: {stage}, backend {profile.backend}, effective batch "
        f"{per_device * processes * accumulation} = {per_device} per device × {processes} × {accumulation} "
        "accumulation",
        flush=True,
    )
    prepare(profile)
    result = runner(stage)(profile)
    if distributed.is_main_process():
        print(json.dumps(result, indent=1, default=str))
        print(f"{stage} adapter: {shown(profile.output_dir / f'{stage}-adapter')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
