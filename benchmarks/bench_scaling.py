"""Data-parallel scaling: the project's SFT and DPO on 1 GPU and on several GPUs of one machine, in one run.

Each (stage, GPUs) case is its own `accelerate launch`: one process per GPU (accelerate's `PartialState`; each loads
the whole 4-bit model on its own GPU, `helpers.model.device_map`), gradients averaged by DDP after every step, the
trainers of `bench_training.py` (notebook 03's and 04's, the full profile's settings, on the shapes world of
`benchmarks/shapes.py`). The effective batch stays the profile's (`helpers.settings.split_batch`, through
`run_args`): DPO's 16 pairs × 2 accumulation on one GPU become 16 pairs on each of two; SFT's 8 packed rows become
4 on each of two. So every case takes the same optimizer steps on the same data.

Each process counts the real (non-padding) tokens and the pairs of its own micro-batches over the steps after the
warm-up (`bench_training.make_meter`); a case's rate is the sum over processes divided by the slowest process's
time. `scaling_vs_1gpu` is that rate over the one-GPU rate (tokens/s for SFT, pairs/s for DPO).

    python benchmarks/bench_scaling.py --world /tmp/shapes-world --out benchmarks/results/h200x2-scaling.json
    python benchmarks/bench_scaling.py --tiny --out /tmp/scaling.json   # the code on a CPU: 1 and 2 processes, gloo

(With `--tiny`, "gpus" counts CPU processes, and the rates say nothing: the check is that the code runs.)

The world (and its 8B-shaped model) is built first when `--world` holds none (a GPU, about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import bench_training  # benchmarks/: this script's folder is first on sys.path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TARGET_SCALING = 1.8  # issue 14: two GPUs should give at least this times one GPU's rate
WORLD_ROWS = 1300  # rows of each dataset when the world is built here (as benchmarks/gpu.sh builds it)
# Optimizer steps (not micro-steps): warm-up (compilation, allocator) then measured. Rows: enough for all steps.
CASES: dict[str, dict] = {
    "sft": {"rows": 1200, "warmup_steps": 3, "steps": 8},
    "dpo": {"rows": 400, "warmup_steps": 2, "steps": 4},
}
# --tiny: the smoke world's model and data under the full profile's settings, hf backend, a CPU.
TINY = {"world": "smoke", "backend": "hf", "rows": 1000, "warmup_steps": 1, "steps": 1}
RATE = {"sft": "tokens_per_s", "dpo": "pairs_per_s"}


# --- one process of a case --------------------------------------------------------------------------------


def worker(stage: str, world: Path, spec: dict, result_dir: Path) -> int:
    """Train `stage` for the spec's warm-up and measured steps in this process; write its counts as JSON."""
    import torch
    from accelerate import PartialState

    # First: join the launcher's process group, this process's GPU the current one. `cpu`: without GPUs, processes are
    # found only when asked for on the CPU (the Trainer asks so later, too late for `run_args` to split the batch).
    state = PartialState(cpu=not torch.cuda.is_available())
    from helpers import settings

    if spec["backend"] == "unsloth":
        settings.import_unsloth()  # before transformers, peft and trl: it patches them
    from transformers.trainer_utils import SaveStrategy

    profile = bench_training.bench_profile(world, spec, result_dir / "outputs")
    steps = spec["warmup_steps"] + spec["steps"]
    profile = replace(profile, **{stage: replace(getattr(profile, stage), max_steps=steps)})
    trainer = (bench_training.sft_stage if stage == "sft" else bench_training.dpo_stage)(profile).trainer
    trainer.args.save_strategy = SaveStrategy.NO  # the end-of-training checkpoint would only cost time
    warmup = spec["warmup_steps"] * trainer.args.gradient_accumulation_steps  # in micro-steps
    meter = bench_training.make_meter(trainer, trainer.processing_class.pad_token_id, "budget", warmup, float("inf"))
    bench_training.reset_peak()
    trainer.train()
    result = bench_training.summarize(meter, stage)
    result.pop("micro_steps")
    a = trainer.args
    result |= bench_training.peak_gib() | {
        "rank": state.process_index,
        "optimizer_steps": trainer.state.global_step,
        "per_device_train_batch_size": a.per_device_train_batch_size,
        "gradient_accumulation_steps": a.gradient_accumulation_steps,
        "effective_batch": a.per_device_train_batch_size * a.world_size * a.gradient_accumulation_steps,
    }
    (result_dir / f"rank{state.process_index}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


# --- the run ----------------------------------------------------------------------------------------------


def launch_command(stage: str, gpus: int, world: Path, spec: dict, result_dir: Path) -> list[str]:
    """`accelerate launch` of `gpus` processes of this script's worker (no config file: every flag given)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus)]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", "0"] + (["--multi_gpu"] if gpus > 1 else [])
    command += [__file__, "--worker", stage, "--world", str(world), "--spec", json.dumps(spec)]
    return command + ["--result", str(result_dir)]


def combine_ranks(ranks: list[dict], stage: str) -> dict:
    """One case's rates: the processes' counts summed, over the slowest process's measured time."""
    seconds = max(r["measured_s"] for r in ranks)
    record = {
        "measured_s": seconds,
        "optimizer_steps": ranks[0]["optimizer_steps"],  # warm-up included
        "real_tokens": sum(r["real_tokens"] for r in ranks),
        "tokens_per_s": round(sum(r["real_tokens"] for r in ranks) / seconds, 1),
    }
    if stage == "dpo":
        record["pairs"] = sum(r["pairs"] for r in ranks)
        record["pairs_per_s"] = round(record["pairs"] / seconds, 3)
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "effective_batch")
    record |= {k: ranks[0][k] for k in keys}
    if "peak_allocated_gib" in ranks[0]:
        record["peak_allocated_gib"] = max(r["peak_allocated_gib"] for r in ranks)
    return record | {"processes": [{k: v for k, v in r.items() if k not in keys} for r in ranks]}


