"""Shared fixtures: one smoke world per test session, and outputs kept out of the repo's `outputs/`."""

from dataclasses import replace

import pytest

from helpers.config import smoke_profile
from helpers.smoke import build_smoke_world


@pytest.fixture(scope="session")
def smoke_world():
    """The seed-42 smoke world (built once, then reused from the cache)."""
    return build_smoke_world(42)


@pytest.fixture
def tmp_profile(smoke_world, tmp_path, monkeypatch):
    """The smoke profile (hf backend, seed 42), writing under a temporary folder, W&B off."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("TUTORIAL_OUTPUTS", str(tmp_path))
    return replace(smoke_profile(42, "hf"), outputs_root=str(tmp_path))
