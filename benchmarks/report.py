"""Turn benchmark JSON into the tables of benchmarks/README.md (between its `results` markers), never by hand.

    python benchmarks/report.py       # the runs of `RUNS`; or name the JSON files

Each JSON is one run (one machine, one command, the same data for every path). Targets are checked only between
paths of the same run; where paths were repeated (`bench_training.py --repeats`), between their medians, with the
range of the ratio round by round. The expected times of whole runs are `estimate_series.py`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"
RESULTS = Path(__file__).resolve().parent / "results"
GROUPING = RESULTS / "length_grouping_smoke.json"
RUNS = ("h200-run*.json", "h200-dpo-*.json")  # the single-GPU training benchmarks the README shows, in this order
START, END = "<!-- results:start -->", "<!-- results:end -->"
GROUPING_START, GROUPING_END = "<!-- grouping:start -->", "<!-- grouping:end -->"

DESCRIPTIONS = {
    "project_sft": "project SFT: notebook 03's trainer, full profile (packing 8 × 2048)",
    "plain_unsloth_loop": "plain Unsloth loop, full fixed-length batches 8 × 2048",
    "unsloth_trl_defaults_sft": "Unsloth + TRL `SFTTrainer` defaults (batch 2, shuffled)",
    "hf_peft_bnb_sft": "transformers + peft + bitsandbytes: project SFT with `backend=hf`",
    "project_dpo": "project DPO: notebook 04's trainer, full profile (16 pairs, grouped by length)",
    "project_dpo_b32": "project DPO with 32 pairs a batch (the candidate for 80 GB GPUs)",
    "unsloth_trl_defaults_dpo": "Unsloth + TRL `DPOTrainer` defaults (batch 2, shuffled)",
    "project_dpo_2048_b2": "project DPO at `max_length` 2048, batch 2 (16 GB GPU recipe)",
    "project_dpo_padded": "project DPO again, same settings (its padding-free hook never engaged): the spread",
    "sft_b8": "project SFT, packing 8 × 2048, flash-varlen attention",
    "sft_b8_no_flash_varlen": "the same without `enable_packed_flash_attention` (one SDPA per sequence)",
    "plain_8x2048": "plain Unsloth loop, 8 × 2048",
    "dpo_b16": "project DPO, 16 pairs grouped",
    "defaults_dpo": "Unsloth + TRL `DPOTrainer` defaults (batch 2, shuffled)",
    "project_dpo_two_epochs": "project DPO, two epochs (the second timed)",
    "project_dpo_precompute": "the same with `precompute_ref_log_probs` (its pass is in the trainer build)",
}

# (name, numerator path, denominator path or None, metric, bound, "min" or "max")
TARGETS = [
    ("SFT real tokens/s ≥ 0.95 × plain Unsloth loop", "project_sft", "plain_unsloth_loop", "tokens_per_s", 0.95, "min"),
    ("SFT real tokens/s ≥ 3 × transformers+peft+bnb", "project_sft", "hf_peft_bnb_sft", "tokens_per_s", 3.0, "min"),
    ("DPO pairs/s ≥ 2 × Unsloth+TRL defaults", "project_dpo", "unsloth_trl_defaults_dpo", "pairs_per_s", 2.0, "min"),
    ("(same, its repeat)", "project_dpo_padded", "unsloth_trl_defaults_dpo", "pairs_per_s", 2.0, "min"),
    ("DPO (24 GB setting) peak ≤ 16 GiB", "project_dpo", None, "peak_allocated_gib", 16.0, "max"),
    ("DPO max_length 2048, batch 2: peak ≤ 10 GiB", "project_dpo_2048_b2", None, "peak_allocated_gib", 10.0, "max"),
]


def fmt(value, digits=0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def path_table(run: dict) -> list[str]:
    lines = [
        "| path | real tokens/s | pairs/s | real / padded tokens | peak allocated (reserved) GiB | measured |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in run["paths"].items():
        if r.get("status") != "ok":
            lines.append(f"| `{name}` | {r.get('status')}: {r.get('error', '')[:80]} | | | | |")
            continue
        if "tokens_per_s" not in r:  # a correctness check, not a timed path
            continue
        # The first sweep probed the longest batch outside `train()` (no gradient checkpointing): show its timed peak.
        mem = r["timed_peak"] if "timed_peak" in r and "probe_peak" not in r else r
        peak = f"{fmt(mem.get('peak_allocated_gib'), 2)} ({fmt(mem.get('peak_reserved_gib'), 2)})"
        measured = f"{r['measured_micro_steps']} steps, {r['measured_s']} s"
        if r.get("spec", {}).get("mode") == "two_epochs" and "build_s" in r:  # warm-up: the first epoch
            whole = r["warmup_s"] + r["measured_s"] + r["build_s"]  # the build holds a precomputed reference pass
            first = f"first {r['warmup_s']} s, trainer build {r['build_s']} s"
            measured = f"second epoch: {measured}; {first}; all three {whole:.1f} s"
        if "repeats" in r:
            rate = "pairs_per_s" if "pairs_per_s" in r else "tokens_per_s"
            low, high = r[f"{rate}_range"]
            measured = f"median of {len(r['repeats'])} runs ({fmt(low, 2)} to {fmt(high, 2)}); {measured} in it"
        label = DESCRIPTIONS.get(name, name)
        pairs = fmt(r.get("pairs_per_s"), 2)
        share = fmt(r.get("real_token_share"), 2)
        lines.append(f"| `{name}`: {label} | {fmt(r['tokens_per_s'])} | {pairs} | {share} | {peak} | {measured} |")
    return lines


def target_rows(run: dict) -> list[str]:
    rows = []
    paths = run["paths"]
    for name, num, den, metric, bound, kind in TARGETS:
        if metric not in paths.get(num, {}) or (den and metric not in paths.get(den, {})):
            continue  # not run, failed, or (memory) not on a GPU
        value = paths[num][metric]
        if den:
            value = value / paths[den][metric]
            shown = f"{value:.2f}× ({fmt(paths[num][metric], 2)} / {fmt(paths[den][metric], 2)})"
            rounds = round_ratios(paths[num], paths[den], metric)
            if rounds:
                shown += f"; medians of {len(rounds)} rounds, round by round {min(rounds):.2f}× to {max(rounds):.2f}×"
        else:
            shown = f"{value:.2f} GiB"
        met = value >= bound if kind == "min" else value <= bound
        rows.append(f"| {name} | {shown} | {'met' if met else '**missed**'} |")
    return rows


def round_ratios(num: dict, den: dict, metric: str) -> list[float]:
    """The ratio of two repeated paths round by round (the runs were interleaved), where both rounds ran."""
    pairs = zip(num.get("repeats", []), den.get("repeats", []), strict=False)
    return [a[metric] / b[metric] for a, b in pairs if a.get("status") == b.get("status") == "ok"]


def default_files() -> list[Path]:
    return [f for pattern in RUNS for f in sorted(RESULTS.glob(pattern))]


def how_run(run: dict) -> str:
    """The command, and the sittings where `--resume` continued the run on the same machine and world."""
    sittings = run.get("sittings", [])
    if len(sittings) < 2:
        return f"command: `{run['command']}`"
    dates = ", ".join(s["date"] for s in sittings)
    return f"command: `{run['command']}`, in {len(sittings)} sittings ({dates}), the later ones with `--resume`"


def render(files: list[Path]) -> str:
    runs = [json.loads(f.read_text()) for f in files]
    out = []
    for f, run in zip(files, runs, strict=True):
        v = run["versions"]
        gpu = run["gpu"] or {}
        out += [
            f"### `{f.name}`: {gpu.get('name', 'no GPU')} ({gpu.get('memory_gib', '?')} GiB), {run['date']}",
            "",
            f"torch {v['torch_runtime']}, transformers {v['transformers']}, trl {v['trl']}, peft {v['peft']}, "
            f"bitsandbytes {v['bitsandbytes']}, unsloth {v['unsloth']}; driver {gpu.get('driver')}; {how_run(run)}",
            "",
            *path_table(run),
            "",
        ]
        targets = target_rows(run)
        if targets:
            out += ["| target (same run) | measured | |", "|---|---:|---|", *targets, ""]
    return "\n".join(out)


def grouping_table(path: Path = GROUPING) -> str:
    """Means over seeds of the smoke DPO runs with and without length grouping."""
    if not path.exists():
        return ""
    results = json.loads(path.read_text())
    rows = [
        "| DPO batching (smoke, mean of seeds " + ", ".join(results["seeds"]) + ") | final train loss "
        "| mean train loss, last quarter | held-out loss | held-out reward accuracy | held-out reward margin |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("grouped", "grouped by length"), ("shuffled", "shuffled pairs")):
        m = results["summary"][name]
        rows.append(
            f"| {label} | {m['final_train_loss_mean']:.4f} | {m['last_quarter_train_loss_mean']:.4f} "
            f"| {m['eval_loss_mean']:.4f} | {m['eval_reward_accuracy_mean']:.3f} | {m['eval_reward_margin_mean']:.3f} |"
        )
    return "\n".join(rows)


def replace_between(text: str, start: str, end: str, body: str) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"{README} lacks the {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", type=Path, nargs="*", help="default: the files of RUNS in results/")
    parser.add_argument("--print", action="store_true", help="print instead of updating README.md")
    args = parser.parse_args(argv)
    text = render(args.files or default_files())
    if args.print:
        print(text)
        return 0
    readme = replace_between(README.read_text(), START, END, text)
    readme = replace_between(readme, GROUPING_START, GROUPING_END, grouping_table())
    README.write_text(readme)
    print(f"updated {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
