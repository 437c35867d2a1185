"""helpers.machine: GPU classes and the arithmetic of each estimate (from the measured constants, which are the
benchmarks' own numbers), the checks before anything heavy (GPU, bf16, token), and the memory preflight on a CPU with
a faked card: free memory within the allocator's cap, a stop naming the setting to change."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from helpers import machine
from helpers.machine import A100_40GB, GIB, GPU, H200, MEASURED, Estimate, PreflightError, check_environment
from helpers.settings import PROJECT_ROOT, full_profile, smoke_profile

RESULTS = PROJECT_ROOT / "benchmarks" / "results"

# --- GPU classes and estimates --------------------------------------------------------------------------------


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
    gpu = machine.classify(name, gib)
    assert gpu.name == expected and gpu.note == ""


def test_an_unknown_gpu_is_taken_for_an_a100_40gb_and_says_so():
    gpu = machine.classify("NVIDIA L40S", 44.4)  # not an L4
    assert (gpu.bf16_tflops, gpu.memory_tb_s) == (A100_40GB.bf16_tflops, A100_40GB.memory_tb_s)
    assert gpu.note == "unknown GPU 'NVIDIA L40S': assumed as fast as an A100 40 GB"


def test_slowdown_is_the_larger_datasheet_ratio():
    assert machine.MEASURED_ON == H200 and H200.slowdown() == 1
    assert A100_40GB.slowdown() == pytest.approx(989 / 312)  # compute-bound end: 3.17 against 4.8 / 1.555 = 3.09
    assert GPU("memory-poor", 989, 1.2).slowdown() == 4


def test_measured_constants_are_the_benchmarks_own_numbers():
    """The constants are medians over the one-H200 runs they name of the project's own SFT and DPO paths (peaks: the
    largest), the rates of `generation.generate` by batch (`generation.json`), and the RL peak of the main job."""
    sources = MEASURED["sources"]
    runs = [json.loads((RESULTS / name).read_text()) for name in sources["dpo_tokens_per_s"].split(", ")]
    assert all("H200" in run["gpu"]["name"] and run.get("gpus", 1) == 1 for run in runs)
    paths = [run["paths"] for run in runs if isinstance(run["paths"], dict)]
    dpo = [p["project_dpo"] for p in paths if p.get("project_dpo", {}).get("status") == "ok"]
    assert len(dpo) >= 3 and MEASURED["gpu"] == "NVIDIA H200"
    assert MEASURED["dpo_tokens_per_s"] == pytest.approx(statistics.median(p["tokens_per_s"] for p in dpo))
    assert MEASURED["peak_gib"]["dpo"] == max(p["peak_allocated_gib"] for p in dpo)
    sft = json.loads((RESULTS / sources["sft_tokens_per_s"]).read_text())["paths"]["project_sft"]
    assert (MEASURED["sft_tokens_per_s"], MEASURED["peak_gib"]["sft"]) == (
        sft["tokens_per_s"],
        sft["peak_allocated_gib"],
    )
    generation = json.loads((RESULTS / sources["sampler_new_tokens_per_s"]).read_text())["records"]
    rates = {r["batch"]: r["new_tokens_per_s"] for r in generation if r.get("use") and r["status"] == "ok"}
    assert MEASURED["sampler_new_tokens_per_s"] == rates and min(rates.values()) >= 2_000  # issue 22's target
    main_job = json.loads((RESULTS / sources["peak_gib/rl"]).read_text())
    assert MEASURED["peak_gib"]["rl"] == round(main_job["metrics"]["rlhf"]["peak_memory_gib"], 2)


def test_training_time_is_tokens_over_rate_times_slowdown():
    seconds, basis = machine.training_s("dpo", 1_000, 600.0, A100_40GB)
    assert seconds == pytest.approx(1_000 * 600 / MEASURED["dpo_tokens_per_s"] * 989 / 312)
    text = str(Estimate("dpo", A100_40GB, seconds, MEASURED["peak_gib"]["dpo"], basis))
    assert "\n" not in text and text.startswith(
        "dpo: about 5 min, peak 14.0 GiB on A100 40 GB (1,000 rows × 600 tokens ÷ 6,070"
    )


def trainer(columns: dict, epochs: float = 1.0, max_steps: int = -1, **args) -> SimpleNamespace:
    arguments = dict(
        num_train_epochs=epochs, max_steps=max_steps, per_device_train_batch_size=4, gradient_accumulation_steps=2
    )
    return SimpleNamespace(train_dataset=columns, args=SimpleNamespace(**(arguments | args)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="reads the machine from torch: needs a CPU-only host")
def test_no_estimate_on_a_cpu():
    assert str(machine.estimate(trainer({}), "sft")) == "sft: no estimate on CPU (smoke)"
    assert str(machine.estimate(trainer({}), "rl")) == "rl: no estimate on CPU (smoke)"


def test_an_unknown_gpus_note_is_printed():
    gpu = machine.classify("Mystery GPU", 48.0)
    estimate = machine.estimate(trainer({"input_ids": [[0] * 10]}), "sft", gpu)
    assert str(estimate).endswith("assumed as fast as an A100 40 GB)")


def test_generation_takes_the_measured_decode_step_unless_reading_the_weights_takes_longer(monkeypatch):
    monkeypatch.setitem(MEASURED, "sampler_new_tokens_per_s", {16: 1_000.0, 64: 3_200.0})
    step_16, step_64 = 16 / 1_000, 64 / 3_200  # seconds a step at the measured batch sizes
    assert machine.generation_s(64, 256, 16, A100_40GB) == pytest.approx(4 * 256 * step_16)
    assert machine.generation_s(64, 256, 64, A100_40GB) == pytest.approx(256 * step_64)
    assert machine.generation_s(3, 100, 1, H200) == pytest.approx(3 * 100 * step_16)  # batch 1: 16's step
    slow = GPU("slow", 100, 0.2)  # 15 GB at 200 GB/s: 0.075 s a step
    assert machine.generation_s(16, 10, 16, slow) == pytest.approx(10 * 15 / 200)


def test_rl_step_is_sampling_plus_training_and_scoring():
    prompts = [[{"role": "user", "content": "q"}]] * 3
    tokenizer = SimpleNamespace(apply_chat_template=lambda p, **kwargs: {"input_ids": [0] * 200})
    rl = trainer({"prompt": prompts}, max_steps=20, max_completion_length=256, gradient_accumulation_steps=4)
    rl.processing_class = tokenizer
    estimate = machine.estimate(rl, "rl", A100_40GB)
    rates = MEASURED["sampler_new_tokens_per_s"]
    size = min(b for b in rates if b >= 16)  # a batch of 16 decodes at the step of the least measured batch above it
    sampling = 256 * size / rates[size]
    rates = 1 / MEASURED["dpo_tokens_per_s"] + 1 / MEASURED["reward_tokens_per_s"]
    training = 16 * 456 * rates * A100_40GB.slowdown()
    assert estimate.seconds == pytest.approx(20 * (sampling + training))
    assert estimate.peak_gib == MEASURED["peak_gib"]["rl"]


def test_before_training_reads_the_tokenized_rows():
    dpo = {"prompt_ids": [[1] * 10, [1] * 20], "chosen_ids": [[2] * 5, [2] * 7], "rejected_ids": [[3] * 9, [3] * 1]}
    estimate = machine.estimate(trainer(dpo, epochs=3), "dpo", H200)
    # a pair's tokens as TRL batches it: the prompt twice, both answers: (2·10+5+9 + 2·20+7+1) / 2 = 41
    assert estimate.seconds == pytest.approx(3 * 2 * 41 / MEASURED["dpo_tokens_per_s"])
    assert estimate.peak_gib == MEASURED["peak_gib"]["dpo"]
    sft = {"input_ids": [[0] * 2048, [0] * 1000]}
    capped = machine.estimate(trainer(sft, max_steps=5), "sft", H200)
    assert capped.seconds == pytest.approx(5 * 4 * 2 * 1524 / MEASURED["sft_tokens_per_s"])


def test_decode_read_is_the_bf16_linear_layers_and_lm_head():
    from helpers.theory import LLAMA_31_8B, linear_shapes

    linear = sum(i * o for i, o in linear_shapes(LLAMA_31_8B).values()) * LLAMA_31_8B.num_hidden_layers
    lm_head = LLAMA_31_8B.vocab_size * LLAMA_31_8B.hidden_size
    assert round(2 * (linear + lm_head) / 1e9, 1) == machine.DECODE_READ_GB


# --- the checks before anything heavy ----------------------------------------------------------------------------

FAKE_TOKEN = "hf_FAKEpreflightTOKEN1234567890"


def fake_gpu(monkeypatch, name: str | None = "NVIDIA H100 80GB HBM3", bf16: bool = True) -> None:
    """torch as it reports a GPU named `name` (None: no GPU), with or without native bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: name is not None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=0: name)


