"""Training speed and peak GPU memory: the project's SFT and DPO stages against three references, on one GPU.

Every path runs in its own process, one after the other, on the same data (the shapes world: random weights with
Llama-3.1-8B's exact shapes, synthetic data with realistic, varied lengths; see `benchmarks/shapes.py`):

| path | what it is |
|---|---|
| `project_sft` | `helpers.training.build_sft`: notebook 03's stage, the full profile's settings |
| `plain_unsloth_loop` | the same model and LoRA, a bare PyTorch loop on full fixed-length batches of random tokens |
| `unsloth_trl_defaults_sft` | Unsloth + TRL `SFTTrainer`, default settings: batch 2, no packing, shuffled |
| `hf_peft_bnb_sft` | the project's SFT path with `backend="hf"`: transformers + peft + bitsandbytes, no Unsloth |
| `project_dpo` | `helpers.training.ProjectDPOTrainer` on fresh adapters, the full profile's settings (length-grouped) |
| `unsloth_trl_defaults_dpo` | Unsloth + TRL `DPOTrainer`, default settings: batch 2, shuffled |
| `project_dpo_2048_b2`, `project_dpo_b32` | the project's DPO at `max_length` 2048 and batch 2; with 32 pairs a batch |
| `project_dpo_two_epochs`, `project_dpo_precompute` | two epochs without and with `precompute_ref_log_probs` |

The project's paths are wrapped in `helpers.training.Stage` (its callbacks and library fixes), as the notebooks'
stages are. DPO starts from fresh adapters rather than a trained SFT adapter: a step costs the same. The reference
paths load the model as the project does (`model.load_for_training`) and change only what their name says.

Counted: real (non-padding) tokens, padded tokens and DPO pairs, over whole steps, end to end (data loading, the
optimizer, logging; for DPO the reference forward). Warm-up is excluded, by mode: `budget` times the steps after
the first few, up to a time budget; `warm_then_epoch` first trains on a few rows (compilation), then times one
whole epoch over a fixed set, so every measured path sees exactly the same examples, all of them; `two_epochs`
times the second of two epochs. Peak memory is `torch.cuda.max_memory_allocated` (and reserved) over the timed
steps and one more optimizer step on copies of the longest example (the worst batch the data can make).

    python benchmarks/shapes.py --out /tmp/shapes-world --model   # on the GPU machine (random 8B weights, ~1 min)
    python benchmarks/bench_training.py --world /tmp/shapes-world --out benchmarks/results/NAME.json --paths ...
    python benchmarks/report.py                                     # the tables, into benchmarks/README.md

`--repeats N` runs every path N times, interleaved (round 1 of every path, then round 2, ...): each path's record is
its median run, with the median and range of its rates and every run under `repeats`, and report.py judges targets
on the medians. `--resume` keeps the runs the `--out` file holds and runs only the missing ones, in the same order,
on the same world, recording the date and command of every sitting under `sittings`.

`--tiny` runs the same code on a CPU in about a minute, every path in this process: the smoke world's model and
data under the full profile's settings, with the hf backend; it checks the code, nothing more:

    python benchmarks/bench_training.py --tiny --out t.json --repeats 3 --paths project_dpo unsloth_trl_defaults_dpo
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

GIB = 1024**3
# Rows of each dataset the benchmark reads (the same rows for every path of a stage). SFT paths run on a time
# budget after a few warm-up steps: packed and shuffled batches vary little from step to step. DPO paths first
# train on a few rows (compilation), then time one whole epoch over the same fixed set of pairs.
SFT_ROWS, DPO_ROWS, DPO_WARM_ROWS = 1200, 240, 32
PATHS: dict[str, dict] = {
    "project_sft": {"kind": "project_sft", "mode": "budget", "warmup": 6, "budget_s": 25},
    "plain_unsloth_loop": {"kind": "plain_loop", "warmup": 3, "steps": 8},
    "hf_peft_bnb_sft": {"kind": "project_sft", "backend": "hf", "mode": "budget", "warmup": 2, "budget_s": 25},
    "unsloth_trl_defaults_sft": {"kind": "defaults_sft", "mode": "budget", "warmup": 8, "budget_s": 20},
    "project_dpo_2048_b2": {
        "kind": "project_dpo",
        "mode": "budget",
        "warmup": 4,
        "budget_s": 12,
        "rows": 600,
        "dpo": {"max_length": 2048, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1},
    },
    "project_dpo": {"kind": "project_dpo", "mode": "warm_then_epoch"},
    "unsloth_trl_defaults_dpo": {"kind": "defaults_dpo", "mode": "warm_then_epoch"},
    "project_dpo_b32": {
        "kind": "project_dpo",
        "mode": "warm_then_epoch",
        "dpo": {"per_device_train_batch_size": 32, "gradient_accumulation_steps": 1},
    },
    # Two epochs with and without the reference's log-probs computed once before training (TRL does it while the
    # trainer is built: `build_s`), to see after how many epochs the pass pays.
    "project_dpo_two_epochs": {"kind": "project_dpo", "mode": "two_epochs"},
    "project_dpo_precompute": {"kind": "project_dpo", "mode": "two_epochs", "dpo": {"precompute_ref_log_probs": True}},
}
# --tiny: the smoke world's model and data under the full profile's settings, hf backend, every path in this
# process. These values replace the paths' own.
TINY = {"world": "smoke", "backend": "hf", "rows": 64, "warm_rows": 8, "warmup": 1, "budget_s": 1, "steps": 2}
PACKAGES = ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "unsloth_zoo", "accelerate", "datasets")


# --- measuring --------------------------------------------------------------------------------------------


def cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
    }


def make_meter(trainer, pad_id: int, mode: str, warmup: int, budget_s: float):
    """Count real tokens and rows of every micro-batch and time every micro-step (a `TrainerCallback`)."""
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self):
            self.counts: list[tuple[int, int, int]] = []  # (real tokens, rows, padded tokens) per micro-batch
            self.ends: list[float] = []  # time at the end of each micro-step
            self.epoch_starts: list[int] = []
            self.train_starts: list[tuple[int, float]] = []  # (micro-steps so far, time) at each train() call
            self.start = None

        def on_train_begin(self, args, state, control, **kwargs):
            cuda_sync()
            self.train_starts.append((len(self.ends), time.perf_counter()))
            if self.start is None:
                self.start = self.train_starts[0][1]

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.epoch_starts.append(len(self.ends))

        def mark(self):
            cuda_sync()
            self.ends.append(time.perf_counter())

        def on_substep_end(self, args, state, control, **kwargs):
            self.mark()

        def on_step_end(self, args, state, control, **kwargs):
            self.mark()
            first = self.first_measured()
            if mode == "budget" and first is not None and self.ends[-1] - self.ends[first - 1] > budget_s:
                control.should_training_stop = True

        def first_measured(self) -> int | None:
            """Index of the first measured micro-step (the ones before it are warm-up)."""
            if mode == "two_epochs":
                return self.epoch_starts[1] if len(self.epoch_starts) > 1 else None
            if mode == "warm_then_epoch":
                return self.train_starts[1][0] if len(self.train_starts) > 1 else None
            return warmup if len(self.ends) > warmup else None

        def measure_start(self, first: int) -> float:
            """When measuring starts: the second train() call itself (end to end), else the warm-up's last step."""
            return self.train_starts[1][1] if mode == "warm_then_epoch" else self.ends[first - 1]

    meter = Meter()
    original = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        ids = inputs["input_ids"]
        meter.counts.append((int((ids != pad_id).sum()), int(ids.shape[0]), int(ids.numel())))
        return original(model, inputs, *args, **kwargs)

    trainer.training_step = training_step
    trainer.callback_handler.callbacks.insert(0, meter)
    return meter


