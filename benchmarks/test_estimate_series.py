"""The series estimate: the committed one is current (same constants, profiles and README tables) and `quick` fits an
hour on the launchable's A100 40 GB; `MEASURED` is what the committed results give; and the result files a GPU run
adds (generation records, RL step splits, capped notebook peaks) take over where they exist."""

from __future__ import annotations

import json
import shutil

import estimate_series
import pytest

from helpers import machine

H100 = "NVIDIA H100 80GB HBM3"


def test_committed_estimate_is_current_and_quick_fits_an_hour():
    committed = json.loads(estimate_series.OUT.read_text())
    fresh = json.loads(json.dumps(estimate_series.estimate(), ensure_ascii=False))
    for key in ("estimated_for", "measured_on", "measured", "profiles", "quick_minutes_by_gpu"):
        assert committed[key] == fresh[key], f"run `python benchmarks/estimate_series.py` ({key} changed)"
    section = estimate_series.README.read_text().split(estimate_series.START)[1].split(estimate_series.END)[0]
    assert section.strip() == estimate_series.render(fresh).strip()
    assert fresh["estimated_for"]["name"] == "A100 40 GB"
    assert fresh["profiles"]["quick"]["total_minutes"] <= 60


def test_measured_constants_are_the_committed_results():
    fresh = estimate_series.constants()
    # `sources` names each number's files since this script writes the block; the block written before is one string.
    numbers = [k for k in fresh if k != "sources"]
    assert {k: fresh[k] for k in numbers} == {k: machine.MEASURED[k] for k in numbers}


def write(folder, name: str, content: dict) -> None:
    (folder / name).write_text(json.dumps(content))


@pytest.fixture
def results(tmp_path):
    """A results folder with the committed training runs and main job, and what a GPU run on an H100 adds."""
    for name in ("h200-run1.json", "h200-dpo-repeats.json", "h200-main-job.json", "h200-sampling.json"):
        shutil.copy(estimate_series.RESULTS / name, tmp_path)
    use = [
        {"path": "chat", "use": "chat", "batch": 1, "new_tokens_per_s": 90.0, "status": "ok", "gpu": H100},
        {"path": "greedy_answers", "use": "greedy_answers", "batch": 64, "new_tokens_per_s": 4000.0, "status": "ok"},
        {"path": "greedy_answers", "use": "greedy_answers", "batch": 32, "new_tokens_per_s": 2500.0, "status": "ok"},
        {"path": "sampler_lean", "batch": 64, "new_tokens_per_s": 2000.0, "status": "ok"},
    ]
    write(tmp_path, "generation.json", {"gpu": {"name": H100}, "records": use})
    seconds = {"sampling": 4.0, "reward_scoring": 0.5, "reference_and_kl_logps": 1.0, "policy_update": 2.5}
    split = {"seconds_per_step": 8.0, "seconds": seconds, "gpu": H100, "sampler": "lean", "memory_cap_gib": 38.8}
    write(tmp_path, "rl-step-capped.json", split | {"answers_a_step": 16, "max_completion_length": 256})
    write(tmp_path, "rl-step-uncapped.json", split | {"answers_a_step": 16, "max_completion_length": 256})
    for number, peak in (("03_sft", 9.5), ("04_dpo", 15.0), ("06_rlhf", 37.0)):
        write(tmp_path, f"capped-{number}.json", {"status": "passed", "peak_allocated_gib": peak, "gpu": H100})
    return tmp_path


def test_new_result_files_take_over_and_name_their_cards(results, tmp_path, monkeypatch):
    m = estimate_series.constants(results)
    assert m["sampler_new_tokens_per_s"] == {1: 90.0, 32: 2500.0, 64: 4000.0}  # `use` records only, by batch
    assert m["rl_step"]["sampler"] == "lean" and m["rl_step"]["seconds_per_step"] == 8.0  # the capped split
    assert m["reward_tokens_per_s"] == round(16 * (estimate_series.DPO_PROMPT.mean + 256) / 0.5, 1)
    assert m["peak_gib"] == {"sft": 9.5, "dpo": 15.0, "rl": 37.0}
    assert m["sources"]["peak_gib/rl"] == "capped-06_rlhf.json" and m["sources"]["rl_step"] == "rl-step-capped.json"
    assert m["sources"]["sampler_new_tokens_per_s"] == "generation.json"
    assert m["gpu"] == "NVIDIA H200" and m["sft_tokens_per_s"] == 11113.2  # training: still the H200 runs

    block = estimate_series.constants_block(m)
    assert max(map(len, block.splitlines())) <= 120
    namespace: dict = {}
    exec(block, namespace)
    assert namespace["MEASURED"] == m
    copy = tmp_path / "machine.py"
    copy.write_text(machine.__loader__.get_source(machine.__name__))
    assert estimate_series.write_constants(m, copy)
    assert block in copy.read_text() and not estimate_series.write_constants(m, copy)

    monkeypatch.setattr(machine, "MEASURED", m)
    report = estimate_series.estimate(results=results)
    assert report["measured_on"] == "H100/H200"
    assert "(estimated from H100/H200 measurements, `benchmarks/README.md`)" in estimate_series.sentence(report, "05")
    rows = report["profiles"]["quick"]["rows"]
    (rl,) = [r for r in rows if r["what"].startswith("RL: 20 steps")]
    # sampling as measured (an A100 reads the weights in less than its 4 s), the rest scaled from an H100 by datasheet
    assert rl["seconds"] == pytest.approx(20 * (4.0 + 4.0 * machine.A100_40GB.slowdown(machine.H100)))
    assert "measured on H100" in rl["rate"]
    (bench,) = [r for r in rows if r["what"].startswith("benchmark:")]
    assert bench["rows"] == 3 * 200 and bench["seconds"] == pytest.approx(-(-600 // 64) * 512 * 64 / 4000.0)