def test_full_profile_without_a_gpu_points_to_the_smoke_profile(monkeypatch):
    fake_gpu(monkeypatch, None)
    with pytest.raises(PreflightError, match="needs a CUDA GPU") as error:
        check_environment(full_profile(), env={"HF_TOKEN": FAKE_TOKEN})
    assert "TUTORIAL_PROFILE=smoke" in str(error.value)
    assert FAKE_TOKEN not in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="reads the machine's facts from torch: needs a CPU-only host")
def test_machine_facts_default_to_what_torch_sees():
    with pytest.raises(PreflightError, match="TUTORIAL_PROFILE=smoke"):
        check_environment(full_profile(), env={})
    check_environment(smoke_profile(), env={})  # the smoke profile is made for this machine


def test_a_gpu_without_bf16_is_a_clear_stop_naming_it(monkeypatch):
    fake_gpu(monkeypatch, "Tesla T4", bf16=False)
    with pytest.raises(PreflightError) as error:
        check_environment(full_profile(), env={})
    message = str(error.value)
    assert "Tesla T4 has no native bf16" in message and "fp16 is not offered" in message
    fake_gpu(monkeypatch, "Tesla V100", bf16=False)
    with pytest.raises(PreflightError, match="Tesla V100"):  # the smoke profile computes in bf16 too
        check_environment(smoke_profile(), env={})


