"""The training benchmark's plumbing on a CPU: profiles on the shapes world, medians of interleaved repeats, and
(`--tiny`, the smoke world) the DPO comparison end to end, rendered by report.py with its ratio and spread."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

import bench_training
import pytest
import report
import shapes

from helpers.settings import full_profile


def test_bench_profile_is_the_full_profile_on_the_world_with_the_paths_settings(tmp_path):
    world = tmp_path / "world"
    spec = {"kind": "project_dpo", "mode": "two_epochs", "rows": 50, "dpo": {"per_device_train_batch_size": 4}}
    profile = bench_training.bench_profile(world, spec, tmp_path / "out")
    full = full_profile(42, "unsloth")
    assert profile.model_id == str(world.resolve() / shapes.MODEL_DIR)
    assert profile.data.sft_dataset == str(world.resolve() / shapes.SFT_FILE)
    assert profile.data.preference_dataset == str(world.resolve() / shapes.PREFERENCE_FILE)
    assert (profile.data.max_sft_rows, profile.data.max_preference_rows) == (50, 50)
    assert profile.sft == replace(full.sft, num_train_epochs=2, max_steps=-1, save_steps=10**9, eval_steps=10**9)
    assert profile.dpo == replace(full.dpo, num_train_epochs=2, max_steps=-1, save_steps=10**9, **spec["dpo"])
    assert not profile.report_to_wandb and profile.output_dir.parent == tmp_path / "out"


def run(pairs_per_s: float, status: str = "ok") -> dict:
    return {"status": status, "tokens_per_s": 100 * pairs_per_s, "pairs_per_s": pairs_per_s, "micro_steps": [[1]]}


def test_combine_reports_the_median_run_and_the_range():
    record = bench_training.combine([run(7.0), run(9.0), run(8.0), run(0, "error")])
    assert record["pairs_per_s"] == 8.0 and record["tokens_per_s"] == 800.0
    assert record["pairs_per_s_range"] == [7.0, 9.0]
    assert len(record["repeats"]) == 4 and "micro_steps" not in record["repeats"][0]
    assert record["median_repeat"] == 2 and record["micro_steps"] == run(8.0)["micro_steps"]
    assert bench_training.combine([run(5.0)]) == run(5.0)


def test_a_report_read_back_combines_to_itself_step_times_included():
    """What `--resume` relies on: the runs read back from a written record give that record again, so a file
    continued in a later sitting keeps the median run's step times."""
    runs = [run(7.0), run(9.0) | {"micro_steps": [[2]]}, run(8.0) | {"micro_steps": [[3]]}]
    record = json.loads(json.dumps(bench_training.combine(runs)))
    assert bench_training.earlier_runs(record)[2] == runs[2]
    assert bench_training.combine(bench_training.earlier_runs(record)) == record
    assert bench_training.earlier_runs(run(5.0)) == [run(5.0)] and bench_training.earlier_runs(None) == []


def test_round_ratios_pair_the_interleaved_runs():
    project = {"repeats": [run(8.0), run(6.0), run(9.0, "error")]}
    defaults = {"repeats": [run(4.0), run(4.0), run(3.0)]}
    assert report.round_ratios(project, defaults, "pairs_per_s") == [2.0, 1.5]


@pytest.mark.slow
def test_tiny_dpo_comparison_runs_interleaved_repeats_and_reports_the_ratio(tmp_path, monkeypatch):
    monkeypatch.setitem(bench_training.TINY, "rows", 32)
    out = tmp_path / "tiny.json"
    paths = ["project_dpo", "unsloth_trl_defaults_dpo"]
    assert bench_training.main(["--tiny", "--out", str(out), "--paths", *paths, "--repeats", "3"]) == 0
    result = json.loads(out.read_text())
    assert result["repeats"] == 3 and result["gpu"] is None
    for name in paths:
        path = result["paths"][name]
        rates = [r["pairs_per_s"] for r in path["repeats"]]
        assert len(rates) == 3 and path["pairs_per_s"] == round(statistics.median(rates), 3)
        assert path["pairs_per_s_range"] == [min(rates), max(rates)]
    assert result["paths"]["project_dpo"]["settings"]["train_sampling_strategy"] == "group_by_length"
    assert result["paths"]["unsloth_trl_defaults_dpo"]["settings"]["per_device_train_batch_size"] == 2
    (line,) = [row for row in report.target_rows(result) if row.startswith("| DPO pairs/s ≥ 2 ×")]
    assert "medians of 3 rounds, round by round" in line


@pytest.mark.slow
def test_resume_runs_only_the_missing_repeats_in_order(tmp_path, monkeypatch):
    monkeypatch.setitem(bench_training.TINY, "rows", 16)
    out, path = tmp_path / "tiny.json", "project_dpo"
    assert bench_training.main(["--tiny", "--out", str(out), "--paths", path, "--repeats", "1"]) == 0
    first = json.loads(out.read_text())
    assert bench_training.main(["--tiny", "--out", str(out), "--paths", path, "--repeats", "2", "--resume"]) == 0
    resumed = json.loads(out.read_text())
    runs = resumed["paths"][path]["repeats"]
    assert len(runs) == 2 and runs[0]["pairs_per_s"] == first["paths"][path]["pairs_per_s"]  # kept, not rerun
    assert resumed["sittings"][0] == {"date": first["date"], "command": first["command"]}
    assert len(resumed["sittings"]) == 2 and resumed["date"] == first["date"]
    # A third sitting with nothing missing runs nothing.
    assert bench_training.main(["--tiny", "--out", str(out), "--paths", path, "--repeats", "2", "--resume"]) == 0
    assert json.loads(out.read_text())["paths"][path]["repeats"] == runs


def test_readme_results_are_the_committed_runs_rendered():
    """The tables of benchmarks/README.md are `report.py`'s rendering of the committed runs, never typed by hand."""
    section = report.README.read_text().split(report.START)[1].split(report.END)[0]
    assert section.strip() == report.render(report.default_files()).strip(), "run `python benchmarks/report.py`"
    sittings = [{"date": "d1", "command": "c"}, {"date": "d2", "command": "c --resume"}]
    assert report.how_run({"command": "c", "sittings": sittings}) == (
        "command: `c`, in 2 sittings (d1, d2), the later ones with `--resume`"
    )
    assert (
        report.how_run({"command": "c", "sittings": sittings[:1]}) == report.how_run({"command": "c"}) == "command: `c`"
    )
