"""Shared fixtures: one smoke world per test session (for the session's seed), outputs kept out of `outputs/`, and an
SFT-like policy (fresh adapters made to look trained) for tests that need the SFT model to differ from the base."""

import os
from dataclasses import replace
from pathlib import Path

import pytest

from helpers.settings import Profile, smoke_profile
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


def sft_like(profile: Profile):
    """The smoke model with fresh adapters made to look trained (as after SFT): LoRA's B matrices and the trainable
    chat-token rows moved by seeded noise, so the SFT model differs from the base, rows included."""
    import torch

    from helpers import model

    policy, tokenizer = model.load_for_training(profile, profile.dpo.max_length)
    generator = torch.Generator().manual_seed(profile.seed)
    moved = [p for n, p in policy.named_parameters() if "lora_B" in n or "trainable_tokens_delta" in n]
    assert any(p.dim() == 2 and p.shape[0] == 3 for p in moved)  # the three chat-token rows are among them
    with torch.no_grad():
        for param in moved:
            param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param.dtype))
    return policy, tokenizer


@pytest.fixture(scope="session")
def sft_like_policy():
    """`sft_like(profile)`: a fresh SFT-like policy and its tokenizer for `profile`."""
    return sft_like
