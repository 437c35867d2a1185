"""The main job's check on executed notebooks: progress-bar walls and warnings are counted as Jupyter shows them."""

from helpers.run import noise_lines


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
