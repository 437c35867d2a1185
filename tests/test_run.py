"""helpers.run, the main job: errors a user can read (one `error:` line, exit status 2, no traceback), Ctrl-C stops
with one line saying what was saved (exit status 130), the kernels talk over local sockets (no TCP without
encryption) kept in a folder of their own and removed, the check on executed notebooks counts progress bars and
warnings as Jupyter shows them, and the report holds what the stages recorded."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import run, training
from helpers.run import noise_lines
from helpers.settings import PROJECT_ROOT


def main_job(env: dict[str, str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m helpers.run ARGS` as a user starts it, with `env` added to this environment."""
    return subprocess.run(
        [sys.executable, "-m", "helpers.run", *args],
        cwd=PROJECT_ROOT,
        env=os.environ | {"WANDB_MODE": "disabled"} | env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_error(done: subprocess.CompletedProcess, *phrases: str) -> None:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("error: ") == 1, done.stderr
    assert all(phrase in done.stderr for phrase in phrases), done.stderr


def test_a_gpu_profile_on_this_cpu_is_one_error_naming_the_fix():
    done = main_job({"TUTORIAL_PROFILE": "quick"}, "01")
    assert_one_error(done, "needs a CUDA GPU", "TUTORIAL_PROFILE=smoke")
    assert done.stderr.count("\n") == 1  # one paragraph, one line


@pytest.mark.parametrize(
    ("variable", "value", "phrase"),
    [
        ("TUTORIAL_SEED", "x", "TUTORIAL_SEED='x' must be a non-negative whole number"),
        ("TUTORIAL_SETTINGS", "/nowhere/settings.json", "TUTORIAL_SETTINGS=/nowhere/settings.json: no such file"),
        ("TUTORIAL_PROFILE", "tiny", "TUTORIAL_PROFILE='tiny' is not one of smoke, quick, full"),
    ],
)
def test_a_malformed_setting_is_one_error_naming_it(variable, value, phrase):
    assert_one_error(main_job({variable: value}, "01"), phrase)


def test_an_outputs_folder_that_cannot_be_created_is_one_error_naming_the_variable(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file, not a folder")
    done = main_job({"TUTORIAL_OUTPUTS": str(blocker / "outputs")}, "01")
    assert_one_error(done, "TUTORIAL_OUTPUTS", str(blocker / "outputs"))


def test_an_unknown_notebook_is_one_error_listing_the_series(tmp_path):
    done = main_job({"TUTORIAL_OUTPUTS": str(tmp_path)}, "99")
    assert_one_error(done, "No notebook starts with 99; they are 01_theory.ipynb")


def test_ctrl_c_stops_with_one_line_saying_what_was_saved(smoke_world, smoke_seed, tmp_path):
    """Ctrl-C reaches the whole foreground process group: the main job and the kernel running notebook 01."""
    env = os.environ | {
        "TUTORIAL_OUTPUTS": str(tmp_path),
        "TUTORIAL_SEED": str(smoke_seed),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "helpers.run", "01"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    folder = str(Path(tempfile.gettempdir()) / f"align-llama-kernel-{process.pid}-*")  # this run's socket folder
    sockets = folder + "/kernel-*"  # the kernel's, once it runs
    deadline = time.monotonic() + 180
    while not glob.glob(sockets) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.poll() is None, "the main job ended before its kernel started"
    time.sleep(2)  # a few seconds into the notebook (it runs for about 10 s on an idle CPU)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "without encryption" not in out + err
    stopped = [line for line in err.splitlines() if line.startswith("Stopped.")]
    assert stopped == [f"Stopped. Saved in {tmp_path / 'smoke'}: nothing yet. Run the same command again to resume."], (
        err[-3000:]
    )
    assert (tmp_path / "smoke" / "notebooks" / "01_theory.ipynb").exists()  # the executed copy, as far as it got
    assert not glob.glob(folder)  # the kernel is gone, its sockets and their folder too
    assert not list(run.NOTEBOOK_DIR.glob("kernel-ipc-*"))  # jupyter_client's default place for them


def test_what_was_saved_names_finished_stages_and_the_last_complete_checkpoints(tmp_profile):
    assert run.saved(tmp_profile) == "nothing yet"
    tmp_profile.adapter_dir("sft").mkdir(parents=True)
    for step in (3, 6, 9):
        (tmp_profile.checkpoint_dir("dpo") / f"checkpoint-{step}").mkdir(parents=True)
    for step in (3, 6):  # 9 was being written
        (tmp_profile.checkpoint_dir("dpo") / f"checkpoint-{step}" / training.CHECKPOINT_DONE).write_text(str(step))
    assert run.saved(tmp_profile) == "sft-adapter, dpo-checkpoints/checkpoint-6"


def test_the_report_holds_what_the_stages_recorded(tmp_profile):
    tmp_profile.output_dir.mkdir(parents=True)  # as the main job makes it first
    assert "No stage has recorded results yet." in run.write_report(tmp_profile).read_text()
    evaluation = {
        m: {"better_answer_rate": 0.5, "better_answer_rate_ci": [0.25, 0.75], "mean_response_tokens": 6.0}
        for m in ("sft", "dpo")
    }
    training.update_metrics(tmp_profile, sft={"loss_first": 2.0, "loss_last": 0.5, "eval_loss": [1.0]}, eval=evaluation)
    text = run.write_report(tmp_profile).read_text()
    assert text.startswith("# Run report: smoke profile\n")
    assert "## sft\n\n- loss_first: 2.000\n- loss_last: 0.500\n" in text  # lists are left to the plots
    assert "| model | better_answer_rate | mean_response_tokens |" in text
    assert "| sft | 0.500 [0.250, 0.750] | 6.000 |" in text and "## dpo" not in text


def stream(name: str, text: str) -> dict:
    return {"output_type": "stream", "name": name, "text": text}


def test_noise_lines_counts_stderr_progress_bars_and_warnings():
    notebook = {
        "cells": [
            {"cell_type": "code", "outputs": [stream("stdout", "loss 0.5\nprofile=smoke\n")]},
            {"cell_type": "code", "outputs": [stream("stderr", "Map: 50%|█ | 5/10\rMap: 100%|██| 10/10\nMap: 1/4\n")]},
            {"cell_type": "code", "outputs": [stream("stdout", "step 3 12.5 it/s\nUserWarning: x\nfine\n")]},
            {"cell_type": "markdown"},
        ]
    }
    assert noise_lines(notebook) == ["Map: 100%|██| 10/10", "Map: 1/4", "step 3 12.5 it/s", "UserWarning: x"]


def test_a_text_progress_bar_counts_as_its_last_line():
    """tqdm without ipywidgets writes every update as its own output, each starting with a carriage return:
    Jupyter shows one line (the GGUF reader's bar in notebook 07 on the H200 sent 130 such outputs)."""
    updates = [stream("stderr", f"\rreading: {i}/292") for i in range(0, 293, 2)] + [stream("stderr", "\n")]
    notebook = {"cells": [{"cell_type": "code", "outputs": [*updates, stream("stdout", "done\n")]}]}
    assert noise_lines(notebook) == ["reading: 292/292"]
