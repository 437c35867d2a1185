"""Every test runs with its outputs in a temporary folder and W&B off, whatever the shell that started it set.

Tests that want W&B or other outputs set them again with `monkeypatch` or in a subprocess's environment.
"""

import pytest


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TUTORIAL_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
