"""The main job's check on executed notebooks: progress-bar walls and warnings are counted."""

from helpers.run import noise_lines


def stream(name: str, text: str) -> dict:
    return {"output_type": "stream", "name": name, "text": text}


def test_noise_lines_counts_stderr_progress_bars_and_warnings():
    notebook = {
        "cells": [
            {"cell_type": "code", "outputs": [stream("stdout", "loss 0.5\nprofile=smoke\n")]},
            {"cell_type": "code", "outputs": [stream("stderr", "Map: 100%|██| 10/10\rMap: 100%|██| 10/10\n")]},
            {"cell_type": "code", "outputs": [stream("stdout", "step 3 12.5 it/s\nUserWarning: x\nfine\n")]},
            {"cell_type": "markdown"},
        ]
    }
    assert noise_lines(notebook) == ["Map: 100%|██| 10/10", "Map: 100%|██| 10/10", "step 3 12.5 it/s", "UserWarning: x"]