def summarize(meter, stage: str) -> dict:
    """Rates over the measured micro-steps (pairs = rows / 2 for DPO, whose batches hold chosen then rejected)."""
    first = meter.first_measured()
    n = min(len(meter.ends), len(meter.counts))
    if first is None or first >= n:
        raise RuntimeError(f"nothing measured: {n} micro-steps ran, warm-up needs {first}")
    start = meter.measure_start(first)
    seconds = meter.ends[n - 1] - start
    tokens, rows, padded = (sum(c[i] for c in meter.counts[first:n]) for i in range(3))
    steps = [meter.ends[i] - (meter.ends[i - 1] if i else meter.start) for i in range(n)]
    result = {
        "measured_micro_steps": n - first,
        "warmup_micro_steps": first,
        "measured_s": round(seconds, 2),
        "real_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "padded_tokens": padded,
        "real_token_share": round(tokens / padded, 4),
        "warmup_s": round(start - meter.start, 2),
        "micro_steps": [[round(s, 3), *c] for s, c in zip(steps, meter.counts, strict=False)][:300],
    }
    if stage == "dpo":
        result["pairs"] = rows // 2
        result["pairs_per_s"] = round(rows / 2 / seconds, 3)
    return result


def probe_longest(trainer, batch_size: int) -> dict:
    """One more optimizer step through `trainer.train()` (so with training's own memory savings), on copies of the
    longest example only: the worst batch for memory, its peak reported on its own."""
    d = trainer.train_dataset
    if "chosen_ids" in d.column_names:  # a pair's length as the grouping sampler measures it
        pairs = zip(d["prompt_ids"], d["chosen_ids"], d["rejected_ids"], strict=True)
        lengths = [len(p) + max(len(c), len(r)) for p, c, r in pairs]
    else:
        lengths = [len(ids) for ids in d["input_ids"]]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    trainer.train_dataset = d.select([longest] * batch_size * trainer.args.gradient_accumulation_steps)
    trainer.args.max_steps = 1
    reset_peak()
    start = time.perf_counter()
    trainer.train()
    cuda_sync()
    return {
        "probe_tokens_per_row": lengths[longest],
        "probe_rows": batch_size,
        "probe_s": round(time.perf_counter() - start, 2),
        "probe_peak": peak_gib(),
    }


