"""helpers.estimates: GPU classes, the rates read from the benchmark JSON, and the arithmetic of each estimate."""

from __future__ import annotations

import json
import statistics
from types import SimpleNamespace

import pytest

from helpers import estimates
from helpers.estimates import A100_40GB, GPU, H200, Rates

RATES = Rates(10_000.0, 5_000.0, 800.0, 8.5, 14.0, ("run.json",))


@pytest.mark.parametrize(
    ("name", "gib", "expected"),
    [
        ("NVIDIA H200", 139.8, "H200"),
        ("NVIDIA H100 80GB HBM3", 79.1, "H100"),
        ("NVIDIA A100-SXM4-80GB", 79.2, "A100 80 GB"),
        ("NVIDIA A100-SXM4-40GB", 39.4, "A100 40 GB"),
        ("NVIDIA L4", 22.0, "L4"),
    ],
)
def test_known_gpus_get_their_datasheet_class(name, gib, expected):
    gpu = estimates.classify(name, gib)
    assert gpu.name == expected and gpu.note == ""


def test_an_unknown_gpu_is_taken_for_an_a100_40gb_and_says_so():
    gpu = estimates.classify("NVIDIA L40S", 44.4)  # not an L4
    assert (gpu.bf16_tflops, gpu.memory_tb_s) == (A100_40GB.bf16_tflops, A100_40GB.memory_tb_s)
    assert gpu.note == "unknown GPU 'NVIDIA L40S': assumed as fast as an A100 40 GB"


def test_slowdown_is_the_larger_datasheet_ratio():
    assert H200.slowdown() == 1
    assert A100_40GB.slowdown() == pytest.approx(989 / 312)  # compute-bound end: 3.17 against 4.8 / 1.555 = 3.09
    assert GPU("memory-poor", 989, 1.2).slowdown() == 4


def bench_run(gpu: str, sft: float | None, dpo: float | None, peak: float = 10.0) -> dict:
    paths = {}
    if sft:
        paths["project_sft"] = {"status": "ok", "tokens_per_s": sft, "peak_allocated_gib": peak}
    if dpo:
        paths["project_dpo"] = {
            "status": "ok",
            "tokens_per_s": dpo,
            "real_tokens": 900 * 10,
            "pairs": 10,
            "peak_allocated_gib": peak + 5,
        }
    return {"gpu": {"name": gpu}, "paths": paths | {"unsloth_trl_defaults_dpo": {"status": "ok", "tokens_per_s": 1}}}


def test_rates_are_medians_over_h200_runs_of_the_projects_paths(tmp_path):
    runs = {
        "a.json": bench_run("NVIDIA H200", 11_000, 6_000, peak=8.0),
        "b.json": bench_run("NVIDIA H200", None, 5_000, peak=9.0),
        "c.json": bench_run("NVIDIA H200", None, 7_000, peak=7.0),
        "d.json": bench_run("NVIDIA A100-SXM4-40GB", 3_000, 2_000, peak=99.0),  # another GPU: ignored
        "e.json": {"notebooks": {}},  # not a benchmark run
        "f.json": {"gpu": {"name": "NVIDIA H200"}, "paths": {"project_sft": {"status": "error"}}},
        "g.json": {"gpu": {"name": "NVIDIA H200"}, "gpus": 2, "stage": "sft"},  # another kind of record
        "h.json": bench_run("NVIDIA H200", 20_000, 12_000) | {"gpus": 2},  # two GPUs: not this estimate's rate
    }
    for name, run in runs.items():
        (tmp_path / name).write_text(json.dumps(run))
    rates = estimates.measured_rates(tmp_path)
    assert rates == Rates(11_000, 6_000, 900.0, 8.0, 14.0, ("a.json", "b.json", "c.json"))


def test_rates_of_the_committed_runs_are_the_benchmarks_own_numbers():
    rates = estimates.measured_rates()
    runs = [json.loads((estimates.RESULTS / name).read_text())["paths"] for name in rates.runs]
    dpo = [paths["project_dpo"] for paths in runs if "project_dpo" in paths]
    sft = [paths["project_sft"] for paths in runs if "project_sft" in paths]
    assert rates.dpo_tokens_per_s == statistics.median(p["tokens_per_s"] for p in dpo)
    assert rates.sft_tokens_per_s == statistics.median(p["tokens_per_s"] for p in sft)
    assert len(dpo) >= 3 and rates.dpo_peak_gib == max(p["peak_allocated_gib"] for p in dpo)


