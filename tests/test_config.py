"""The profiles: one recipe in three sizes, with the published settings where the real model trains."""

from dataclasses import fields, replace

from helpers.config import Profile, full_profile, quick_profile, smoke_profile


def test_full_profile_follows_the_published_recipe():
    profile = full_profile()
    assert (profile.lora.r, profile.lora.alpha, profile.lora.dropout, profile.lora.use_rslora) == (16, 16, 0.0, True)
    assert len(profile.lora.target_modules) == 7
    assert profile.dpo.beta == 0.1
    assert profile.lora.modules_to_save == ()  # full copies of an 8B model's embeddings would cost 2 GB


def test_quick_is_full_on_subsets():
    full, quick = full_profile(3), quick_profile(3)
    same = ("backend", "seed", "model_id", "reward_model_id", "lora", "sft", "dpo", "reward", "eval", "expect")
    assert all(getattr(quick, name) == getattr(full, name) for name in same)
    assert quick.data.max_sft_rows and quick.data.max_preference_rows
    assert (quick.data.sft_dataset, quick.data.preference_dataset) == (
        full.data.sft_dataset,
        full.data.preference_dataset,
    )


def test_smoke_and_full_train_the_same_dpo_loss():
    assert smoke_profile().dpo.loss_type == full_profile().dpo.loss_type
    assert smoke_profile().dpo.loss_weights == full_profile().dpo.loss_weights


def test_only_the_profile_with_a_code_judge_promises_outcomes():
    assert smoke_profile().code_judge and smoke_profile().expect is not None
    assert not full_profile().code_judge and full_profile().expect is None


def test_smoke_world_paths_follow_the_seed():
    assert "seed-3" in smoke_profile(3).model_id and "seed-3" in smoke_profile(3).data.sft_dataset
    assert smoke_profile(3).model_id != smoke_profile(4).model_id


def test_adapters_go_under_the_profile_name(tmp_path):
    profile = replace(smoke_profile(), outputs_root=str(tmp_path))
    assert profile.output_dir == tmp_path / "smoke"
    adapters = (profile.sft_adapter_dir, profile.dpo_adapter_dir, profile.rl_adapter_dir)
    assert adapters == tuple(tmp_path / "smoke" / f"{stage}-adapter" for stage in ("sft", "dpo", "rl"))


def test_to_dict_holds_every_setting():
    settings = smoke_profile().to_dict()
    assert settings["sft"]["learning_rate"] == smoke_profile().sft.learning_rate
    assert set(settings) == {f.name for f in fields(Profile)}