# --- the paths --------------------------------------------------------------------------------------------


def bench_profile(world: Path, spec: dict, tmp: Path):
    """The full profile on the shapes world, with the path's rows, epochs and settings, no checkpoints and no
    evaluation during training."""
    from shapes import shapes_profile  # benchmarks/shapes.py: this script's folder is first on sys.path

    from helpers.settings import full_profile, override, smoke_profile

    backend = spec.get("backend", "unsloth")
    if spec.get("world") == "smoke":  # --tiny
        smoke = smoke_profile(42, backend)
        profile = override(full_profile(42, backend), {"model_id": smoke.model_id, "data": asdict(smoke.data)}, "tiny")
    else:
        profile = shapes_profile(world, backend=backend)
    common = dict(num_train_epochs=2 if spec.get("mode") == "two_epochs" else 1, max_steps=-1, save_steps=10**9)
    rows = dict(max_sft_rows=spec.get("rows", SFT_ROWS), max_preference_rows=spec.get("rows", DPO_ROWS))
    return replace(
        profile,
        data=replace(profile.data, **rows),
        sft=replace(profile.sft, **common, eval_steps=10**9, **spec.get("sft", {})),
        dpo=replace(profile.dpo, **common, **spec.get("dpo", {})),
        report_to_wandb=False,
        outputs_root=str(tmp),
    )


def sft_stage(profile):
    """Notebook 03's stage (`training.build_sft`)."""
    from helpers import training

    return training.build_sft(profile)


def dpo_stage(profile):
    """Notebook 04's stage on fresh adapters (`training.build_dpo` would train SFT first); `notes["build_s"]`: the
    trainer's construction, which holds the reference pass when it is precomputed."""
    from helpers import data, model, training
    from helpers.settings import dpo_config

    policy, tokenizer = model.load_for_training(profile, max(2048, profile.dpo.max_length))
    pairs = data.preference_data(profile, tokenizer)
    start = time.perf_counter()
    trainer = training.ProjectDPOTrainer(
        model=policy, ref_model=None, args=dpo_config(profile), train_dataset=pairs.train, processing_class=tokenizer
    )
    return training.Stage(profile, "dpo", trainer, pairs, notes={"build_s": round(time.perf_counter() - start, 2)})