def test_full_profile_on_a_bf16_gpu_passes_without_a_token(monkeypatch):
    fake_gpu(monkeypatch)
    check_environment(full_profile(), env={})  # its unsloth/ copies of the weights are not gated


@pytest.mark.parametrize("token", [None, "", "   "])
def test_a_gated_model_without_a_token_says_where_to_get_one(token, monkeypatch):
    fake_gpu(monkeypatch)
    profile = replace(full_profile(), model_id="meta-llama/Llama-3.1-8B")
    env = {} if token is None else {"HF_TOKEN": token}
    with pytest.raises(PreflightError) as error:
        check_environment(profile, env=env)
    message = str(error.value)
    assert "meta-llama/Llama-3.1-8B is gated" in message
    assert machine.TOKEN_URL in message and "accept the license" in message


def test_a_gated_model_with_a_token_passes_and_the_token_is_never_printed(capsys, monkeypatch):
    fake_gpu(monkeypatch)
    profile = replace(full_profile(), model_id="meta-llama/Llama-3.1-8B")
    check_environment(profile, env={"HF_TOKEN": FAKE_TOKEN})
    fake_gpu(monkeypatch, None)
    with pytest.raises(PreflightError) as error:  # another problem, token set: the message must not show it
        check_environment(profile, env={"HF_TOKEN": FAKE_TOKEN})
    captured = capsys.readouterr()
    assert FAKE_TOKEN not in str(error.value) + captured.out + captured.err


def test_models_listed_as_gated_need_a_token_too(monkeypatch):
    fake_gpu(monkeypatch)
    monkeypatch.setattr(machine, "GATED_MODELS", (*machine.GATED_MODELS, "acme/*"))
    profile = replace(full_profile(), reward_model_id="acme/reward-8b")
    with pytest.raises(PreflightError, match="acme/reward-8b is gated"):
        check_environment(profile, env={})


