"""Shared fixtures: one smoke world per test session (for the session's seed), outputs kept out of `outputs/`."""

import os
from dataclasses import replace
from pathlib import Path

import pytest

from helpers.config import Profile, smoke_profile
from helpers.smoke import build_smoke_world


@pytest.fixture(scope="session")
def smoke_seed() -> int:
    """The session's seed: `TUTORIAL_SEED` (as `make run` reads it), default 42."""
    return int(os.environ.get("TUTORIAL_SEED", 42))


@pytest.fixture(scope="session")
def smoke_world(smoke_seed) -> Path:
    """The smoke world of the session's seed (built once, then reused from the cache)."""
    return build_smoke_world(smoke_seed)


@pytest.fixture
def tmp_profile(smoke_world, smoke_seed, tmp_path, monkeypatch) -> Profile:
    """The smoke profile (hf backend, the session's seed), writing under a temporary folder, W&B off."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("TUTORIAL_OUTPUTS", str(tmp_path))
    return replace(smoke_profile(smoke_seed, "hf"), outputs_root=str(tmp_path))