def run_trainer(trainer, spec: dict, stage: str) -> dict:
    """Train with the meter attached; then probe the longest batch. Returns rates, memory and the final loss."""
    pad_id = trainer.processing_class.pad_token_id
    meter = make_meter(trainer, pad_id, spec.get("mode", "budget"), spec.get("warmup", 3), spec.get("budget_s", 60))
    reset_peak()
    if spec.get("mode") == "warm_then_epoch":  # warm-up (compilation) on a few rows, then one timed epoch
        full = trainer.train_dataset
        trainer.train_dataset = full.select(range(min(len(full), spec.get("warm_rows", DPO_WARM_ROWS))))
        trainer.train()
        trainer.train_dataset = full
    output = trainer.train()
    result = summarize(meter, stage)
    result |= {
        "train_loss": round(float(output.training_loss), 4),
        "optimizer_steps": trainer.state.global_step,
        "train_rows": len(trainer.train_dataset),
        "timed_peak": peak_gib(),
        **peak_gib(),
    }
    try:
        result.update(probe_longest(trainer, trainer.args.per_device_train_batch_size))
        for key, value in result["probe_peak"].items():
            result[key] = max(result.get(key, 0), value)
    except Exception as e:  # the probe is extra evidence; the rates stand without it
        traceback.print_exc()
        result["probe_error"] = f"{type(e).__name__}: {e}"[:1000]
    return result


def path_project(world: Path, spec: dict, tmp: Path) -> dict:
    profile, stage = bench_profile(world, spec, tmp), spec["kind"].removeprefix("project_")
    built = sft_stage(profile) if stage == "sft" else dpo_stage(profile)
    result = run_trainer(built.trainer, spec, stage) | built.notes
    names = ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length")
    extra = ("packing",) if stage == "sft" else ("train_sampling_strategy", "precompute_ref_log_probs")
    result["settings"] = {k: getattr(getattr(profile, stage), k) for k in names + extra}
    return result


def path_plain_loop(world: Path, spec: dict, tmp: Path) -> dict:
    """A bare loop: random tokens, full batches of `batch` × `length`, AdamW 8-bit. The ceiling to compare with."""
    import bitsandbytes as bnb
    import torch

    from helpers.model import load_for_training

    profile = bench_profile(world, spec, tmp)
    batch = spec.get("batch", profile.sft.per_device_train_batch_size)
    length = spec.get("length", profile.sft.max_length)
    model, _ = load_for_training(profile, length)
    model.train()
    optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)
    reset_peak()
    times, losses = [], []
    for _ in range(spec["warmup"] + spec["steps"]):
        cuda_sync()
        start = time.perf_counter()
        ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device, generator=generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        cuda_sync()
        times.append(time.perf_counter() - start)
    measured = times[spec["warmup"] :]
    tokens = batch * length * len(measured)
    return {
        "measured_micro_steps": len(measured),
        "warmup_micro_steps": spec["warmup"],
        "measured_s": round(sum(measured), 2),
        "real_tokens": tokens,
        "tokens_per_s": round(tokens / sum(measured), 1),
        "micro_steps": [[round(t, 3), batch * length, batch, batch * length] for t in times],
        "train_loss": round(sum(losses) / len(losses), 4),
        "settings": {"batch": batch, "length": length, "optimizer": "bnb AdamW8bit"},
        **peak_gib(),
    }