def test_every_problem_is_reported_at_once(monkeypatch):
    fake_gpu(monkeypatch, None)
    profile = replace(full_profile(), model_id="meta-llama/Llama-3.1-8B")
    with pytest.raises(PreflightError) as error:
        check_environment(profile, env={})
    assert "needs a CUDA GPU" in str(error.value) and "is gated" in str(error.value)


def test_prepare_names_an_outputs_folder_it_cannot_create(tmp_profile, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    profile = replace(tmp_profile, outputs_root=str(blocker / "outputs"))
    with pytest.raises(PreflightError, match=r"^TUTORIAL_OUTPUTS: cannot create .*a-file/outputs/smoke"):
        machine.prepare(profile)


# --- the memory preflight, on a CPU with a faked card --------------------------------------------------------------

ADVICE = {
    "sft": "sft.per_device_train_batch_size",
    "dpo": "dpo.per_device_train_batch_size",
    "rl": "reward_model_4bit",
}


@pytest.mark.parametrize("stage", ADVICE)
def test_require_memory_stops_naming_the_setting_to_change(stage):
    needed = MEASURED["peak_gib"][stage]
    with pytest.raises(PreflightError) as error:
        machine.require_memory(stage, needed, free_gib=needed - 0.5)
    message = str(error.value)
    assert message.startswith(f"{stage}: expected peak {needed:.1f} GiB, but this GPU has {needed - 0.5:.1f} GiB free")
    assert ADVICE[stage] in message and "TUTORIAL_SETTINGS" in message
    machine.require_memory(stage, needed, free_gib=needed)  # it fits: no stop
    machine.require_memory(stage, needed, free_gib=needed + 40)


@pytest.mark.skipif(torch.cuda.is_available(), reason="reads the machine from torch: needs a CPU-only host")
def test_require_memory_checks_nothing_on_a_cpu():
    machine.require_memory("rl", 1e6)


def fake_card(monkeypatch, physical_free_gib: float, cap: float, total_gib: float = 80.0) -> None:
    """A GPU of `total_gib` as torch would report it: the allocator holds 10 GiB, 6 of them in use; the card has
    `physical_free_gib` free; the process may use `cap` of the card (`set_per_process_memory_fraction`)."""
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=0: (int(physical_free_gib * GIB), int(total_gib * GIB)))
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=0: 10 * GIB)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=0: 6 * GIB)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=0: 8 * GIB)
    monkeypatch.setattr(cuda, "get_device_properties", lambda device=0: SimpleNamespace(total_memory=total_gib * GIB))
    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device=0: cap)


def test_free_memory_respects_the_per_process_cap(monkeypatch):
    fake_card(monkeypatch, physical_free_gib=70, cap=1.0)
    assert machine.gpu_free_bytes() == (4 + 70) * GIB  # unused in the allocator, plus the card's free memory
    fake_card(monkeypatch, physical_free_gib=70, cap=0.5)  # capped to 40 GiB, 10 of them reserved already
    assert machine.gpu_capacity_bytes() == 40 * GIB
    assert machine.gpu_free_bytes() == (4 + 30) * GIB  # the cap binds, not the 70 GiB the card has free
    fake_card(monkeypatch, physical_free_gib=5, cap=0.5)  # other processes hold the card: the card binds
    assert machine.gpu_free_bytes() == (4 + 5) * GIB


def test_require_memory_reads_the_capped_free_memory(monkeypatch):
    fake_card(monkeypatch, physical_free_gib=70, cap=0.5)
    with pytest.raises(PreflightError, match=r"^rl: expected peak 52\.7 GiB, but this GPU has 34\.0 GiB free"):
        machine.require_memory("rl", MEASURED["peak_gib"]["rl"])
    machine.require_memory("dpo", MEASURED["peak_gib"]["dpo"])
    assert machine.memory_snapshot()["gpu_total_gib"] == 40.0  # the capacity within the cap
