"""Checks run before anything is downloaded or trained: does this machine and environment fit the profile?

`check_environment(profile)` raises one `PreflightError` listing every problem with what to do about it. The
facts about the machine are keyword arguments, read from torch when left out, so each branch is testable on
a CPU. Tokens are only checked for presence, never printed.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from pathlib import Path

from helpers.config import Profile

# Hub ids (shell patterns) whose weights need an accepted license and a token. The full profile's
# `unsloth/...-bnb-4bit` copies are not gated; Meta's own repositories are.
GATED_MODELS = ("meta-llama/*",)
TOKEN_URL = "https://huggingface.co/settings/tokens"


class PreflightError(RuntimeError):
    """The profile cannot run here; the message says what to change."""


def is_gated(model_id: str) -> bool:
    """True for a hub id matching `GATED_MODELS` (a local folder never is)."""
    return not Path(model_id).exists() and any(fnmatch.fnmatch(model_id, p) for p in GATED_MODELS)


def gpu_problems(profile: Profile, cuda_available: bool, bf16_supported: bool, gpu_name: str | None) -> list[str]:
    if not cuda_available:
        if profile.name != "smoke":
            return [
                f"The {profile.name} profile trains Llama-3.1-8B and needs a CUDA GPU with bf16 (A10G, L4, A100, "
                "H100 or newer); torch sees none. On this machine run the smoke profile instead: "
                "TUTORIAL_PROFILE=smoke (a tiny local model, minutes on a CPU)."
            ]
        return []
    if not bf16_supported:
        return [
            f"{gpu_name} has no native bf16 (it needs compute capability 8.0 or newer, as on A10G, L4, A100, "
            "H100); T4 and V100 do not. This recipe computes in bf16 on the 4-bit model. fp16 is not offered: "
            "its range ends at 65504, so it needs loss scaling and other settings than the ones measured here, "
            "and an overflow shows up as a NaN loss hours in. Use an Ampere or newer GPU."
        ]
    return []


def token_problems(profile: Profile, env: Mapping[str, str]) -> list[str]:
    if env.get("HF_TOKEN", "").strip():
        return []
    gated = [m for m in (profile.model_id, profile.reward_model_id) if m is not None and is_gated(m)]
    return [
        f"{model_id} is gated and HF_TOKEN is not set. Create a read token at {TOKEN_URL}, accept the license "
        f"on https://huggingface.co/{model_id} with the same account, then set HF_TOKEN in the environment "
        "that starts Python or Jupyter (or enter it at a getpass prompt)."
        for model_id in gated
    ]


def check_environment(
    profile: Profile,
    env: Mapping[str, str] = os.environ,
    *,
    cuda_available: bool | None = None,
    bf16_supported: bool | None = None,
    gpu_name: str | None = None,
) -> None:
    """Stop early, with the fix in the message, when `profile` cannot run here.

    Args:
        profile: the run's settings.
        env: where HF_TOKEN is looked for.
        cuda_available, bf16_supported, gpu_name: facts about the machine; read from torch when None.

    Raises:
        PreflightError: the full profile without a CUDA GPU, a GPU without bf16, or a gated model without a
            token (all problems found, one per paragraph).
    """
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if cuda_available and bf16_supported is None:
        # Without including_emulation=False torch says yes on a T4 too, where bf16 is emulated and slow.
        bf16_supported = torch.cuda.is_bf16_supported(including_emulation=False)
    if cuda_available and gpu_name is None:
        gpu_name = torch.cuda.get_device_name(0)
    problems = gpu_problems(profile, cuda_available, bool(bf16_supported), gpu_name) + token_problems(profile, env)
    if problems:
        raise PreflightError("\n\n".join(problems))