def path_defaults(world: Path, spec: dict, tmp: Path) -> dict:
    """Unsloth + TRL as their notebooks start: TRL's config defaults (DPO: max_length 1024, shuffled) but batch 2 and
    for SFT max_length 2048; DPO's reference is TRL's own adapter copy."""
    import torch

    from helpers import data, fixes
    from helpers.model import load_for_training

    profile = bench_profile(world, spec, tmp)
    model, tokenizer = load_for_training(profile, 2048)
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    fixes.install_cpu_logprob_fallback()  # TRL's log-prob kernel is Triton only
    common = dict(output_dir=str(tmp / "defaults"), per_device_train_batch_size=2, save_strategy="no", report_to=[])
    common |= dict(bf16=torch.cuda.is_available(), seed=42)
    if spec["kind"] == "defaults_sft":
        config = SFTConfig(**common, max_length=2048, num_train_epochs=profile.sft.num_train_epochs)
        rows = data.sft_data(profile, tokenizer).train
        trainer = SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer)
        stage, packing = "sft", config.packing
    else:
        config = DPOConfig(**common, num_train_epochs=profile.dpo.num_train_epochs)
        rows = data.preference_data(profile, tokenizer).train
        trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=rows, processing_class=tokenizer)
        stage, packing = "dpo", False
    result = run_trainer(trainer, spec, stage)
    result["settings"] = {"per_device_train_batch_size": 2, "max_length": config.max_length, "packing": packing}
    result["settings"]["train_sampling_strategy"] = config.train_sampling_strategy
    return result


KINDS = {
    "project_sft": path_project,
    "project_dpo": path_project,
    "plain_loop": path_plain_loop,
    "defaults_sft": path_defaults,
    "defaults_dpo": path_defaults,
}


def worker(name: str, spec: dict, world: Path, result_file: Path) -> int:
    """Run one path (in this process) and write its result as JSON."""
    from helpers import settings

    if spec.get("backend", "unsloth") == "unsloth":
        settings.import_unsloth()  # first: it patches transformers, peft and trl
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        try:
            result = {"status": "ok", **KINDS[spec["kind"]](world, spec, Path(tmp))}
        except Exception as e:
            traceback.print_exc()
            result = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000], **peak_gib()}
    result["spec"] = spec
    result["process_s"] = round(time.perf_counter() - started, 1)
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    return 0


# --- the whole run ----------------------------------------------------------------------------------------