def visible_gpus(gpus: int) -> dict[str, str]:
    """`CUDA_VISIBLE_DEVICES` showing the case only its first `gpus` GPUs (a single process that sees two would
    have the Trainer spread it over both with `nn.DataParallel`); nothing without GPUs."""
    import torch

    if not torch.cuda.is_available():
        return {}
    seen = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(torch.cuda.device_count())))
    return {"CUDA_VISIBLE_DEVICES": ",".join(seen.split(",")[:gpus])}


def run_case(stage: str, gpus: int, world: Path, spec: dict, timeout_s: int) -> dict:
    """One `accelerate launch` of the case; its record, or its status when it failed."""
    print(f"\n=== {stage} on {gpus} GPU(s) ===", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"scaling-{stage}-{gpus}-") as tmp:
        env = os.environ | {"TUTORIAL_BACKEND": spec["backend"], "TOKENIZERS_PARALLELISM": "false"}
        env |= visible_gpus(gpus)
        try:
            done = subprocess.run(launch_command(stage, gpus, world, spec, Path(tmp)), env=env, timeout=timeout_s)
            status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        except subprocess.TimeoutExpired:
            status = f"timeout after {timeout_s} s"
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    record = {"stage": stage, "gpus": gpus, "status": status, "process_s": round(time.perf_counter() - started, 1)}
    record["spec"] = spec
    if status == "ok" and len(ranks) == gpus:
        record |= combine_ranks(ranks, stage)
    elif status == "ok":
        record["status"] = f"{len(ranks)} of {gpus} processes wrote a result"
    return record


def add_scaling(records: list[dict]) -> None:
    """`scaling_vs_1gpu` of every measured record: its rate (tokens/s for SFT, pairs/s for DPO) over one GPU's."""
    for record in records:
        one = next((r for r in records if r["stage"] == record["stage"] and r["gpus"] == 1), {})
        rate = RATE[record["stage"]]
        if rate in record and rate in one:
            record["scaling_vs_1gpu"] = round(record[rate] / one[rate], 3)
            record["meets_target"] = record["gpus"] == 1 or record["scaling_vs_1gpu"] >= TARGET_SCALING


def ensure_world(world: Path) -> dict:
    """The shapes world's stats, building the world (with its 8B-shaped model) first when it has no model."""
    import shapes

    if not (world / shapes.MODEL_DIR / "config.json").exists():
        started = time.perf_counter()
        shapes.build_world(world, WORLD_ROWS, WORLD_ROWS, shape="llama-3.1-8b")
        print(f"world built in {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads((world / "stats.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, default=Path("/tmp/shapes-world"), help="the shapes world's folder")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPU counts to compare (first: 1)")
    parser.add_argument("--stages", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--backend", choices=("unsloth", "hf"), default="unsloth")
    parser.add_argument("--tiny", action="store_true", help="check the code on a CPU: the smoke world, processes")
    parser.add_argument("--timeout", type=int, default=200, help="seconds per case")
    parser.add_argument("--worker", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.world, json.loads(args.spec), args.result)
    if args.out is None:
        parser.error("--out is required")
    if args.gpus[0] != 1:
        parser.error("--gpus must start with 1: the other counts are compared with it")
    import torch

    if torch.cuda.is_available() and max(args.gpus) > torch.cuda.device_count():
        parser.error(f"--gpus asks for {max(args.gpus)} GPUs; this machine has {torch.cuda.device_count()}")
    if args.tiny:
        from helpers.smoke import build_smoke_world

        world, world_stats = build_smoke_world(42), {"world": "smoke"}
    else:
        world = args.world.resolve()
        world_stats = ensure_world(world)
    report = {**bench_training.environment(), "world": world_stats, "target_scaling_vs_1gpu": TARGET_SCALING}
    report["gpu_count"] = torch.cuda.device_count()
    report["records"] = []
    for stage in args.stages:
        spec = {"backend": args.backend, **CASES[stage]} | (TINY if args.tiny else {})
        for gpus in args.gpus:
            report["records"].append(run_case(stage, gpus, world, spec, args.timeout))
            add_scaling(report["records"])
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")  # rewritten after each case
            shown = {k: v for k, v in report["records"][-1].items() if k != "processes"}
            print(json.dumps(shown), flush=True)
    failed = [f"{r['stage']}×{r['gpus']}" for r in report["records"] if r["status"] != "ok"]
    print(f"\nwrote {args.out}; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
