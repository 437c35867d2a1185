"""Profiles, backends and seeds are chosen from the environment, in one place."""

import pytest

from helpers.config import full_profile, load_profile, resolve_backend, smoke_profile


def test_smoke_is_the_default_without_a_gpu():
    profile = load_profile({})
    assert (profile.name, profile.backend, profile.seed) == ("smoke", "hf", 42)


def test_environment_selects_profile_backend_and_seed():
    profile = load_profile({"TUTORIAL_PROFILE": "FULL", "TUTORIAL_BACKEND": "hf", "TUTORIAL_SEED": "7"})
    assert (profile.name, profile.backend, profile.seed) == ("full", "hf", 7)
    assert profile.model_id == "unsloth/Meta-Llama-3.1-8B-bnb-4bit"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TUTORIAL_PROFILE": "tiny"}, "TUTORIAL_PROFILE='tiny' is not one of smoke, full"),
        ({"TUTORIAL_BACKEND": "vllm"}, "TUTORIAL_BACKEND='vllm' is not one of auto, unsloth, hf"),
        ({"TUTORIAL_SEED": "-1"}, "TUTORIAL_SEED='-1' must be a non-negative whole number"),
    ],
)
def test_bad_settings_are_named(env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_profile(env)


def test_auto_backend_takes_hf_on_a_cpu_and_unsloth_on_a_gpu():
    assert resolve_backend("auto", on_gpu=False) == "hf"
    assert resolve_backend("auto", on_gpu=True) == "unsloth"  # unsloth is installed by `make setup`
    assert resolve_backend("hf", on_gpu=True) == "hf"


def test_full_profile_follows_the_published_recipe():
    profile = full_profile()
    assert (profile.lora.r, profile.lora.alpha, profile.lora.dropout, profile.lora.use_rslora) == (16, 16, 0.0, True)
    assert len(profile.lora.target_modules) == 7
    assert profile.dpo.beta == 0.1
    assert profile.lora.modules_to_save == ()  # full copies of an 8B model's embeddings would cost 2 GB


def test_outputs_go_under_the_profile_name(tmp_path):
    profile = load_profile({"TUTORIAL_OUTPUTS": str(tmp_path), "TUTORIAL_SEED": "3"})
    assert profile.output_dir == tmp_path / "smoke"
    assert profile.sft_adapter_dir == tmp_path / "smoke" / "sft-adapter"
    assert "seed-3" in smoke_profile(3).model_id