def environment() -> dict:
    """Machine, GPU, versions, date and command: what a reader needs to trust or repeat the numbers."""
    import torch

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    versions["torch_runtime"] = torch.__version__
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "name": props.name,
            "memory_gib": round(props.total_memory / GIB, 1),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "driver": _nvidia_smi("driver_version"),
        }
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu['name'] if gpu else 'no GPU'}",
        "python": platform.python_version(),
        "gpu": gpu,
        "cpu_count": os.cpu_count(),
        "versions": versions,
    }


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def run_path(name: str, spec: dict, world: Path, timeout_s: int, in_process: bool) -> dict:
    """One run of a path: in a fresh process (on a GPU every path gets the GPU to itself), or in this one."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = Path(f.name)
    if in_process:
        worker(name, spec, world, result_file)
    else:
        command = [sys.executable, __file__, "--worker", name, "--spec", json.dumps(spec), "--world", str(world)]
        try:
            subprocess.run([*command, "--result", str(result_file)], timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            result_file.unlink(missing_ok=True)
            return {"status": "timeout", "timeout_s": timeout_s, "spec": spec}
    result = json.loads(result_file.read_text()) if result_file.stat().st_size else {"status": "no result"}
    result_file.unlink(missing_ok=True)
    return result


RATES = ("tokens_per_s", "pairs_per_s")


def combine(runs: list[dict]) -> dict:
    """One record for the repeats of a path: the repeat with the median rate (its index is `median_repeat`), the
    median and range of each rate, and every repeat (without its step times). A single run is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    ok = [r for r in runs if r.get("status") == "ok" and "tokens_per_s" in r]
    brief = [{k: v for k, v in r.items() if k not in ("micro_steps", "spec")} for r in runs]
    if not ok:
        return {**runs[-1], "repeats": brief}
    key = "pairs_per_s" if "pairs_per_s" in ok[0] else "tokens_per_s"
    median = sorted(ok, key=lambda r: r[key])[(len(ok) - 1) // 2]  # the median run (the lower of two)
    record = dict(median)
    for rate in (r for r in RATES if r in record):
        values = [r[rate] for r in ok]
        record[rate] = round(statistics.median(values), 3)
        record[f"{rate}_range"] = [min(values), max(values)]
    if "peak_allocated_gib" in record:  # GPU runs
        record["peak_allocated_gib"] = max(r["peak_allocated_gib"] for r in ok)
    record["median_repeat"] = next(i for i, r in enumerate(runs) if r is median)
    record["repeats"] = brief
    return record


def earlier_runs(record: dict | None) -> list[dict]:
    """The runs a path's record in a written report holds (`combine`'s inverse): the median run gets its step
    times back, so a report continued with `--resume` holds what one sitting would have written."""
    if record is None:
        return []
    if "repeats" not in record:
        return [record]
    runs = [dict(r) for r in record["repeats"]]
    if "median_repeat" in record:
        runs[record["median_repeat"]] |= {k: record[k] for k in ("micro_steps", "spec") if k in record}
    return runs


def run_all(args: argparse.Namespace, world: Path, specs: dict, in_process: bool) -> dict:
    """Every path `args.repeats` times, interleaved (round 1 of every path, then round 2, ...), so a drift of the
    machine hits every path alike. `args.out` is rewritten after every run (a killed run keeps its part); with
    `args.resume` the runs it holds count, and only the missing ones run, in the same order."""
    stats, out, repeats = world / "stats.json", args.out, args.repeats
    report = {**environment(), "world": json.loads(stats.read_text()) if stats.exists() else {"folder": str(world)}}
    report["repeats"], report["paths"] = repeats, {}
    if args.resume and out.exists():
        earlier = json.loads(out.read_text())
        if earlier["world"] != report["world"]:
            raise SystemExit(f"{out} was measured on another world than {world}: resume only on the same one.")
        sittings = earlier.get("sittings", [{k: earlier[k] for k in ("date", "command")}])
        report = earlier | {"repeats": repeats, "sittings": [*sittings, {k: report[k] for k in ("date", "command")}]}
    runs = {name: earlier_runs(report["paths"].get(name)) for name in args.paths}
    for round_ in range(1, repeats + 1):
        for name in (n for n in args.paths if len(runs[n]) < round_):
            print(f"\n=== {name} (run {round_} of {repeats}) ===", flush=True)
            result = run_path(name, specs[name], world, args.timeout, in_process)
            runs[name].append(result)
            report["paths"][name] = combine(runs[name])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
            print(f"{name}: {json.dumps({k: v for k, v in result.items() if k not in ('micro_steps', 'spec')})}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, help="folder built by `python benchmarks/shapes.py`")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    parser.add_argument("--paths", nargs="*", default=list(PATHS), help=f"default: all of {', '.join(PATHS)}")
    parser.add_argument(
        "--set", action="append", default=[], metavar="PATH=JSON", help="override or add a path spec (JSON)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of every path, interleaved; medians reported")
    parser.add_argument("--resume", action="store_true", help="keep the runs --out holds; run only the missing ones")
    parser.add_argument("--tiny", action="store_true", help="check the code on a CPU: the smoke world, no --world")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per path")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        from helpers.smoke import build_smoke_world

        args.world = build_smoke_world(42)
    if args.world is None:
        parser.error("--world is required (or --tiny)")
    if args.worker:
        return worker(args.worker, json.loads(args.spec), args.world.resolve(), args.result)
    specs = PATHS | {name: json.loads(text) for name, _, text in (s.partition("=") for s in args.set)}
    unknown = [n for n in args.paths if n not in specs]
    if unknown or args.out is None:
        parser.error(f"--out is required; unknown paths {unknown}; known: {', '.join(specs)}")
    if args.tiny:
        specs = {name: spec | TINY for name, spec in specs.items()}
    report = run_all(args, args.world.resolve(), specs, in_process=args.tiny)
    failed = [n for n, r in report["paths"].items() if r.get("status") != "ok"]
    print(f"\nwrote {args.out}; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