def test_training_time_is_tokens_over_rate_times_slowdown():
    estimate = estimates.training("dpo", 1_000, 600.0, A100_40GB, RATES)
    assert estimate.seconds == pytest.approx(1_000 * 600 / 5_000 * 989 / 312)
    assert estimate.peak_gib == 14.0
    text = str(estimate)
    assert "\n" not in text and text.startswith("dpo: about 6 min, peak 14.0 GiB on A100 40 GB (1,000 rows × 600")


def test_no_estimate_on_a_cpu():
    assert str(estimates.training("sft", 10, 10.0, None, RATES)) == "sft: no estimate on CPU (smoke)"
    assert str(estimates.rl(10, 16, 100.0, 256, None, RATES)) == "rl: no estimate on CPU (smoke)"


def test_an_unknown_gpus_note_is_printed():
    gpu = estimates.classify("Mystery GPU", 48.0)
    assert str(estimates.training("sft", 10, 10.0, gpu, RATES)).endswith("assumed as fast as an A100 40 GB)")


def test_generation_takes_the_measured_decode_step_unless_reading_the_weights_takes_longer():
    rates = {16: 1_000.0, 64: 3_200.0}
    step_16, step_64 = 16 / 1_000, 64 / 3_200  # seconds a step at the measured batch sizes
    assert estimates.generation_s(64, 256, 16, A100_40GB, rates) == pytest.approx(4 * 256 * step_16)
    assert estimates.generation_s(64, 256, 64, A100_40GB, rates) == pytest.approx(256 * step_64)
    assert estimates.generation_s(3, 100, 1, H200, rates) == pytest.approx(3 * 100 * step_16)  # batch 1: 16's step
    slow = GPU("slow", 100, 0.2)  # 15 GB at 200 GB/s: 0.075 s a step
    assert estimates.generation_s(16, 10, 16, slow, rates) == pytest.approx(10 * 15 / 200)


def test_generation_rates_are_the_merged_samplers_measured_ones():
    assert estimates.generation_rates() == {64: 4636.3}  # benchmarks/results/h200-sampling.json


def test_rl_step_is_sampling_plus_training_and_scoring():
    estimate = estimates.rl(20, 16, 200.0, 256, A100_40GB, RATES)
    sampling = 256 * 64 / 4636.3  # a batch of 16 decodes at batch 64's step
    training = 16 * 456 * (1 / 5_000 + 1 / estimates.REWARD_TOKENS_PER_S) * A100_40GB.slowdown()
    assert estimate.seconds == pytest.approx(20 * (sampling + training))
    assert estimate.peak_gib == 52.6651  # notebook 06 in benchmarks/results/h200-main-job.json


def trainer(columns: dict, epochs: float = 1.0, max_steps: int = -1) -> SimpleNamespace:
    args = SimpleNamespace(
        num_train_epochs=epochs, max_steps=max_steps, per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    return SimpleNamespace(train_dataset=columns, args=args)


def test_before_training_reads_the_tokenized_rows():
    dpo = {"prompt_ids": [[1] * 10, [1] * 20], "chosen_ids": [[2] * 5, [2] * 7], "rejected_ids": [[3] * 9, [3] * 1]}
    estimate = estimates.before_training(trainer(dpo, epochs=3), "dpo", H200)
    # a pair's tokens as TRL batches it: the prompt twice, both answers: (2·10+5+9 + 2·20+7+1) / 2 = 41
    assert estimate.seconds == pytest.approx(3 * 2 * 41 / estimates.measured_rates().dpo_tokens_per_s)
    sft = {"input_ids": [[0] * 2048, [0] * 1000]}
    capped = estimates.before_training(trainer(sft, max_steps=5), "sft", H200)
    assert capped.seconds == pytest.approx(5 * 4 * 2 * 1524 / estimates.measured_rates().sft_tokens_per_s)


def test_decode_read_is_the_bf16_linear_layers_and_lm_head():
    from helpers.qlora import LLAMA_31_8B, linear_shapes

    linear = sum(i * o for i, o in linear_shapes(LLAMA_31_8B).values()) * LLAMA_31_8B.num_hidden_layers
    lm_head = LLAMA_31_8B.vocab_size * LLAMA_31_8B.hidden_size
    assert round(2 * (linear + lm_head) / 1e9, 1) == estimates.DECODE_READ_GB
